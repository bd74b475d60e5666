"""Start-up of the LLM replica: skip ray.serve.llm's per-node model download for a model on disk.

Before it starts vLLM, ray.serve.llm runs one Ray task on every node of the replica's placement
group to fetch the model (``initialize_node``). For a model that is already a folder on the node
(every model this project serves: the embedded default, an export, a checkpoint on shared storage)
that task fetches nothing, yet each one is a new worker process with the replica's runtime
environment, importing torch and transformers: about 13 s on two cores, paid at every replica start,
including the restart after a replica is lost. The callback skips it when the model is a folder
here; a hub id or an object-storage URI still goes through the download.
"""

from __future__ import annotations

from pathlib import Path

# ray.serve.llm takes the callback class in LLMConfig.callback_config but exports no base class for it.
from ray.llm._internal.common.callbacks.base import CallbackBase


class LocalModelCallback(CallbackBase):
    """Turns the per-node download off (``ctx.run_init_node``) when the model is a local folder."""

    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        if isinstance(source, str) and Path(source).is_dir():
            self.ctx.run_init_node = False
