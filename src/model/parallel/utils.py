"""Size arithmetic and shard copying shared by the parallel layers."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class ShardShapeError(ValueError):
    """A checkpoint tensor (or its shard) does not have the shape the layer expects."""


class CheckpointSlice(Protocol):
    """What a weight loader needs from a checkpoint tensor: its shape and narrowed reads."""

    @property
    def shape(self) -> Any: ...

    def narrow(self, dim: int, start: int, length: int) -> Any: ...

    def materialize(self) -> Any: ...


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """`numerator // denominator`, raising a ValueError naming both when it does not divide."""
    if denominator <= 0 or numerator % denominator != 0:
        raise ValueError(
            f"{what}={numerator} cannot be split evenly across tensor_parallel_size={denominator} "
            f"({numerator} % {denominator} != 0)"
        )
    return numerator // denominator


def shape_of(loaded: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in loaded.shape)


def read(loaded: Any) -> torch.Tensor:
    """The whole tensor, read from a lazy slice if need be."""
    if isinstance(loaded, torch.Tensor):
        return loaded
    return loaded.materialize()


def read_narrow(loaded: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """Rows/columns `[start, start + length)` of `loaded` along `dim`, checked against its shape."""
    shape = shape_of(loaded)
    if dim >= len(shape) or start + length > shape[dim]:
        raise ShardShapeError(
            f"cannot take [{start}:{start + length}] along dim {dim} of a tensor of shape "
            f"{list(shape)}"
        )
    return loaded.narrow(dim, start, length)


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)` after checking the shapes agree (no silent broadcasting); a lazy `src`
    (a GGUF tensor's blocks) is read first."""
    if not isinstance(src, torch.Tensor):
        src = src.materialize()
    if tuple(dst.shape) != tuple(src.shape):
        raise ShardShapeError(f"expected shape {list(dst.shape)}, got {list(src.shape)}")
    with torch.no_grad():
        dst.copy_(src)
