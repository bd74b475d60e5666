"""ray.serve.llm's dynamic LoRA loading, from ``serve.lora_dir`` through nat_ray's storage layer.

ray.serve.llm loads adapters on demand (``LLMConfig.lora_config``: a request for model
``<base>:<adapter>`` is routed with Serve's model multiplexing, the replica keeps an LRU of
``max_num_adapters_per_replica`` adapters, and vLLM loads each one with a LoRA request). Its own
downloader reads only object storage, with its own client; the replica is given this loader instead
(its ``model_downloader`` hook): the same cache, LRU and vLLM path, with the adapter folder copied
from ``lora_dir`` (a folder here or a bucket prefix, :mod:`nat_ray.core.storage`), so publishing,
listing and loading all read the same place the same way.
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

from nat_ray.core.storage import Store, apply_env
from nat_ray.serve.adapters import ADAPTER_CONFIG, has_adapter


class StoreLoraLoader(LoraModelLoader):
    """ray's adapter loader reading ``lora_dir`` (built with ``functools.partial``; ``storage_env``: the
    driver's object-storage settings, :func:`nat_ray.core.storage.storage_env`)."""

    def __init__(self, *, lora_dir: str, storage_env: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        apply_env(storage_env)
        self.lora_dir = lora_dir

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
        if lora_model_id in self.disk_cache:
            return self.disk_cache[lora_model_id]
        name = get_lora_id(lora_model_id)
        # has_adapter checks the name again: the replica trusts no one.
        if not await asyncio.to_thread(has_adapter, self.lora_dir, name):
            raise HTTPException(404, f"adapter {name!r} is not in {self.lora_dir}")
        # A private copy: republishing the folder later cannot change an adapter vLLM has loaded.
        local_path = await asyncio.to_thread(self._copy, lora_model_id, name)
        config = json.loads((Path(local_path) / ADAPTER_CONFIG).read_text())
        disk = DiskMultiplexConfig(
            model_id=lora_model_id,
            max_total_tokens=config.get("max_length"),
            local_path=local_path,
            lora_assigned_int_id=global_id_manager.next(),
        )
        self.disk_cache[lora_model_id] = disk
        return disk

    def _copy(self, lora_model_id: str, name: str) -> str:
        # ray's cache folder is shared by every server on the machine and keyed by adapter name
        # alone; this replica's copy is its own, and a republished adapter replaces it whole.
        target = Path(self.lora_root) / f"replica-{os.getpid()}" / get_lora_id(lora_model_id)
        shutil.rmtree(target, ignore_errors=True)
        Store(self.lora_dir).download_dir(name, target)
        return str(target)
