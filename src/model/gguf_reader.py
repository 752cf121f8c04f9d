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


# GGUF metadata value types (gguf-py's GGUFValueType): struct format of the scalar ones.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class MetadataField:
    """One metadata value: `contents()` as gguf-py's `ReaderField.contents()` gives it (a big
    array's items are not kept: `data` has its length only)."""

    def __init__(self, value: Any, count: int) -> None:
        self._value = value
        self.data = range(count)

    def contents(self) -> Any:
        return self._value


class TensorName:
    """A tensor's name and where its data lies: `dims` (GGUF order, fastest first), ggml
    `type` and `offset` from the start of the file."""

    def __init__(
        self, name: str, dims: tuple[int, ...] = (), kind: int = 0, offset: int = 0
    ) -> None:
        self.name = name
        self.dims = dims
        self.type = kind
        self.offset = offset


class Metadata:
    """A GGUF file's metadata and tensor names, read with `struct` (no gguf-py, whose import
    alone takes ~0.35 s): `fields` (name -> `MetadataField`) and `tensors` (with `.name`), the
    part of `GGUFReader` a config needs."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import mmap

        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError(
                    f"{os.fspath(path)!r} is not a GGUF file (magic {bytes(buf[:4])!r})"
                )
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
            if version < 2:
                raise ValueError(f"GGUF version {version} is not supported")
            self._buf, self._at = buf, 24
            self.fields: dict[str, MetadataField] = {}
            for _ in range(n_kv):
                key = self._string()
                (kind,) = self._take("<I")
                value, count = self._value(kind, key.startswith("tokenizer.ggml."))
                self.fields[key] = MetadataField(value, count)
            self.tensors = []
            for _ in range(n_tensors):
                name = self._string()
                (count,) = self._take("<I")
                dims = self._take(f"<{count}Q")
                kind, offset = self._take("<IQ")
                self.tensors.append(TensorName(name, dims, kind, offset))
            field = self.fields.get("general.alignment")
            align = int(field.contents()) if field is not None else 32
            start = -(-self._at // align) * align  # the data section, after the aligned header
            for tensor in self.tensors:
                tensor.offset += start
            del self._buf

    def _take(self, fmt: str) -> tuple[Any, ...]:
        out = struct.unpack_from(fmt, self._buf, self._at)
        self._at += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (size,) = self._take("<Q")
        text = bytes(self._buf[self._at : self._at + size]).decode("utf-8", errors="replace")
        self._at += size
        return text

    def _value(self, kind: int, skip_items: bool) -> tuple[Any, int]:
        if kind == _STRING:
            return self._string(), 1
        if kind in _SCALARS:
            return self._take("<" + _SCALARS[kind])[0], 1
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF metadata value type {kind}")
        item, count = self._take("<IQ")
        if item in _SCALARS and (skip_items or count > _BIG_ARRAY):
            self._at += count * struct.calcsize("<" + _SCALARS[item])
            return None, count
        if item == _STRING and (skip_items or count > _BIG_ARRAY):
            for _ in range(count):
                self._at += 8 + struct.unpack_from("<Q", self._buf, self._at)[0]
            return None, count
        return [self._value(item, False)[0] for _ in range(count)], count


_VECTOR_TYPES = {0: "<f4", 1: "<f2"}  # ggml F32, F16


def read_vector(path: str | os.PathLike[str], tensor: TensorName) -> list[float]:
    """The values of a small 1-D F32 or F16 tensor of GGUF file `path` (rope frequency factors),
    read with `struct`/numpy; ValueError naming the tensor for another shape or type."""
    if len(tensor.dims) != 1 or tensor.type not in _VECTOR_TYPES:
        raise ValueError(
            f"tensor {tensor.name!r} has shape {list(tensor.dims)} and ggml type {tensor.type}; "
            "expected a vector of F32 (type 0) or F16 (type 1)"
        )
    dtype = np.dtype(_VECTOR_TYPES[tensor.type])
    with open(path, "rb") as f:
        f.seek(tensor.offset)
        raw = f.read(tensor.dims[0] * dtype.itemsize)
    if len(raw) != tensor.dims[0] * dtype.itemsize:
        raise ValueError(f"tensor {tensor.name!r} runs past the end of {os.fspath(path)!r}")
    return [float(v) for v in np.frombuffer(raw, dtype=dtype)]
