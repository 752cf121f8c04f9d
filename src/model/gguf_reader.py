"""gguf-py's `GGUFReader`, without parsing a tokenizer's big metadata arrays item by item
(no torch here: the engine's process reads a GGUF's config through it)."""

from __future__ import annotations

import os
import pathlib
import re
import struct
from typing import Any

import numpy as np

from shardline.model.errors import CheckpointError

_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def gguf_files(path: str | os.PathLike[str]) -> list[str]:
    """The files of a GGUF model: `path` alone, or every part of a split model
    (`name-00001-of-0000N.gguf`, as llama.cpp's gguf-split writes it; any part may be named)."""
    path = pathlib.Path(path)
    match = _SPLIT.match(path.name)
    if match is None:
        return [str(path)]
    count = int(match["count"])
    files = [
        path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"split GGUF model {str(path)!r} lacks part(s) {', '.join(missing)}")
    return [str(f) for f in files]


_BIG_ARRAY = 4096  # metadata arrays longer than this are skipped over, not parsed item by item
_READERS: dict[str, type] = {}


def open_reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
    """gguf-py's `GGUFReader` for `path`, skipping over metadata arrays of more than
    `_BIG_ARRAY` items (a tokenizer's vocabulary, merges, scores) instead of parsing each item
    into its own numpy view: gguf-py takes 2-10 s for SmolLM2's 49,152 tokens and 48,900 merges,
    this 0.1 s. Such a field keeps its length (`len(field.data)`: the vocabulary's size) but not
    its items: read tokenizer data through transformers or a plain `GGUFReader`."""
    import gguf

    cls = _READERS.get("fast")
    if cls is None:

        class _FastReader(gguf.GGUFReader):  # type: ignore[misc]
            def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
                if raw_type != gguf.GGUFValueType.ARRAY:
                    return super()._get_field_parts(orig_offs, raw_type)
                raw_itype = self._get(orig_offs, np.uint32)
                alen = self._get(orig_offs + 4, np.uint64)
                count, item = int(alen[0]), gguf.GGUFValueType(int(raw_itype[0]))
                if count <= _BIG_ARRAY or item == gguf.GGUFValueType.ARRAY:
                    return super()._get_field_parts(orig_offs, raw_type)
                offs = orig_offs + 12
                if item == gguf.GGUFValueType.STRING:
                    buf, end = memoryview(self.data), offs  # type: ignore[arg-type]
                    for _ in range(count):
                        end += 8 + struct.unpack_from("<Q", buf, end)[0]
                else:
                    end = offs + count * np.dtype(self.gguf_scalar_to_np[item]).itemsize
                blob = self._get(offs, np.uint8, end - offs)
                return (
                    end - orig_offs,
                    [raw_itype, alen, blob],
                    [2] * count,
                    [gguf.GGUFValueType.ARRAY, item],
                )

        cls = _READERS["fast"] = _FastReader
    return cls(os.fspath(path), mode)


def transformers_source(path: str | os.PathLike[str]) -> tuple[str, dict[str, str]]:
    """(folder, extra `from_pretrained` keywords) with which transformers loads the model at a
    shardline model path: a `.gguf` file, or a folder holding one GGUF and its tokenizer but no
    config.json (the default model's cache), loads from the GGUF; other folders as they are."""
    path = pathlib.Path(path)
    if path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and len(ggufs) == 1:
        return str(path), {"gguf_file": ggufs[0].name}
    return str(path), {}
