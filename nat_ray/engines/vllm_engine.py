"""vLLM behind the :class:`nat_ray.react.ChatEngine` interface: one batched call per agent turn.

The conversation is rendered with the model's own chat template and tokenized here, not by vLLM,
so that (a) a prompt that no longer fits the context becomes a ``context_overflow`` generation for
that one episode instead of an exception that kills the batch, and (b) training renders the same
token ids (see :mod:`nat_ray.nat_data`). Prefix caching lets turn t+1 reuse turn t's KV cache.

On a machine without CUDA this runs vLLM's CPU build, with the engine arguments of
:mod:`nat_ray.engines.vllm_args` (float32, eager mode, a KV cache of ``engine.kv_cache_gb``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Sequence

from nat_ray.config import EngineConfig
from nat_ray.engines.vllm_args import CPU_IN_PROCESS_ENV, engine_kwargs, kv_cache_env, on_gpu
from nat_ray.react import CONTEXT_OVERFLOW, Generation, Sampling

log = logging.getLogger(__name__)


def render_prompt_ids(tokenizer, conversation: list[dict]) -> list[int]:
    """Token ids the model sees before its next turn (chat template + generation prompt)."""
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here; 4.x a plain list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class VLLMEngine:
    """An in-process ``vllm.LLM`` that answers a whole agent turn in one ``generate`` call.

    Create it under ``if __name__ == "__main__":`` (or inside a Ray actor): vLLM starts worker
    processes with spawn.

    Args:
        config: the ``engine`` section.
        lora_path: a peft adapter every request goes through (vLLM starts with LoRA enabled);
            None: the base model.
    """

    def __init__(self, config: EngineConfig, lora_path: str | None = None) -> None:
        from nat_ray.models import resolve_model

        self.config = config
        self.model_path = resolve_model(config.model)
        gpu = on_gpu(config)
        if not gpu:
            for key, value in kv_cache_env(config).items():
                os.environ.setdefault(key, value)
        import vllm

        kwargs = {"model": self.model_path, **engine_kwargs(config, gpu, lora=lora_path is not None)}
        log.info("starting vLLM on %s (%s)", self.model_path, "GPU" if gpu else "CPU")
        with _environ({} if gpu else CPU_IN_PROCESS_ENV):
            self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._vllm = vllm
        from vllm.sampling_params import RequestOutputKind

        self._final_only = RequestOutputKind.FINAL_ONLY
        self._request_ids = itertools.count()
        self._finished: list[tuple[str, Generation]] = []
        self.lora_request = None
        if lora_path is not None:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("nat-lora", 1, lora_path)

    def submit(self, conversation: list[dict], sampling: Sampling) -> str:
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
            request_id, {"prompt_token_ids": ids}, params, lora_request=self.lora_request
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

    def generate(self, conversations: Sequence[list[dict]], sampling: Sequence[Sampling]) -> list[Generation]:
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
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
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
