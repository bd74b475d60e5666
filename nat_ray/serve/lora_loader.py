"""ray.serve.llm's dynamic LoRA loading, from a folder on this machine as well as object storage.

ray.serve.llm loads adapters on demand (``LLMConfig.lora_config``: a request for model
``<base>:<adapter>`` is routed with Serve's model multiplexing, the replica keeps an LRU of
``max_num_adapters_per_replica`` adapters, and vLLM loads each one with a LoRA request), but it
fetches them only from object storage (``dynamic_lora_loading_path`` must be ``s3://``, ``gs://``,
...). For a local ``serve.lora_dir`` the replica is given this loader instead of ray's
``LoraModelLoader`` (its ``model_downloader`` hook): the same cache, LRU and vLLM path, with the
adapter folder copied from ``lora_dir`` rather than downloaded.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

from fastapi import HTTPException
from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.common.utils.lora_utils import get_lora_id
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

from nat_ray.serve.adapters import ADAPTER_CONFIG, local_adapter_dir


class LocalLoraLoader(LoraModelLoader):
    """ray's adapter loader with ``lora_dir`` a local folder (built with ``functools.partial``)."""

    def __init__(self, *, lora_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lora_dir = lora_dir

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
        if lora_model_id in self.disk_cache:
            return self.disk_cache[lora_model_id]
        name = get_lora_id(lora_model_id)
        source = local_adapter_dir(self.lora_dir, name)  # checks the name again: the replica trusts no one
        if source is None:
            raise HTTPException(404, f"adapter {name!r} is not in {self.lora_dir}")
        # A private copy: republishing the folder later cannot change an adapter vLLM has loaded.
        local_path = await asyncio.to_thread(self._copy, lora_model_id, str(source))
        config = json.loads((source / ADAPTER_CONFIG).read_text())
        disk = DiskMultiplexConfig(
            model_id=lora_model_id,
            max_total_tokens=config.get("max_length"),
            local_path=local_path,
            lora_assigned_int_id=global_id_manager.next(),
        )
        self.disk_cache[lora_model_id] = disk
        return disk

    def _copy(self, lora_model_id: str, source: str) -> str:
        # ray's cache folder is shared by every server on the machine and keyed by adapter name
        # alone; this replica's copy is its own, and a republished adapter replaces it whole.
        target = Path(self.lora_root) / f"replica-{os.getpid()}" / get_lora_id(lora_model_id)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        return str(target)
