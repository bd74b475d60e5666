"""The metric task's tool: lengths in other units, in metres."""

FACTORS = {"km": 1000.0, "m": 1.0, "cm": 0.01, "mm": 0.001, "ft": 0.3048, "in": 0.0254}


def to_metres(argument: str) -> str:
    """``"2.5 km"`` -> ``"2500"``."""
    value, _, unit = argument.strip().partition(" ")
    if unit.strip() not in FACTORS:
        return f"Error: unknown unit {unit.strip()!r}; use one of {', '.join(FACTORS)}"
    try:
        metres = float(value) * FACTORS[unit.strip()]
    except ValueError:
        return f"Error: {value!r} is not a number"
    return f"{metres:g}"
