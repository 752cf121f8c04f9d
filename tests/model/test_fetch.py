"""The default-model cache: built once, verified, rebuilt when partial or corrupt, locked."""

from __future__ import annotations

import json
import threading
import time

import pytest

from shardline.model import fetch
from shardline.model.config import ModelConfig
from shardline.model.fetch import MARKER, check_model_dir, ensure_model_dir, resolve_model_path


class FakeBuild:
    """Stands in for the download + conversion: writes two files, counts its calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    def __call__(self, out_dir):
        self.calls += 1
        time.sleep(self.delay)
        (out_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        (out_dir / "model.safetensors").write_bytes(b"weights" * 1000)
        return {"origin": "fake"}


def test_builds_once_then_reuses(tmp_path):
    build = FakeBuild()
    target = tmp_path / "models" / "m"
    assert ensure_model_dir(target, build) == target
    assert ensure_model_dir(target, build) == target
    assert build.calls == 1
    marker = json.loads((target / MARKER).read_text())
    assert set(marker["files"]) == {"config.json", "model.safetensors"}
    assert not list(target.parent.glob("*.partial"))
    ensure_model_dir(target, build, force=True)
    assert build.calls == 2


@pytest.mark.parametrize("damage", ["no-marker", "truncated", "flipped", "deleted"])
def test_partial_or_corrupt_cache_is_detected_and_rebuilt(tmp_path, damage):
    build = FakeBuild()
    target = ensure_model_dir(tmp_path / "m", build)
    weights = target / "model.safetensors"
    if damage == "no-marker":
        (target / MARKER).unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flipped":
        weights.write_bytes(b"X" + weights.read_bytes()[1:])
    else:
        weights.unlink()
    assert check_model_dir(target) is not None
    ensure_model_dir(target, build)
    assert build.calls == 2 and check_model_dir(target) is None
    assert weights.read_bytes() == b"weights" * 1000


def test_a_failed_build_leaves_nothing_half_built(tmp_path):
    def failing(out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("network down")

    with pytest.raises(RuntimeError, match="network down"):
        ensure_model_dir(tmp_path / "m", failing)
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob("*.partial"))


def test_concurrent_fetchers_build_once(tmp_path):
    build = FakeBuild(delay=0.3)
    results, errors = [], []

    def fetcher():
        try:
            results.append(ensure_model_dir(tmp_path / "m", build))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetcher) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(results) == 3 and build.calls == 1


def test_resolve_model_path(tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a known model"):
        resolve_model_path("meta-llama/Llama-3-8B")
    monkeypatch.setattr(fetch, "fetch_default_model", lambda force=False: tmp_path / "default")
    assert resolve_model_path("smollm2-135m-instruct") == tmp_path / "default"


def test_main_check_reports_a_missing_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHARDLINE_HOME", str(tmp_path))
    assert fetch.main(["--check"]) == 1
    assert "no shardline-model.json" in capsys.readouterr().out


def test_the_real_cache_is_complete(smollm2_dir):
    """The GGUF, its tokenizer and generation_config.json: no float32 conversion of the weights."""
    assert check_model_dir(smollm2_dir) is None
    marker = json.loads((smollm2_dir / MARKER).read_text())
    assert marker["version"] == fetch.MARKER_VERSION == 3
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", fetch.GGUF_NAME} <= set(marker["files"])
    assert not (smollm2_dir / "config.json").exists() and not list(smollm2_dir.glob("*.safetensors"))
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    config = ModelConfig.from_path(smollm2_dir)
    assert config.architecture == "LlamaForCausalLM" and config.gguf_file == str(smollm2_dir / fetch.GGUF_NAME)


def test_an_older_cache_version_is_rebuilt(tmp_path):
    """A cache built by an older shardline (a float32 conversion, marker version 2) is rebuilt."""
    target, build = tmp_path / "model", FakeBuild()
    ensure_model_dir(target, build)
    marker = json.loads((target / MARKER).read_text())
    marker["version"] = 2
    (target / MARKER).write_text(json.dumps(marker))
    assert "unknown version" in (check_model_dir(target) or "")
    ensure_model_dir(target, build)
    assert build.calls == 2 and check_model_dir(target) is None


@pytest.mark.slow
def test_offline_fetch_rebuilds_a_corrupt_cache(smollm2_dir, tmp_path, monkeypatch):
    gguf = next(smollm2_dir.glob("*.gguf"))
    monkeypatch.setenv("SHARDLINE_HOME", str(tmp_path))
    monkeypatch.setenv(fetch.SOURCE_ENV, str(gguf))
    built = fetch.fetch_default_model()
    assert built == tmp_path / "models" / "smollm2-135m-instruct"
    want = json.loads((smollm2_dir / MARKER).read_text())["files"]
    marker = json.loads((built / MARKER).read_text())
    for name in ("tokenizer.json", fetch.GGUF_NAME):  # the build is deterministic
        assert marker["files"][name]["sha256"] == want[name]["sha256"]
    weights = built / fetch.GGUF_NAME
    weights.write_bytes(weights.read_bytes()[: 1 << 20])  # a partial write
    assert fetch.main(["--check"]) == 1
    assert fetch.main([]) == 0
    assert check_model_dir(built) is None
