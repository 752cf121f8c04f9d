"""Packed weights from the on-disk cache: the same numbers as packing afresh, the float32
copies never read or let go, and an entry that no longer fits is rebuilt, never used."""

from __future__ import annotations

import logging
import os
import pathlib

import pytest
import torch

from shardline.model import packed_cache, packed_linear
from shardline.model.attention import AttentionMetadata
from shardline.model.config import ModelConfig
from shardline.model.loader import load_model
from shardline.model.parallel_context import ParallelContext
from support.tiny_models import make_tiny_model_dir

IDS = torch.tensor([5, 17, 200, 42, 9, 250] * 50)  # 300 rows: past MAX_ROWS, so chunked


@pytest.fixture
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("SHARDLINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(packed_cache.ENV, raising=False)
    monkeypatch.delenv(packed_linear.ENV, raising=False)
    return tmp_path / "home"


def _dir(tmp_path: pathlib.Path, tied: bool) -> pathlib.Path:
    return make_tiny_model_dir(tmp_path / f"m{int(tied)}", num_layers=2, hidden_size=64,
                               intermediate_size=128, tie_word_embeddings=tied)


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    n = len(ids)
    blocks = [list(range(-(-n // 16)))]
    attn = AttentionMetadata.build(query_lens=[n], context_lens=[0], block_tables=blocks, block_size=16)
    from shardline.worker.kv_cache import allocate_kv_cache

    allocate_kv_cache(model, len(blocks[0]), block_size=16, dtype=torch.float32, device=torch.device("cpu"))
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(n), attn))


def _packed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "packed_weight", None) is not None]


@pytest.mark.parametrize("tied", [True, False])
def test_a_cached_start_computes_what_packing_afresh_does(tmp_path: pathlib.Path, home: pathlib.Path,
                                                          tied: bool) -> None:
    config = ModelConfig.from_path(_dir(tmp_path, tied))
    reference = _logits(load_model(config, ParallelContext.single()))  # float32, nothing packed

    first, info = packed_linear.load_packed_model(config, ParallelContext.single())
    assert info["packed"] > 0 and not info["cached"] and info["freed"] > 0
    # The token embedding is the checkpoint's bytes, mapped (a tied head shares it).
    embedding = first.model.embed_tokens.weight
    assert info["mapped"] == embedding.numel() * 4
    assert not embedding.untyped_storage().resizable()  # a mapping, not an allocation of ours
    assert len(list((home / "packed").iterdir())) == 1
    # Every packed layer's float32 weight is gone, except the tied head's (the embedding).
    for m in _packed_layers(first):
        shared = tied and m is first.lm_head
        assert m.weight.is_meta is not shared, m
    fresh = _logits(first)
    torch.testing.assert_close(fresh, reference, rtol=1e-4, atol=1e-4)

    second, info = packed_linear.load_packed_model(config, ParallelContext.single())
    assert info["cached"] and info["packed"] == sum(m.packed_weight.numel() * m.packed_weight.element_size()
                                                   for m in _packed_layers(second))
    assert torch.equal(_logits(second), fresh)  # the same bytes, the same kernel
    assert torch.equal(_logits(second, IDS[:5]), _logits(first, IDS[:5]))


def test_the_skipped_weights_are_never_read(tmp_path: pathlib.Path, home: pathlib.Path) -> None:
    from shardline.model.loader import LoadStats

    config = ModelConfig.from_path(_dir(tmp_path, tied=False))
    packed_linear.load_packed_model(config, ParallelContext.single())
    cache = packed_cache.PackedCache.for_rank(
        config.path, architecture=config.architecture, dtype=config.dtype, tp=(0, 1), pp=(0, 1), mode="auto")
    assert cache is not None
    index = cache.lookup()
    assert index is not None
    skip = packed_cache.PackedCache.weight_names(index)
    full, partial = LoadStats(), LoadStats()
    load_model(config, ParallelContext.single(), stats=full)
    model = load_model(config, ParallelContext.single(), stats=partial, skip_weights=skip)
    skipped = sum(p.numel() * 4 for n, p in model.named_parameters() if n in skip)
    assert skipped > 0 and partial.bytes_read == full.bytes_read - skipped


def test_a_changed_checkpoint_gets_a_new_entry(tmp_path: pathlib.Path, home: pathlib.Path) -> None:
    path = _dir(tmp_path, tied=True)
    config = ModelConfig.from_path(path)
    packed_linear.load_packed_model(config, ParallelContext.single())
    weights = path / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    _, info = packed_linear.load_packed_model(config, ParallelContext.single())
    assert not info["cached"]
    assert len(list((home / "packed").iterdir())) == 2


def test_a_damaged_entry_is_rebuilt(tmp_path: pathlib.Path, home: pathlib.Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    config = ModelConfig.from_path(_dir(tmp_path, tied=False))
    first, _ = packed_linear.load_packed_model(config, ParallelContext.single())
    want = _logits(first)
    (entry,) = (home / "packed").iterdir()
    data = (entry / packed_cache.WEIGHTS).read_bytes()
    (entry / packed_cache.WEIGHTS).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger=packed_cache.logger.name):
        model, info = packed_linear.load_packed_model(config, ParallelContext.single())
    assert "truncated" in caplog.text and not info["cached"]
    assert torch.equal(_logits(model), want)
    _, info = packed_linear.load_packed_model(config, ParallelContext.single())
    assert info["cached"]  # rewritten whole


def test_the_cache_can_be_turned_off(tmp_path: pathlib.Path, home: pathlib.Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(packed_cache.ENV, "off")
    config = ModelConfig.from_path(_dir(tmp_path, tied=True))
    _, info = packed_linear.load_packed_model(config, ParallelContext.single())
    assert info["packed"] > 0 and not info["cached"]
    assert not (home / "packed").exists()


def test_with_packing_off_nothing_is_dropped(tmp_path: pathlib.Path, home: pathlib.Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(packed_linear.ENV, "off")
    config = ModelConfig.from_path(_dir(tmp_path, tied=False))
    model, info = packed_linear.load_packed_model(config, ParallelContext.single())
    assert info == {"packed": 0, "freed": 0, "cached": False, "blocks": 0, "weights": 0, "mapped": 0,
                    "gguf_layers": 0, "gguf_bytes": 0, "int8_layers": 0}
    assert not any(p.is_meta for p in model.parameters())
    assert not (home / "packed").exists()
