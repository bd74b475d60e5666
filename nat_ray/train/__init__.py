"""Stage 2, training: Ray Train + DeepSpeed fine-tuning on NAT data (full or LoRA).

trajectory Parquet -> NAT examples -> token ids and loss masks -> optional packing -> a fixed,
seeded per-rank schedule (:mod:`.data`) -> ``TorchTrainer`` workers (:mod:`.worker`) running the
DeepSpeed step (:mod:`.step`) -> checkpoints through ``ray.train.report`` -> Hugging Face export
(:mod:`.export`). :mod:`.run` checks the inputs, resumes a run of the same name and summarizes it.

:mod:`.step` and :mod:`.data` import neither Ray nor DeepSpeed at module level, so the step runs
in a plain process (``benchmarks/train_step.py``); this file imports nothing.
"""
