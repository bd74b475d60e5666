"""Export of the trained model as Hugging Face checkpoints that transformers, peft and vLLM load.

All ranks join the gather of the weights (ZeRO-3 shards them); rank 0 builds fresh HF models from
the gathered state and writes ``export/model`` (the full model, or with LoRA the merged one) and,
for LoRA, ``export/adapter`` (the peft adapter), each with the tokenizer and its chat template.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

from nat_ray import safe_files
from nat_ray.config import TrainConfig
from nat_ray.errors import ConfigError
from nat_ray.train.data import load_tokenizer
from nat_ray.train.step import lora_config, resolve_precision, torch_dtype

log = logging.getLogger(__name__)


def gathered_state_dict(module, only_trainable: bool, rank: int) -> dict | None:
    """Full weights on rank 0 (CPU), one parameter at a time: ZeRO-3 shards are gathered collectively."""
    import deepspeed

    out = {}
    for name, param in module.named_parameters():
        if only_trainable and not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # partitioned by ZeRO-3: every rank must join the gather
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    out[name] = param.detach().to("cpu", copy=True)
        elif rank == 0:
            out[name] = param.detach().to("cpu", copy=True)
    return out if rank == 0 else None


def export_model(module, cfg: TrainConfig, model_path: str, export_dir: str, rank: int, gpu: bool) -> None:
    """Write the trained model as Hugging Face checkpoints (all ranks gather, rank 0 writes).

    Full: ``export/model``. LoRA: ``export/adapter`` (peft), and ``export/model`` merged when
    ``cfg.export_merged``. Each gets the tokenizer and its chat template. A URI ``export_dir``
    (``s3://...``) is written locally first, then copied there.
    """
    state = gathered_state_dict(module, only_trainable=cfg.mode == "lora", rank=rank)
    if rank != 0:
        return
    if "://" not in export_dir:
        write_export(state, cfg, model_path, Path(export_dir), gpu)
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory(prefix="nat-export-") as tmp:
        write_export(state, cfg, model_path, Path(tmp), gpu)
        pyarrow.fs.copy_files(tmp, export_dir)


def write_export(state: dict, cfg: TrainConfig, model_path: str, export_dir: Path, gpu: bool) -> dict:
    """Build fresh HF models from ``state`` (names as in the training module) and save them.

    Returns:
        ``{"model": path or None, "adapter": path or None}``.

    Raises:
        RuntimeError: ``state`` does not fit the model (a bug, not bad input).
    """
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(resolve_precision(cfg.precision, gpu))
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    tokenizer = load_tokenizer(model_path)
    shutil.rmtree(export_dir, ignore_errors=True)
    paths: dict[str, str | None] = {"model": None, "adapter": None}
    if cfg.mode == "lora":
        from peft import get_peft_model

        peft_model = get_peft_model(base, lora_config(cfg))
        result = peft_model.load_state_dict(state, strict=False)
        if result.unexpected_keys or any("lora_" in k for k in result.missing_keys):
            raise RuntimeError(f"LoRA export does not fit: {result}")
        adapter = export_dir / "adapter"
        peft_model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        paths["adapter"] = str(adapter)
        if cfg.export_merged:
            merged = peft_model.merge_and_unload()
            _save_full(merged, tokenizer, export_dir / "model")
            paths["model"] = str(export_dir / "model")
    else:
        result = base.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if base.config.get_text_config().tie_word_embeddings else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise RuntimeError(f"full export does not fit: {result}")
        _save_full(base, tokenizer, export_dir / "model")
        paths["model"] = str(export_dir / "model")
    (export_dir / "export.json").write_text(json.dumps({**paths, "base_model": model_path, "mode": cfg.mode}))
    log.info("exported %s", paths)
    return paths


def _save_full(model, tokenizer, out: Path) -> None:
    model.config.use_cache = True  # training turned it off; inference wants it
    model.save_pretrained(out, safe_serialization=True)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def stack_adapters(first: Path, second: Path, out: Path, base_model: str) -> Path:
    """One peft adapter on the base equal to ``first`` followed by ``second`` (trained on base + first).

    A LoRA update is ``scale * B @ A``; two of them on the same layer add up to one of rank
    r1 + r2 with ``A = [A1; A2]`` and ``B = [s1*B1, s2*B2]`` at scale 1 (``lora_alpha = rank``).
    So a continued adapter is published as an adapter of the base model, which a server can load.

    Raises:
        ConfigError: the two adapters wrap different layers, or use per-layer ranks.
    """
    import torch
    from safetensors.torch import load_file, save_file

    configs = [json.loads((p / "adapter_config.json").read_text()) for p in (first, second)]
    for p, c in zip((first, second), configs):
        if c.get("rank_pattern") or c.get("alpha_pattern"):
            raise ConfigError(f"{p}: adapters with per-layer ranks cannot be stacked")
    weights = [load_file(str(p / "adapter_model.safetensors")) for p in (first, second)]
    if set(weights[0]) != set(weights[1]):
        raise ConfigError(f"{first} and {second} wrap different layers; they cannot be stacked")
    scales = [c["lora_alpha"] / (math.sqrt(c["r"]) if c.get("use_rslora") else c["r"]) for c in configs]
    stacked = {}
    for key in weights[0]:
        if ".lora_A." in key:
            stacked[key] = torch.cat([weights[0][key], weights[1][key]], dim=0).contiguous()
        elif ".lora_B." in key:
            parts = [w[key] * s for w, s in zip(weights, scales)]
            stacked[key] = torch.cat(parts, dim=1).contiguous()
        else:
            raise ConfigError(f"{first}: unexpected adapter weight {key!r}; only LoRA A/B can be stacked")
    rank = configs[0]["r"] + configs[1]["r"]
    config = {
        **configs[1],
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "base_model_name_or_path": base_model,
    }
    with safe_files.staged_dir(out) as tmp:
        shutil.copytree(second, tmp)  # the tokenizer files travel with it
        save_file(stacked, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
