"""WorkerConfig: everything one worker rank needs, as msgpack-native values."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerConfig:
    """Configuration of one worker rank (sent as a dict through the spawn args or InitWorker).

    ``rank = pp_rank * tp_size + tp_rank`` inside one DP replica's worker group.
    ``dist_backend`` None picks gloo on CPU and nccl on CUDA. ``num_kv_blocks`` None sizes the
    KV cache from ``kv_cache_memory_bytes`` (None: one full-length sequence but at least
    256 MiB on CPU; on CUDA what ``gpu_memory_utilization`` of the device leaves after
    loading). ``num_threads`` None gives each rank ``cpu_count // world_size`` torch threads (at least 1). ``plugins`` are ``"module:function"``
    names imported and called before loading, so registrations made by the user's code
    (``ModelRegistry.register_model``) exist in the worker process too.
    """

    rank: int
    world_size: int
    channels_address: dict[str, Any]
    model_path: str
    tp_size: int = 1
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    dist_init_method: str | None = None
    dist_backend: str | None = None
    model_arch: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    kv_cache_dtype: str = "auto"
    """The KV cache's torch dtype name ("float16", "float8_e4m3fn", ...), or "auto": the model's
    (`EngineConfig.kv_cache_dtype`, mapped by `engine.config.KV_CACHE_DTYPES`)."""
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    seed: int = 0
    parent_pid: int | None = None
    heartbeat_interval: float = 1.0
    num_threads: int | None = None
    cuda_graphs: bool = True
    enable_expert_parallel: bool = False
    """MoE experts spread over the TP ranks (`EngineConfig.enable_expert_parallel`)."""
    plugins: list[str] = field(default_factory=list)
    model_specs: dict[str, str] = field(default_factory=dict)
    """The engine process's `ModelRegistry.specs()`: user registrations, replayed here."""

    def __post_init__(self) -> None:
        if self.world_size != self.tp_size * self.pp_size:
            raise ValueError(
                f"world_size {self.world_size} != tp_size {self.tp_size} * pp_size {self.pp_size}"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, {self.world_size})")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {self.heartbeat_interval}")
        if self.world_size > 1 and not self.dist_init_method:
            raise ValueError("dist_init_method is required when world_size > 1")

    @property
    def tp_rank(self) -> int:
        """This rank's position inside its tensor-parallel group."""
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return self.rank // self.tp_size

    @property
    def is_output_rank(self) -> bool:
        """tp rank 0 of the last pipeline stage samples and answers StepResult."""
        return self.tp_rank == 0 and self.pp_rank == self.pp_size - 1

    @property
    def torch_threads(self) -> int:
        """Threads for torch's intra-op pool on this rank."""
        if self.num_threads is not None:
            return max(1, self.num_threads)
        return max(1, (os.cpu_count() or 1) // self.world_size)

    def to_dict(self) -> dict[str, Any]:
        """The config as msgpack-native values (dicts, lists, str, int, float, None)."""
        out = dataclasses.asdict(self)
        out["plugins"] = list(self.plugins)
        out["model_specs"] = dict(self.model_specs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown WorkerConfig keys: {unknown}")
        values = dict(data)
        if "plugins" in values:
            values["plugins"] = list(values["plugins"])
        return cls(**values)
