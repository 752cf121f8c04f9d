"""The whole engine with every C++ path switched off gives transformers' greedy tokens.

That is what a machine without a C++ compiler runs: the CPU extension (`model/csrc`) cannot
be built, so decode attention is gather + SDPA, the element-wise ops and the greedy argmax are
plain torch, the GEMMs are torch's on the float32 weights, and the decoder layers loop in
Python. The README's "Speed switches" turn each of those pieces off; here all of them at once,
end to end (engine, shm transport, worker program), on the default model.
"""

from __future__ import annotations

import pathlib

import pytest

from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.model.paged_decode import EXTENSION_NAME
from support.generation import generate_all
from support.prompts import MAX_TOKENS, PROMPTS

# Every `SHARDLINE_CPU_*` switch of README "Speed switches" at its off value (the packed-weight
# cache has nothing to do without packing; it is switched off too so no packed bytes are read).
CPP_OFF = {
    "SHARDLINE_CPU_ATTENTION": "sdpa",
    "SHARDLINE_CPU_FUSED_OPS": "off",
    "SHARDLINE_CPU_PACKED_LINEAR": "off",
    "SHARDLINE_CPU_DECODER_LOOP": "off",
    "SHARDLINE_PACKED_CACHE": "off",
}


def _maps(pid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
async def test_every_cpp_path_off_matches_hf_greedy(
    smollm2_dir: pathlib.Path, hf_greedy: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CPP_OFF.items():
        monkeypatch.setenv(name, value)  # the worker program inherits our environment
    cfg = EngineConfig(model=str(smollm2_dir), transport="shm", max_model_len=512, num_kv_blocks=256)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    async with await Engine.start(cfg) as engine:
        got = await generate_all(engine, PROMPTS, params)
        (worker,) = engine._cores[0].executor.worker_pids
        # Off means never loaded: the extension is not mapped into the worker at all, so a
        # C++ path without a switch (or one that ignores its switch) fails here.
        maps = _maps(worker)
        assert "python" in maps  # the worker's own maps were read
        assert EXTENSION_NAME not in maps, [ln for ln in maps.splitlines() if EXTENSION_NAME in ln]
    assert dict(zip(PROMPTS, got, strict=True)) == hf_greedy
