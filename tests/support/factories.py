"""A user-style model factory for registry tests: builds the Llama decoder and records the
ranks it was given (to the file named by $SHARDLINE_FACTORY_LOG) so a test can check that
each spawned worker saw its real ParallelContext."""

from __future__ import annotations

import json
import os
from typing import Any

from shardline.model.llama import LlamaForCausalLM
from shardline.model.parallel_context import ParallelContext


def recording_llama_factory(model_config: Any, parallel_context: ParallelContext) -> LlamaForCausalLM:
    """Factory target for `ModelRegistry.register_model` (module-level, so workers import it)."""
    log = os.environ.get("SHARDLINE_FACTORY_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({
                "pid": os.getpid(),
                "tp_rank": parallel_context.get_tensor_parallel_rank(),
                "tp_size": parallel_context.get_tensor_parallel_world_size(),
            }) + "\n")  # fmt: skip
    return LlamaForCausalLM(model_config, parallel_context)
