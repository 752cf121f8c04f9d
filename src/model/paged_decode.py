"""The fused CPU paged decode-attention kernel (`csrc/paged_decode.cpp`), built once per machine.

`Attention` uses it for the one-token (decode) queries of a batch when the KV cache is a CPU
float32, float16 or bfloat16 tensor (`EngineConfig.kv_cache_dtype`; 16-bit K/V are widened to
float32 as they are read, in registers on AVX-512) and the queries are float32: it reads each sequence's K/V straight out of the cache blocks through the block
table instead of gathering them into a padded copy for SDPA. Other dtypes and devices keep the
gather + SDPA path.

`SHARDLINE_CPU_ATTENTION` picks the path, read at every call:

* `auto` (default): the kernel, built on first use; if it cannot be built (no compiler, no
  ninja, a build error) one warning is logged and gather + SDPA is used from then on;
* `kernel`: the kernel, and a failed build raises;
* `sdpa`: always gather + SDPA; nothing is built.

The build is a torch C++ extension (`torch.utils.cpp_extension.load`), compiled with
`-O3 -march=native` into `$SHARDLINE_HOME/torch_extensions/<name>-<fingerprint>/`, where the
fingerprint covers the sources, the flags, torch, Python and the CPU, so a change of any of them
builds anew and an unchanged machine builds once. Importing this module builds nothing; the
worker builds it when it sets up a CPU KV cache (`kernel_enabled`), other users at their first decode.

Concurrent first builds (several worker processes) take a `filelock` lock beside the build
directory, so one process compiles while the others wait and then load its library. torch's own
lock in the build directory is an `O_EXCL` file that a killed build leaves behind, after which
torch would wait on it forever; whoever holds our lock removes it, since no one else can be
building then.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import sys
import threading
from collections.abc import Iterator

import torch

from shardline.model.env import env_choice

logger = logging.getLogger(__name__)

MODE_ENV = "SHARDLINE_CPU_ATTENTION"
MODES = ("auto", "kernel", "sdpa")
# How long the kernels' threads (csrc/cpu_pool.h) stay awake after a kernel, in microseconds;
# the C++ side reads it when it starts them.
SPIN_ENV = "SHARDLINE_CPU_SPIN_US"
_CSRC = pathlib.Path(__file__).resolve().parent / "csrc"
# One extension: the decode-attention kernel, the fused element-wise ops (model.cpu_ops), the
# decode GEMM (model.packed_linear), the decoder-layer loop (model.llama) and the GGUF
# weights' GEMM (model.gguf_weights) and the int8-activation GEMM (model.q8_linear).
SOURCES = (_CSRC / "paged_decode.cpp", _CSRC / "cpu_ops.cpp", _CSRC / "cpu_gemm.cpp",
           _CSRC / "cpu_decoder.cpp", _CSRC / "gguf_gemm.cpp", _CSRC / "q8_gemm.cpp")
EXTENSION_NAME = "shardline_paged_decode"
CFLAGS = ("-O3", "-march=native", "-fopenmp")  # -fopenmp: at::parallel_for is inline; without it, one thread


def cpu_attention_mode() -> str:
    """`SHARDLINE_CPU_ATTENTION`: `auto` (default), `kernel` or `sdpa`."""
    return env_choice(MODE_ENV, MODES)


def check_spin_setting() -> None:
    """Raise ValueError for a `SHARDLINE_CPU_SPIN_US` that is not a whole number (the C++ side
    would silently take its default)."""
    text = os.environ.get(SPIN_ENV, "").strip()
    if text and not text.isdigit():
        raise ValueError(f"{SPIN_ENV}={text!r}: expected a whole number of microseconds (default 200)")


class KernelBuild:
    """One extension (its C++ sources): built at most once per machine, loaded at most once per
    process."""

    def __init__(self, sources: tuple[pathlib.Path, ...] = SOURCES, name: str = EXTENSION_NAME,
                 build_root: pathlib.Path | None = None) -> None:
        self.sources = tuple(sources)
        self.name = name
        self.build_root = build_root
        self.error: str | None = None  # why the build or load failed
        self.built_here = False  # this process compiled it (rather than finding it built)
        self._loaded: bool | None = None  # None: not tried yet
        self._lock = threading.Lock()

    def build_dir(self) -> pathlib.Path:
        if self.build_root is not None:
            root = self.build_root
        else:
            from shardline.model.fetch import shardline_home

            root = shardline_home() / "torch_extensions"
        return root / f"{self.name}-{self._fingerprint()}"

    def load(self) -> bool:
        """Build (if this machine has not) and load the kernel; False, with one warning, if not."""
        with self._lock:
            if self._loaded is None:
                try:
                    self._build_and_load()
                    self._loaded = True
                except Exception as exc:  # no compiler, no ninja, a build or load error
                    self.error = f"{type(exc).__name__}: {exc}"
                    self._loaded = False
                    logger.warning("the CPU paged decode-attention kernel is unavailable, so CPU "
                                   "decode uses gather + SDPA: %s", self.error)
            return self._loaded

    def require(self) -> None:
        if not self.load():
            raise RuntimeError(f"{MODE_ENV}=kernel, but the CPU paged decode-attention kernel "
                               f"could not be built: {self.error}")

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        headers = sorted({h for source in self.sources for h in source.parent.glob("*.h")})
        for source in (*self.sources, *headers):  # and the headers they may include
            digest.update(source.read_bytes() + b"\0")
        for part in (*CFLAGS, torch.__version__, sys.version, platform.machine(), _cpu_model()):
            digest.update(b"\0" + part.encode())
        return digest.hexdigest()[:16]

    def _build_and_load(self) -> None:
        from filelock import FileLock
        from torch.utils import cpp_extension

        directory = self.build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        library = directory / f"{self.name}.so"
        with FileLock(f"{directory}.lock"):
            if library.exists():
                try:
                    torch.ops.load_library(str(library))
                    return
                except OSError as exc:  # e.g. cut short by a killed link: build it again
                    logger.warning("rebuilding the unloadable %s: %s", library, exc)
                    library.unlink()
            (directory / "lock").unlink(missing_ok=True)  # torch's, stale: see the module doc
            logger.info("building the CPU kernels (decode attention, fused ops) in %s (once per "
                        "machine)",
                        directory)
            self.built_here = True
            with _ninja_on_path():
                cpp_extension.load(self.name, [str(source) for source in self.sources],
                                   extra_cflags=list(CFLAGS), build_directory=str(directory),
                                   is_python_module=False, verbose=False)


def _cpu_model() -> str:
    """The CPU's model name and feature flags (`-march=native` code runs only where they match)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features")
    return "\n".join(sorted({line.strip() for line in text.splitlines()
                             if line.split(":", 1)[0].strip() in wanted}))


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs `ninja` from PATH; the `ninja` package's binary may sit only in the venv."""
    if shutil.which("ninja") is not None:
        yield
        return
    extra = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError):
        import ninja  # type: ignore[import-not-found]

        extra.append(str(ninja.BIN_DIR))
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([*extra, old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


KERNEL = KernelBuild()
# The KV-cache dtypes the kernel reads (16-bit K/V widened to float32 as they are read,
# `csrc/kv_types.h`); queries and outputs are float32.
KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode attention over a KV cache of `device`/`dtype` runs the kernel.

    The first call that can use it builds and loads it (the worker calls this when it sets up
    its KV cache, so that the first request does not wait for the compiler).
    """
    if device.type != "cpu" or dtype not in KV_DTYPES:
        return False
    check_spin_setting()
    mode = cpu_attention_mode()
    if mode == "sdpa":
        return False
    if mode == "kernel":
        KERNEL.require()
        return True
    return KERNEL.load()


def paged_decode_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, seq_ids: torch.Tensor | None,
                           scale: float) -> None:
    """Write `out[row]` (`[tokens, heads, D]`) for the decode row of each sequence in `seq_ids`.

    Sequence i's query row is `query_start_loc[i]`; it attends over its first `seq_lens[i]`
    cached tokens through `block_tables[i]`. `seq_ids=None` means every sequence.
    """
    torch.ops.shardline.paged_decode_attention(out, query, kv_cache, block_tables, seq_lens,
                                               query_start_loc, seq_ids, scale)
