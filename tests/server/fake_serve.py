"""`shardline serve` with the engine replaced by FakeEngine: tests the launch life cycle.

Run as a script by the tests: `python fake_serve.py [serve args...]`. Environment knobs:
FAKE_START_FAIL=1 makes the engine fail to start; FAKE_DIE_AFTER_S=N kills it after N s.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from server.fake_engine import FakeEngine  # noqa: E402
from shardline.engine import model_info  # noqa: E402
from shardline.engine.api import Engine  # noqa: E402
from shardline.engine.cli import main  # noqa: E402
from shardline.engine.errors import EngineDeadError  # noqa: E402


async def _fake_start(config: object = None) -> FakeEngine:
    if os.environ.get("FAKE_START_FAIL"):
        raise EngineDeadError("fake engine refused to start")
    engine = FakeEngine(max_model_len=512, token_delay=0.01)
    die_after = os.environ.get("FAKE_DIE_AFTER_S")
    if die_after:
        asyncio.get_running_loop().call_later(float(die_after), engine.kill)
    return engine


Engine.start = _fake_start  # type: ignore[method-assign,assignment]
# No model to check before the server starts (the fake engine needs none).
model_info.check_model_config = lambda config: None  # type: ignore[assignment,return-value]

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
