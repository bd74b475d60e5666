"""Stage 3, serving: the tuned agent behind HTTP on Ray Serve, with vLLM and the tools as deployments.

- :mod:`nat_ray.serve.api`: the agent route's request, its validation, and the answer (pure).
- :mod:`nat_ray.serve.agent_loop`: the one ReAct stepper every agent request shares, over
  deployment handles.
- :mod:`nat_ray.serve.capture`: served episodes and their feedback on disk (no Ray).
- :mod:`nat_ray.serve.ingress`: the FastAPI ingress deployment and its routes.
- :mod:`nat_ray.serve.canary`: a share of the agent traffic on a new adapter, and its verdict (no Ray).
- :mod:`nat_ray.serve.app`: the deployments, :func:`build_app` and :func:`run_serve`.

``serve run nat_ray.serve:build_app_from_args config=configs/serve.yaml`` names the builder here;
it is imported on first use, so importing the package stays free of Ray.
"""

from __future__ import annotations

import importlib

__all__ = ["build_app", "build_app_from_args", "run_serve"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("nat_ray.serve.app"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
