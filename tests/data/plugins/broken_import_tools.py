"""A tool file that cannot be imported (tests/test_tool_plugins.py)."""

import nat_ray_no_such_module_xyz  # noqa: F401


def tool(argument: str) -> str:
    return argument
