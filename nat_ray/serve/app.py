"""The Serve application: the tuned agent on Ray Serve, with vLLM through ``ray.serve.llm`` and tool deployments.

One Serve application, four deployments::

    HTTP -> AgentIngress (FastAPI) --chat--> LLMServer:<model_id>   (ray.serve.llm, vLLM; base + LoRA)
                                   --call--> tool-calculate          (ToolHost, autoscaling)
                                   --call--> tool-search             (ToolHost, autoscaling)

The ingress and its routes are in :mod:`nat_ray.serve.ingress`; this module builds the application
from a config (:func:`build_app`) and runs it (:func:`run_serve`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import time
from pathlib import Path

import ray
from ray import serve

from nat_ray.agent import prepare_tasks, with_tasks_resolved
from nat_ray.config import NatRayConfig, load_config
from nat_ray.core.storage import is_uri, storage_env
from nat_ray.engines.vllm_args import engine_kwargs, served_cpu_env, warn_lora_rank
from nat_ray.errors import ConfigError
from nat_ray.models import served_paths
from nat_ray.ray_runtime import init_ray
from nat_ray.serve.capture import with_capture_resolved
from nat_ray.serve.guards import api_key_from_env
from nat_ray.serve.ingress import ingress_class
from nat_ray.serve.llm_init import LocalModelCallback
from nat_ray.tools.actors import actor_runtime_env
from nat_ray.tools.host import ToolHost
from nat_ray.tools.mcp import require_servers

log = logging.getLogger(__name__)

APP_NAME = "nat-ray"
# The ingress queues agent requests itself (beyond serve.max_concurrent_episodes they wait for a
# slot in the stepper), so Serve must never hold them back at the door: that would shrink batches.
INGRESS_MAX_ONGOING_REQUESTS = 4096
TOOL_MAX_ONGOING_REQUESTS = 16  # per tool replica; above 2 in flight per replica, autoscaling adds one
TOOL_TARGET_ONGOING_REQUESTS = 2


def served_model_ids(cfg: NatRayConfig, model_path: str) -> tuple[str, str | None]:
    """The base model's id and the LoRA adapter's (``<id>-lora``, or None without an adapter).

    Without ``serve.model_id`` the id is the model folder's name, or the training run's name for
    a training export (``<run>/export/model``).
    """
    path = Path(model_path)
    derived = path.parents[1].name if (path.parent / "export.json").is_file() else path.name
    model_id = cfg.serve.model_id or derived
    return model_id, (f"{model_id}-lora" if cfg.serve.lora else None)


def llm_config(
    cfg: NatRayConfig,
    model_path: str,
    model_id: str,
    lora_id: str | None = None,
    lora_path: str | None = None,
):
    """The ``ray.serve.llm`` :class:`LLMConfig` of the served model (vLLM engine settings from ``engine``).

    On CPU (``serve.llm_num_gpus == 0``) the engine gets one CPU bundle, float32, eager mode and a
    ``engine.kv_cache_gb`` KV cache; on GPU, one bundle per tensor-parallel rank. A LoRA adapter is
    loaded once at start as a static vLLM LoRA module named ``lora_id``. With ``serve.lora_dir``,
    ray.serve.llm's dynamic LoRA loading is on (``lora_config``), through :func:`lora_bind_kwargs`'
    loader (a folder or object storage alike).
    """
    from ray.serve.llm import LLMConfig

    engine, serve_cfg = cfg.engine, cfg.serve
    gpu = serve_cfg.llm_num_gpus > 0
    if engine.device == "cpu" and gpu:
        raise ConfigError("engine.device='cpu' but serve.llm_num_gpus > 0; set serve.llm_num_gpus=0")
    if engine.device == "cuda" and not gpu:
        raise ConfigError("engine.device='cuda' needs serve.llm_num_gpus > 0 (GPUs per vLLM replica)")
    kwargs = engine_kwargs(engine, gpu, lora=lora_path is not None or serve_cfg.lora_dir is not None)
    warn_lora_rank(engine, gpu, lora_path)
    if lora_path is not None:
        # engine.extra (applied in engine_kwargs) keeps the last word, as for every other argument.
        kwargs.setdefault("lora_modules", [{"name": lora_id, "path": lora_path, "base_model_name": model_id}])
    if gpu:
        gpus_per_rank = serve_cfg.llm_num_gpus / engine.tensor_parallel_size
        bundles = [{"CPU": serve_cfg.llm_num_cpus, "GPU": gpus_per_rank}]
        bundles += [{"GPU": gpus_per_rank}] * (engine.tensor_parallel_size - 1)
        env = {}
    else:
        bundles = [{"CPU": serve_cfg.llm_num_cpus}]  # ray.serve.llm's default bundle asks for a GPU
        # ray.serve.llm runs vLLM's multiprocess executor on CPU: its model worker computes on every
        # core or leaves one to the scheduler (see nat_ray.hardware.cpu_reserved_cores).
        env = served_cpu_env(engine, serve_cfg.llm_cpu_reserved_cores)
    lora_config = None
    if serve_cfg.lora_dir is not None:
        lora_config = {"max_num_adapters_per_replica": serve_cfg.lora_max_adapters}
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_path},
        lora_config=lora_config,
        engine_kwargs=kwargs,
        placement_group_config={"bundles": bundles},
        runtime_env={"env_vars": env},
        deployment_config={"num_replicas": serve_cfg.llm_replicas},
        callback_config={"callback_class": LocalModelCallback},
    )


def lora_bind_kwargs(cfg: NatRayConfig) -> dict:
    """Extra arguments of the LLM deployment: the adapter loader reading ``serve.lora_dir``, with the
    driver's object-storage settings (init arguments: a runtime_env is shown on the dashboard)."""
    if cfg.serve.lora_dir is None:
        return {}
    from nat_ray.serve.lora_loader import StoreLoraLoader

    loader = functools.partial(
        StoreLoraLoader, lora_dir=cfg.serve.lora_dir, storage_env=storage_env(cfg.serve.lora_dir)
    )
    return {"model_downloader": loader}


def with_lora_dir_resolved(cfg: NatRayConfig, model_id: str) -> NatRayConfig:
    """``serve.lora_dir`` as an absolute folder that exists (replicas run in other directories)."""
    lora_dir = cfg.serve.lora_dir
    if lora_dir is None:
        return cfg
    if ":" in model_id:
        raise ConfigError(
            f"serve.lora_dir serves adapters as '<model_id>:<adapter>', so the model id {model_id!r} "
            "must not hold ':'; set serve.model_id"
        )
    if is_uri(lora_dir):
        return dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, lora_dir=lora_dir.rstrip("/")))
    folder = Path(lora_dir).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)  # adapters are published into it later
    except OSError as err:
        raise ConfigError(f"serve.lora_dir={lora_dir!r} is not a folder that can be created: {err}") from None
    if not folder.is_dir():
        raise ConfigError(f"serve.lora_dir={lora_dir!r} is not a folder")
    return dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, lora_dir=str(folder)))


def check_limits(cfg: NatRayConfig) -> None:
    """The server's own agent defaults must fit the limits it enforces on requests."""
    if cfg.agent.max_turns > cfg.serve.max_turns_limit:
        raise ConfigError(
            f"agent.max_turns={cfg.agent.max_turns} is over serve.max_turns_limit={cfg.serve.max_turns_limit}"
        )
    if cfg.agent.max_new_tokens > cfg.serve.max_tokens_limit:
        raise ConfigError(
            f"agent.max_new_tokens={cfg.agent.max_new_tokens} is over "
            f"serve.max_tokens_limit={cfg.serve.max_tokens_limit}"
        )
    if cfg.engine.backend != "vllm":
        raise ConfigError(
            f"serving runs vLLM through ray.serve.llm; engine.backend must be 'vllm', got {cfg.engine.backend!r}"
        )


def build_app(cfg: NatRayConfig):
    """The Serve application (not running): LLM deployment, tool deployments and the agent ingress.

    Raises:
        ConfigError / ModelError: bad settings, a missing model or adapter, before anything starts.
    """
    from ray.serve.llm import build_llm_deployment

    check_limits(cfg)
    tasks, cfg = with_tasks_resolved(cfg, "serve")  # the replicas read the task files by these paths
    require_servers(cfg.tools.plugins)  # a server that will not start: a clear error before Serve
    model_path, lora_path = served_paths(cfg.engine.model, cfg.serve.lora)
    model_id, lora_id = served_model_ids(cfg, model_path)
    cfg = with_lora_dir_resolved(cfg, model_id)
    cfg = with_capture_resolved(cfg)
    llm = build_llm_deployment(
        llm_config(cfg, model_path, model_id, lora_id, lora_path), bind_kwargs=lora_bind_kwargs(cfg)
    )
    autoscaling = {
        "min_replicas": cfg.serve.tool_min_replicas,
        "max_replicas": cfg.serve.tool_max_replicas,
        "initial_replicas": max(1, cfg.serve.tool_min_replicas),
        "target_ongoing_requests": TOOL_TARGET_ONGOING_REQUESTS,
    }
    names = list(dict.fromkeys(tool for task in tasks for tool in task.tools))
    env = actor_runtime_env(cfg.tools.plugins)  # plug-in tool files, for replicas on any node
    tools = {
        name: serve.deployment(
            ToolHost,
            name=f"tool-{name}",
            autoscaling_config=autoscaling,
            max_ongoing_requests=TOOL_MAX_ONGOING_REQUESTS,
            ray_actor_options={"num_cpus": 0, **({"runtime_env": env} if env else {})},
        ).bind(dataclasses.asdict(cfg.tools), preload=(name,), only=(name,))  # heavy state loads at start
        for name in names
    }
    models = [{"id": model_id, "root": model_path, "parent": None}]
    if lora_id is not None:
        models.append({"id": lora_id, "root": lora_path, "parent": model_id})
    ingress = serve.deployment(
        ingress_class(),
        name="AgentIngress",
        num_replicas=1,  # one replica = one stepper: every agent request shares its batches
        max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": 0, **({"runtime_env": env} if env else {})},
    )
    resolved = {**dataclasses.asdict(cfg), "engine": {**dataclasses.asdict(cfg.engine), "model": model_path}}
    # The key travels as an init argument (never in the config, a runtime_env or a log line).
    api_key = api_key_from_env(cfg.serve.api_key_env)
    storage = storage_env(cfg.serve.lora_dir, cfg.serve.capture_dir if cfg.serve.capture else None)
    return ingress.bind(
        llm, tools, resolved, models, lora_id or model_id, api_key=api_key, storage_env=storage or None
    )


def build_app_from_args(args: dict):
    """Application builder for ``serve run`` / ``serve deploy``.

    ``args`` (YAML ``args:`` or ``serve run ... key=value``): ``config`` (a nat-ray YAML), ``model``,
    ``lora`` and ``set`` (a list of ``section.key=value`` overrides, or one string).
    """
    overrides = args.get("set") or []
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    unknown = set(args) - {"config", "model", "lora", "set"}
    if unknown:
        raise ConfigError(f"unknown application args {sorted(unknown)}; known: config, model, lora, set")
    if args.get("model"):
        overrides.append(f"engine.model={json.dumps(args['model'])}")
    if args.get("lora"):
        overrides.append(f"serve.lora={json.dumps(args['lora'])}")
    return build_app(load_config(NatRayConfig, args.get("config"), overrides))


def start_ray_for(cfg: NatRayConfig) -> None:
    """Join ``RAY_ADDRESS``'s cluster, or start a local Ray with enough logical CPUs for the replicas."""

    # Each vLLM replica holds its CPU bundle plus one CPU for the replica actor.
    init_ray(cfg.serve.llm_replicas * (cfg.serve.llm_num_cpus + 1) + 2)


def run_serve(cfg: NatRayConfig) -> int:
    """Start Ray if needed, deploy the application on ``serve.host:serve.port``, block until Ctrl-C.

    Returns:
        0, the exit status of ``nat-ray serve``.
    """
    check_limits(cfg)  # settings, task files and missing models fail before Ray starts
    keyed = api_key_from_env(cfg.serve.api_key_env) is not None  # a blank key fails here too
    tasks, _ = prepare_tasks(cfg.serve.tasks, cfg)
    served_paths(cfg.engine.model, cfg.serve.lora)
    start_ray_for(cfg)
    if any("search" in task.tools for task in tasks):
        from nat_ray.tools.search.index_build import ensure_index_for

        # Here, with a logged estimate and progress, not silently inside the search replica.
        ensure_index_for(cfg.tools)
    application = build_app(cfg)  # ray.serve.llm reads the runtime context: Ray must be up
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    print(f"starting the LLM, tool and agent deployments (the vLLM engine takes a minute or two) for {url}")
    serve.run(application, name=APP_NAME, route_prefix="/")
    print(f"nat-ray is serving at {url}")
    print(
        f"  GET  {url}/v1/models   POST {url}/v1/chat/completions   POST {url}/v1/completions"
        f"   POST {url}/v1/agent   GET {url}/healthz"
    )
    if keyed:
        print(
            f"  every request must carry 'Authorization: Bearer <key>' (the key in ${cfg.serve.api_key_env})"
        )
    else:
        print(f"  open to anyone who reaches the port: set ${cfg.serve.api_key_env} to require a key")
    print("press Ctrl-C to stop")
    # `kill`, `docker stop`, systemd: a graceful stop as for Ctrl-C (replicas write what they captured).
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        if os.environ.get("RAY_ADDRESS"):
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
            ray.shutdown()
    return 0


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt
