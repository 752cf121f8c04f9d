"""A rank's packed linear weights, kept on disk in their final layout between starts.

Packing (`model.packed_linear.pack_linear_weights`) finds GGUF's integer blocks again in the
float32 weights and lays them out in panels: for SmolLM2 1.4-10 s of a worker's start-up on a
2-core machine, and it needs every float32 weight read first (540 MB). The first start of a
rank writes the result here; every later start reads the packed bytes back (94 MB) into memory
advised for huge pages and never reads, or keeps, the float32 copies of those weights
(`load_model(..., skip_weights=...)`, `packed_linear.drop_float32_weights`).

An entry is `$SHARDLINE_HOME/packed/<key>/` with `weights.bin` (every packed weight, one after
the other) and `index.json` (the layout, written last, so its presence means complete). The key
covers everything the bytes depend on: the checkpoint's files (name, size, modification time)
and config.json's content, the architecture and dtype, this rank's tensor- and pipeline-parallel
coordinates, the packing mode and the layout version. A changed checkpoint gets a new key; an
entry that does not match the model (a layer missing, a wrong size) is ignored and rewritten.
`SHARDLINE_PACKED_CACHE=off` turns the cache off (packing then runs at every start).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from shardline.model.env import env_choice
from shardline.model.memory import huge_page_zeros

logger = logging.getLogger(__name__)

ENV = "SHARDLINE_PACKED_CACHE"
MODES = ("auto", "off")
LAYOUT_VERSION = 2  # bump when pack_blocks / pack_weight change what they write (2: K-quant panels)
INDEX = "index.json"
WEIGHTS = "weights.bin"


def _home() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SHARDLINE_HOME") or "~/.cache/shardline").expanduser()


def checkpoint_files(model_path: str) -> list[pathlib.Path]:
    """The files a model's weights come from (a GGUF file, or the directory's weight files)."""
    path = pathlib.Path(model_path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".gguf") or p.name in ("config.json", "model.safetensors.index.json")))


def cache_key(model_path: str, *, architecture: str, dtype: torch.dtype, tp: tuple[int, int],
              pp: tuple[int, int], mode: str) -> str:
    """A digest of everything the packed bytes depend on (see the module docstring)."""
    digest = hashlib.sha256()
    for f in checkpoint_files(model_path):
        st = f.stat()
        digest.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        if f.name == "config.json":
            digest.update(f.read_bytes())
    digest.update(json.dumps([LAYOUT_VERSION, architecture, str(dtype), tp, pp, mode]).encode())
    return digest.hexdigest()[:32]


class PackedCache:
    """One rank's entry: `lookup` before the weights load, `load` or `save` after."""

    def __init__(self, key: str, root: pathlib.Path | None = None) -> None:
        self.directory = (root or _home() / "packed") / key

    @classmethod
    def for_rank(cls, model_path: str, **key: Any) -> PackedCache | None:
        """The cache entry for this rank's weights, or None when the cache is off."""
        if env_choice(ENV, MODES) == "off":
            return None
        try:
            return cls(cache_key(model_path, **key))
        except OSError as exc:  # an unreadable checkpoint fails later, with the loader's error
            logger.debug("packed-weight cache unavailable: %s", exc)
            return None

    def lookup(self) -> dict[str, Any] | None:
        """The entry's index, when a complete entry exists."""
        try:
            index = json.loads((self.directory / INDEX).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(index, dict) or index.get("version") != LAYOUT_VERSION:
            return None
        return index

    @staticmethod
    def weight_names(index: dict[str, Any]) -> set[str]:
        """Parameter names whose float32 values the entry makes unnecessary (their modules'
        `.weight`, except weights shared with another module, which the index marks)."""
        return {f"{name}.weight" for name, entry in index["layers"].items() if not entry["shared"]}

    def load(self, model: nn.Module, index: dict[str, Any]) -> int | None:
        """Give each layer of the index its packed weight; bytes read, or None (nothing set)
        when the entry does not fit this model."""
        modules = dict(model.named_modules())
        layers = index["layers"]
        if any(name not in modules or not hasattr(modules[name], "packed_weight") for name in layers):
            logger.warning("packed-weight cache %s does not match the model; repacking", self.directory)
            return None
        total = int(index["nbytes"])
        buffer = huge_page_zeros((total,), torch.uint8)
        try:
            with open(self.directory / WEIGHTS, "rb") as f:
                got = f.readinto(memoryview(buffer.numpy()))  # type: ignore[arg-type]
        except OSError as exc:
            logger.warning("packed-weight cache %s unreadable (%s); repacking", self.directory, exc)
            return None
        if got != total:
            logger.warning("packed-weight cache %s is truncated; repacking", self.directory)
            return None
        for name, entry in layers.items():
            dtype = getattr(torch, entry["dtype"])
            view = buffer[entry["offset"] : entry["offset"] + entry["nbytes"]]
            modules[name].packed_weight = view.view(dtype).view(entry["shape"])
        return total

    def save(self, model: nn.Module) -> None:
        """Write every packed weight of `model` (best effort: a failure is logged, not raised)."""
        from shardline.model.packed_linear import shared_parameter_ids

        shared = shared_parameter_ids(model)
        layers: dict[str, Any] = {}
        offset = 0
        tensors = []
        for name, m in model.named_modules():
            packed = getattr(m, "packed_weight", None)
            if not isinstance(packed, torch.Tensor):
                continue
            nbytes = packed.numel() * packed.element_size()
            layers[name] = {"dtype": str(packed.dtype).removeprefix("torch."), "shape": list(packed.shape),
                            "offset": offset, "nbytes": nbytes,
                            "shared": id(getattr(m, "weight", None)) in shared}
            tensors.append(packed)
            offset += nbytes
        if not layers:
            return
        index = {"version": LAYOUT_VERSION, "nbytes": offset, "layers": layers}
        try:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.", dir=self.directory.parent))
            try:
                with open(tmp / WEIGHTS, "wb") as f:
                    for t in tensors:
                        f.write(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()))  # type: ignore[arg-type]
                (tmp / INDEX).write_text(json.dumps(index))
                tmp.chmod(0o755)
                if self.directory.exists():  # a damaged entry: set it aside, then swap
                    old = self.directory.with_name(f".{self.directory.name}.{os.getpid()}.old")
                    os.replace(self.directory, old)
                    shutil.rmtree(old, ignore_errors=True)
                try:
                    os.replace(tmp, self.directory)
                except OSError:  # another process wrote it meanwhile: theirs is as good
                    pass
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            logger.warning("could not write the packed-weight cache %s: %s", self.directory, exc)
