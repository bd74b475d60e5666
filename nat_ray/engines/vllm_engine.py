"""vLLM behind the :class:`nat_ray.core.react.ChatEngine` interface: one batched call per agent turn.

The conversation is rendered with the model's own chat template and tokenized here, not by vLLM,
so that (a) a prompt that no longer fits the context becomes a ``context_overflow`` generation for
that one episode instead of an exception that kills the batch, and (b) training renders the same
token ids (see :mod:`nat_ray.core.nat_data`). Prefix caching lets turn t+1 reuse turn t's KV cache.

On a machine without CUDA this runs vLLM's CPU build, with the engine arguments of
:mod:`nat_ray.engines.vllm_args` (float32, eager mode, a KV cache of ``engine.kv_cache_gb``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import weakref
from collections.abc import Sequence

from nat_ray.config import EngineConfig
from nat_ray.core.masks import chat_ids
from nat_ray.core.react import CONTEXT_OVERFLOW, Generation, Sampling
from nat_ray.engines.vllm_args import CPU_IN_PROCESS_ENV, engine_kwargs, kv_cache_env, on_gpu, warn_lora_rank
from nat_ray.errors import ModelError
from nat_ray.models import check_lora, resolve_model

log = logging.getLogger(__name__)

_OPEN: weakref.WeakSet = weakref.WeakSet()  # in-process engines not yet closed


def render_prompt_ids(tokenizer, conversation: list[dict]) -> list[int]:
    """Token ids the model sees before its next turn (chat template + generation prompt).

    The one rendering training uses too (:func:`nat_ray.core.masks.chat_ids`), so a trained prompt
    and a sampled one cannot drift apart.
    """
    return chat_ids(tokenizer, conversation)


class VLLMEngine:
    """An in-process ``vllm.LLM`` that answers a whole agent turn in one ``generate`` call.

    Create it under ``if __name__ == "__main__":`` (or inside a Ray actor): vLLM starts worker
    processes with spawn.

    Args:
        config: the ``engine`` section.
        lora_path: a peft adapter every request goes through (vLLM starts with LoRA enabled);
            None: the base model. With LoRA enabled (an adapter, or ``engine.lora``),
            :meth:`load_adapter` switches to another adapter without restarting the engine.
    """

    def __init__(self, config: EngineConfig, lora_path: str | None = None) -> None:

        self.config = config
        self.model_path = resolve_model(config.model)
        gpu = on_gpu(config)
        if not gpu:
            for key, value in kv_cache_env(config).items():
                os.environ.setdefault(key, value)
        import vllm

        kwargs = {"model": self.model_path, **engine_kwargs(config, gpu, lora=lora_path is not None)}
        self.lora_enabled = bool(kwargs.get("enable_lora"))
        self._lora_ids = itertools.count(1)
        log.info("starting vLLM on %s (%s)", self.model_path, "GPU" if gpu else "CPU")
        with _environ({} if gpu else CPU_IN_PROCESS_ENV):
            self.llm = vllm.LLM(**kwargs)
        _OPEN.add(self)
        self.tokenizer = self.llm.get_tokenizer()
        self._vllm = vllm
        from vllm.sampling_params import RequestOutputKind

        self._final_only = RequestOutputKind.FINAL_ONLY
        self._request_ids = itertools.count()
        self._finished: list[tuple[str, Generation]] = []
        self.lora_request = None
        if lora_path is not None:
            self.load_adapter(lora_path)

    def load_adapter(self, path: str | None) -> None:
        """Send every later generation through the peft adapter at ``path`` (None: the base model).

        No restart: vLLM loads the adapter on the next request. Each call takes a fresh LoRA id,
        because vLLM caches adapters by id: an adapter republished under the same folder (the next
        round's) must be read again, not served from the cache.

        Raises:
            ModelError: the engine was started without LoRA, or ``path`` is not a peft adapter.
        """

        if path is None:
            self.lora_request = None
            return
        if not self.lora_enabled:
            raise ModelError(
                "this vLLM engine was started without LoRA; start it with engine.lora=true "
                "(or an adapter) to load adapters later"
            )
        from vllm.lora.request import LoRARequest

        lora_id = next(self._lora_ids)
        adapter = check_lora(path)  # a training export's adapter/ folder, where path is the export
        self.lora_request = LoRARequest(f"nat-lora-{lora_id}", lora_id, adapter)
        # Once per engine: a loop's later adapters have the same rank, or (stacked) a larger one.
        if lora_id == 1:
            warn_lora_rank(self.config, on_gpu(self.config), adapter)

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
            prompt_ids=tuple(ids),
        )

    def close(self) -> None:
        """Stop vLLM's engine now rather than at interpreter exit.

        On the CPU build the engine runs in this process, and vLLM's shutdown tears down its
        process-wide distributed state: another in-process engine that is still open cannot
        generate after that. Give each engine a process of its own (a Ray actor or task) when
        several must live and end independently.
        """
        llm, self.llm = getattr(self, "llm", None), None
        _OPEN.discard(self)
        if llm is None:
            return
        if len(_OPEN):
            log.warning(
                "closing one of %d in-process vLLM engines: vLLM's shutdown ends its process-wide state, "
                "so the others in this process can no longer generate",
                len(_OPEN) + 1,
            )
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
    """The finished request as a :class:`Generation`, with the exact token ids it read and sampled.

    vLLM's ``token_ids`` run up to and including the token that completed a stop string (or the
    end-of-sequence token), while ``text`` stops before the stop string; training trims the ids
    back to the text (:func:`nat_ray.core.masks.sampled_content_length`).
    """
    completion = out.outputs[0]
    return Generation(
        completion.text,
        prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=len(completion.token_ids),
        finish_reason=completion.finish_reason or "stop",
        prompt_ids=tuple(out.prompt_token_ids),
        completion_ids=tuple(completion.token_ids),
    )
