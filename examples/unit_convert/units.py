"""A unit converter: the example task's own tool. ``convert("3.5 km to m")`` -> ``"3500"``.

A tool is a plain function from the model's argument (text) to an observation (text). Input the
model got wrong is answered with an ``Error:`` line it can read and correct, not an exception.
"""

from __future__ import annotations

import re

# unit -> (dimension, factor to the dimension's base unit)
UNITS = {
    "mm": ("length", 0.001),
    "cm": ("length", 0.01),
    "m": ("length", 1.0),
    "km": ("length", 1000.0),
    "in": ("length", 0.0254),
    "ft": ("length", 0.3048),
    "mi": ("length", 1609.344),
    "g": ("mass", 0.001),
    "kg": ("mass", 1.0),
    "lb": ("mass", 0.45359237),
    "oz": ("mass", 0.028349523125),
    "s": ("time", 1.0),
    "min": ("time", 60.0),
    "h": ("time", 3600.0),
    "ml": ("volume", 0.001),
    "l": ("volume", 1.0),
}
_REQUEST = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s+(?:to|in)\s+([a-zA-Z]+)\s*$")


def convert(argument: str) -> str:
    """Convert ``VALUE UNIT to UNIT`` (units: mm cm m km in ft mi g kg lb oz s min h ml l)."""
    match = _REQUEST.match(argument)
    if match is None:
        return "Error: write convert[VALUE UNIT to UNIT], e.g. convert[3.5 km to m]"
    value, source, target = float(match[1]), match[2].lower(), match[3].lower()
    unknown = [u for u in (source, target) if u not in UNITS]
    if unknown:
        return f"Error: unknown unit {unknown[0]!r}; known units: {' '.join(UNITS)}"
    (source_dim, source_factor), (target_dim, target_factor) = UNITS[source], UNITS[target]
    if source_dim != target_dim:
        return f"Error: cannot convert {source_dim} ({source}) to {target_dim} ({target})"
    result = value * source_factor / target_factor
    return f"{result:.6g}"
