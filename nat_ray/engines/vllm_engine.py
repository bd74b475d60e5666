"""vLLM behind the :class:`nat_ray.react.ChatEngine` interface: one batched call per agent turn.

The conversation is rendered with the model's own chat template and tokenized here, not by vLLM,
so that (a) a prompt that no longer fits the context becomes a ``context_overflow`` generation for
that one episode instead of an exception that kills the batch, and (b) training renders the same
token ids (see :mod:`nat_ray.nat_data`). Prefix caching lets turn t+1 reuse turn t's KV cache.

On a machine without CUDA this runs vLLM's CPU build; the measured sweet spot here is float32,
eager mode and a 1-2 GiB KV cache (``VLLM_CPU_KVCACHE_SPACE``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Sequence

from nat_ray.config import EngineConfig
from nat_ray.react import CONTEXT_OVERFLOW, Generation, Sampling

log = logging.getLogger(__name__)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def on_gpu(config: EngineConfig) -> bool:
    """Whether this engine config resolves to CUDA on this machine."""
    return config.device == "cuda" or (config.device == "auto" and cuda_available())


def cpu_threads_per_engine(engines: int) -> int:
    """OpenMP threads each of ``engines`` CPU vLLM engines on this machine should compute with.

    A CPU engine computes with exactly its OpenMP threads, and Ray sets an actor's
    ``OMP_NUM_THREADS`` to the CPUs it reserves, so the rollout stage sizes a CPU engine actor's
    reservation from this: the machine's cores, shared.
    """
    return max(1, (os.cpu_count() or 1) // engines)


SMALL_MACHINE_CORES = 4


def cpu_reserved_cores(cores: int | None = None) -> int:
    """Cores a CPU vLLM engine in multiprocess mode should leave to its scheduler process.

    vLLM keeps one core out of the model's OpenMP threads for the engine-core process, which polls
    while requests run. On a 2-core machine that halves the model's compute; letting the scheduler
    share both cores measured +25-30% requests/s on Serve's agent route (both one client and 32).
    On a larger machine one core is a small share, and an OpenMP thread that has to share its
    core with the scheduler stalls every other thread at each barrier, so vLLM's default stays.
    """
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return 0 if cores <= SMALL_MACHINE_CORES else 1


def render_prompt_ids(tokenizer, conversation: list[dict]) -> list[int]:
    """Token ids the model sees before its next turn (chat template + generation prompt)."""
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here; 4.x a plain list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# vLLM engine arguments for its CPU build, measured on the 2-core machine (issue 6's benchmark):
# - prefix caching reuses only whole KV blocks, and the CPU default of 128 tokens a block makes
#   every agent turn prefill again up to 127 tokens of its own conversation; 32 (the smallest
#   size the CPU backend runs well) made the agent loop 20% faster (52 -> 62 tokens/s);
# - the CPU build kills its engine when a seeded request shares a step with a chunked prefill
#   ("CPU Generator does not use offset"), and every agent turn is seeded.
CPU_ENGINE_DEFAULTS = {"block_size": 32, "enable_chunked_prefill": False}

# On CPU, vLLM by default runs its model in a worker process of its own and keeps one core for
# the engine-core (scheduler) process; on a machine with two cores the model then ran on one
# thread. With ``vllm.LLM``'s engine core and model in the caller, the same 64 prompts x 48
# tokens took 24 s instead of 46 s here. (Serve's engine is not helped by this: ray.serve.llm
# asks for the multiprocess executor on CPU, which keeps the worker and the reserved core.)
CPU_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


class VLLMEngine:
    """An in-process ``vllm.LLM`` that answers a whole agent turn in one ``generate`` call.

    Create it under ``if __name__ == "__main__":`` (or inside a Ray actor): vLLM starts worker
    processes with spawn.
    """

    def __init__(self, config: EngineConfig) -> None:
        from nat_ray.models import resolve_model

        self.config = config
        self.model_path = resolve_model(config.model)
        gpu = on_gpu(config)
        if not gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(config.kv_cache_gb))))
        import vllm

        kwargs = dict(
            model=self.model_path,
            dtype=config.dtype if config.dtype != "auto" else ("bfloat16" if gpu else "float32"),
            max_model_len=config.max_model_len,
            enforce_eager=(not gpu) if config.enforce_eager is None else config.enforce_eager,
            enable_prefix_caching=config.enable_prefix_caching,
            seed=config.seed,
            max_num_seqs=config.max_num_seqs,
            tensor_parallel_size=config.tensor_parallel_size,
        )
        if gpu:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        else:
            kwargs.update(CPU_ENGINE_DEFAULTS)
        if config.lora:
            kwargs.update(enable_lora=True, max_lora_rank=config.max_lora_rank)
        kwargs.update(config.extra)
        log.info("starting vLLM on %s (%s)", self.model_path, "GPU" if gpu else "CPU")
        with _environ({} if gpu else CPU_ENGINE_ENV):
            self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._vllm = vllm
        from vllm.sampling_params import RequestOutputKind

        self._final_only = RequestOutputKind.FINAL_ONLY
        self._request_ids = itertools.count()
        self._finished: list[tuple[str, Generation]] = []

    def submit(self, conversation: list[dict], sampling: Sampling, lora_request=None) -> str:
        """Start one generation now (the stepper's streaming mode); see :meth:`poll`."""
        request_id = f"nat-{next(self._request_ids)}"
        ids = render_prompt_ids(self.tokenizer, conversation)
        overflow = self._overflow(ids)
        if overflow is not None:
            self._finished.append((request_id, overflow))
            return request_id
        params = self._params(sampling, min(sampling.max_tokens, self.config.max_model_len - len(ids)))
        params.output_kind = self._final_only  # only the finished output, not every token
        self.llm.llm_engine.add_request(
            request_id, {"prompt_token_ids": ids}, params, lora_request=lora_request
        )
        return request_id

    def poll(self) -> list[tuple[str, Generation]]:
        """Run one engine scheduler step; return the generations that finished in it."""
        done, self._finished = self._finished, []
        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done.append((out.request_id, _to_generation(out)))
        return done

    def _overflow(self, ids: list[int]) -> Generation | None:
        if self.config.max_model_len - len(ids) >= 16:  # room for at least a short Thought and Action
            return None
        return Generation(
            "",
            prompt_tokens=len(ids),
            finish_reason=CONTEXT_OVERFLOW,
            error=f"prompt of {len(ids)} tokens leaves no room in max_model_len={self.config.max_model_len}",
        )

    def close(self) -> None:
        """Stop vLLM's engine process now rather than at interpreter exit."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def _params(self, s: Sampling, max_tokens: int):
        return self._vllm.SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p if s.temperature > 0 else 1.0,
            max_tokens=max_tokens,
            seed=s.seed,
            stop=list(s.stop),
        )

    def generate(
        self, conversations: Sequence[list[dict]], sampling: Sequence[Sampling], lora_request=None
    ) -> list[Generation]:
        """One assistant turn per conversation; a conversation that no longer fits gets ``context_overflow``."""
        results: list[Generation | None] = [None] * len(conversations)
        prompts, params, where = [], [], []
        for i, (conv, s) in enumerate(zip(conversations, sampling)):
            ids = render_prompt_ids(self.tokenizer, conv)
            results[i] = self._overflow(ids)
            if results[i] is None:
                prompts.append({"prompt_token_ids": ids})
                params.append(self._params(s, min(s.max_tokens, self.config.max_model_len - len(ids))))
                where.append(i)
        if prompts:
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)
            for i, out in zip(where, outputs):
                results[i] = _to_generation(out)
        return [r for r in results if r is not None]


@contextlib.contextmanager
def _environ(overrides: dict[str, str]):
    """Set variables the user has not set, for vLLM's start-up only.

    vLLM reads them while it builds the engine; restoring them keeps them out of processes this
    one starts later (a local Ray cluster inherits the driver's environment), which set their own.
    """
    added = [key for key in overrides if key not in os.environ]
    for key in added:
        os.environ[key] = overrides[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _to_generation(out) -> Generation:
    completion = out.outputs[0]
    return Generation(
        completion.text,
        prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=len(completion.token_ids),
        finish_reason=completion.finish_reason or "stop",
    )
