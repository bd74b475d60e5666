"""An MCP server with two unit tools, for the ``mcp_units`` example task (stdio by default).

``convert_units`` takes one string ("3.5 km to m"), so the agent's ``convert_units[3.5 km to m]`` reaches it as
is; ``scale`` takes two numbers, so the agent writes its arguments as JSON:
``scale[{"value": 3, "factor": 1000}]``. Run ``python server.py --http PORT`` to serve it over
streamable HTTP at ``http://127.0.0.1:PORT/mcp`` instead.
"""

from __future__ import annotations

import re
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

# Units of length, mass, time and volume in their base unit (m, g, s, l).
FACTORS = {
    "mm": ("length", 0.001), "cm": ("length", 0.01), "m": ("length", 1.0), "km": ("length", 1000.0),
    "in": ("length", 0.0254), "ft": ("length", 0.3048), "mi": ("length", 1609.344),
    "g": ("mass", 1.0), "kg": ("mass", 1000.0), "lb": ("mass", 453.59237), "oz": ("mass", 28.349523125),
    "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0),
    "ml": ("volume", 0.001), "l": ("volume", 1.0),
}  # fmt: skip
REQUEST = re.compile(r"^\s*(-?[\d.]+)\s*([a-z]+)\s+(?:to|in)\s+([a-z]+)\s*$", re.IGNORECASE)

server = MCPServer("nat-ray-units", log_level="WARNING")


@server.tool()
def convert_units(request: str) -> str:
    """Convert a quantity, written as '<number> <unit> to <unit>' (e.g. '3.5 km to m')."""
    match = REQUEST.match(request)
    if not match:
        raise ToolError("write '<number> <unit> to <unit>', e.g. '3.5 km to m'")
    value, source, target = float(match.group(1)), match.group(2).lower(), match.group(3).lower()
    if source not in FACTORS or target not in FACTORS:
        raise ToolError(f"known units: {', '.join(FACTORS)}")
    (kind_a, a), (kind_b, b) = FACTORS[source], FACTORS[target]
    if kind_a != kind_b:
        raise ToolError(f"cannot convert {kind_a} ({source}) to {kind_b} ({target})")
    return f"{value * a / b:.6g}"


@server.tool()
def scale(value: float, factor: float) -> str:
    """Multiply value by factor."""
    return f"{value * factor:.6g}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
