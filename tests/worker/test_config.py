"""WorkerConfig: msgpack round trip and clear errors for bad values."""

from __future__ import annotations

import msgpack
import pytest

from shardline.worker.config import WorkerConfig


def make(**overrides: object) -> WorkerConfig:
    fields: dict[str, object] = dict(
        rank=3,
        world_size=4,
        tp_size=2,
        pp_size=2,
        channels_address={"kind": "shm", "name": "shardline_x"},
        dist_init_method="tcp://127.0.0.1:1234",
        model_path="/models/m",
        plugins=["mypkg.models:register"],
    )
    fields.update(overrides)
    return WorkerConfig(**fields)  # type: ignore[arg-type]


def test_round_trip_through_msgpack() -> None:
    config = make(num_kv_blocks=64, kv_cache_memory_bytes=1 << 20, seed=9, dtype="bfloat16")
    wire = msgpack.unpackb(msgpack.packb(config.to_dict()), raw=False)
    assert WorkerConfig.from_dict(wire) == config


def test_rank_layout() -> None:
    config = make()
    assert (config.pp_rank, config.tp_rank, config.is_output_rank) == (1, 1, False)
    assert make(rank=2).is_output_rank
    assert not make(rank=0).is_output_rank


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"world_size": 3}, "world_size"),
        ({"rank": 4}, "rank"),
        ({"block_size": 0}, "block_size"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"dist_init_method": None}, "dist_init_method"),
    ],
)
def test_bad_values_are_named(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**overrides)


def test_unknown_keys_are_named() -> None:
    data = make().to_dict() | {"bogus": 1}
    with pytest.raises(ValueError, match="bogus"):
        WorkerConfig.from_dict(data)


def test_default_threads_split_the_cpus() -> None:
    assert make(num_threads=None).torch_threads >= 1
    assert make(num_threads=3).torch_threads == 3
