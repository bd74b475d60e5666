"""transformers ``generate`` behind the :class:`nat_ray.core.react.ChatEngine` interface: the NAT repo's way.

One conversation after another, batch size 1, the whole prompt encoded anew each turn (spec §8 #1).
This is the baseline the benchmarks measure the batched vLLM engine against, so it does what the
NAT repo does and nothing slower: no padding, a KV cache within each call, no gradients.

Its answers follow the vLLM engine's contract so the two are interchangeable: the same prompt
token ids (:func:`render_prompt_ids`), the same ``context_overflow`` rule, stop strings looked for
in the generated text only and cut from it (HF keeps them, vLLM drops them), and the same sampling
semantics (no top-k).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from nat_ray.config import EngineConfig
from nat_ray.core.react import CONTEXT_OVERFLOW, Generation, Sampling
from nat_ray.engines.vllm_args import on_gpu
from nat_ray.engines.vllm_engine import render_prompt_ids
from nat_ray.models import resolve_model

log = logging.getLogger(__name__)

MIN_ROOM = 16  # the vLLM engine's rule: fewer free tokens than this cannot hold a Thought and an Action


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string (excluded), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i != -1]
    return (text[: min(cuts)], True) if cuts else (text, False)


def stop_in_new_text(tokenizer, stops: Sequence[str], prompt_len: int):
    """transformers stopping criteria that end generation once a stop string is in the new text.

    transformers' own ``stop_strings`` match the end of the whole sequence, prompt included: the
    chat prompt ends in ``"assistant\n"``, so a turn that opens with ``"Observation:"`` matched
    ``"\nObservation:"`` at once and ended after 3 tokens, where vLLM (which looks at the output
    only) goes on. On 64 sampled first turns that made 12 HF turns end empty, and HF episodes
    shorter and more often unparsable than vLLM's on the same questions.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopInNewText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            hits = [any(stop in text for stop in stops) for text in texts]
            return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopInNewText()])


class HFEngine:
    """A transformers causal LM that answers conversations one at a time.

    Args:
        config: ``model`` (resolved with :func:`nat_ray.models.resolve_model`), ``device``,
            ``dtype`` (``auto`` = float32 on CPU, bfloat16 on CUDA), ``max_model_len`` and
            ``seed`` (seeds torch once, like vLLM's engine seed) are read.
    """

    def __init__(self, config: EngineConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.model_path = resolve_model(config.model)
        gpu = on_gpu(config)
        self.device = torch.device("cuda" if gpu else "cpu")
        dtype_name = config.dtype if config.dtype != "auto" else ("bfloat16" if gpu else "float32")
        log.info("loading %s with transformers on %s (%s)", self.model_path, self.device, dtype_name)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, dtype_name))
        self.model.to(self.device).eval()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = {self.tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos])
        torch.manual_seed(config.seed)
        self._torch = torch

    def close(self) -> None:
        """Drop the model (and free GPU memory) now rather than at interpreter exit."""
        self.model = None
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    def generate(self, conversations: Sequence[list[dict]], sampling: Sequence[Sampling]) -> list[Generation]:
        """One assistant turn per conversation, in order; a conversation that no longer fits gets ``context_overflow``."""
        if len(conversations) != len(sampling):
            raise ValueError(f"{len(conversations)} conversations but {len(sampling)} sampling settings")
        return [self._generate_one(conv, s) for conv, s in zip(conversations, sampling)]

    def _generate_one(self, conversation: list[dict], s: Sampling) -> Generation:
        torch = self._torch
        ids = render_prompt_ids(self.tokenizer, conversation)
        room = self.config.max_model_len - len(ids)
        if room < MIN_ROOM:
            return Generation(
                "",
                prompt_tokens=len(ids),
                finish_reason=CONTEXT_OVERFLOW,
                error=f"prompt of {len(ids)} tokens leaves no room in max_model_len={self.config.max_model_len}",
            )
        max_new = min(s.max_tokens, room)
        sample = s.temperature > 0
        kwargs: dict = dict(max_new_tokens=max_new, do_sample=sample, pad_token_id=self.pad_token_id)
        if sample:
            # top_k=0 switches off transformers' default top-k of 50: vLLM samples from the full
            # distribution, and the two engines must draw from the same one.
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
        stops = [x for x in s.stop if x]
        if stops:
            kwargs["stopping_criteria"] = stop_in_new_text(self.tokenizer, stops, len(ids))
        input_ids = torch.tensor([ids], device=self.device)  # (1, T)
        if s.seed is not None:
            torch.manual_seed(s.seed)
        try:
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs
                )  # (1, T + new)
        except torch.OutOfMemoryError as err:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("generation ran out of memory on a %d-token prompt: %s", len(ids), err)
            return Generation(
                "", prompt_tokens=len(ids), finish_reason="error", error=f"out of memory: {err}"
            )
        new_tokens = out[0, len(ids) :].tolist()
        text, stopped = cut_at_stop(self.tokenizer.decode(new_tokens, skip_special_tokens=True), stops)
        # A stop string ends the turn as "stop" even when it came with the last allowed token (as in vLLM).
        hit_length = len(new_tokens) >= max_new and new_tokens[-1] not in self.eos_token_ids
        return Generation(
            text,
            prompt_tokens=len(ids),
            completion_tokens=len(new_tokens),
            finish_reason="length" if hit_length and not stopped else "stop",
            prompt_ids=tuple(ids),
            completion_ids=tuple(new_tokens),  # through the stop string, as vLLM's ids are
        )
