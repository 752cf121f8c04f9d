"""ParallelRequestOutputs (`Engine.generate` with n > 1) against a fake engine and core.

The order of events is driven by hand here: when the other choices start, what an abort
before they started gives, and that every way of leaving aborts every choice.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

from shardline.engine.api import ParallelRequestOutputs
from shardline.engine.errors import EngineDeadError, InvalidRequestError
from shardline.engine.output_stream import OutputStream
from shardline.engine.request import RequestOutput, SamplingParams


def _out(rid: str, step: int, finished: bool = False, reason: str = "length") -> RequestOutput:
    return RequestOutput(
        rid, f"t{step}", "", [step], [], None, finished, reason if finished else None, 2, step + 1
    )


class _FakeCore:
    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.dead: BaseException | None = None

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class _FakeEngine:
    """What ParallelRequestOutputs uses of its engine."""

    def __init__(self) -> None:
        self.core = _FakeCore()
        self.streams: dict[str, OutputStream] = {}
        self.params: dict[str, SamplingParams] = {}
        self._parallel: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()

    def _admit(self, token_ids: list[int], params: SamplingParams) -> tuple[Any, SamplingParams]:
        return self.core, params

    def _enqueue(
        self, core: Any, token_ids: list[int], params: SamplingParams, request_id: str, grammar: Any = None
    ) -> OutputStream:
        stream = self.streams[request_id] = OutputStream()
        self.params[request_id] = params
        return stream

    async def abort(self, request_id: str) -> None:  # as Engine.abort
        parallel = self._parallel.get(request_id)
        if parallel is not None:
            parallel.abort()


def _outputs(engine: _FakeEngine, n: int = 3, seed: int | None = 7) -> ParallelRequestOutputs:
    params = SamplingParams(n=n, seed=seed, max_tokens=4)
    return ParallelRequestOutputs(engine, lambda: [1, 2], params, "p")  # type: ignore[arg-type]


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def _next(outputs: ParallelRequestOutputs) -> RequestOutput:
    return await asyncio.wait_for(outputs.__anext__(), 5)


async def _started(engine: _FakeEngine, n: int = 3, seed: int | None = 7) -> ParallelRequestOutputs:
    """Outputs whose reader got choice 0's first output (so every choice is started)."""
    outputs = _outputs(engine, n=n, seed=seed)
    task = asyncio.create_task(_next(outputs))
    await _settle()
    engine.streams["p-0"].send_nowait(_out("p-0", 0))
    assert (await task).index == 0
    return outputs


async def test_other_choices_start_after_the_first_output_of_choice_0() -> None:
    engine = _FakeEngine()
    outputs = _outputs(engine)
    first = asyncio.create_task(_next(outputs))
    await _settle()
    assert list(engine.streams) == ["p-0"]  # only choice 0 runs until its prompt is computed
    engine.streams["p-0"].send_nowait(_out("p-0", 0))
    got = await first
    assert (got.request_id, got.index, got.delta) == ("p", 0, "t0")
    assert list(engine.streams) == ["p-0", "p-1", "p-2"]
    # Choice i samples with seed + i; each is one request (n=1).
    assert [(p.seed, p.n) for p in engine.params.values()] == [(7, 1), (8, 1), (9, 1)]
    for index in (2, 1, 0):
        engine.streams[f"p-{index}"].send_nowait(_out(f"p-{index}", 1, finished=True))
        engine.streams[f"p-{index}"].close()
    rest = [await _next(outputs) for _ in range(3)]
    assert sorted((o.index, o.finished, o.request_id) for o in rest) == [
        (i, True, "p") for i in range(3)
    ]
    with pytest.raises(StopAsyncIteration):
        await _next(outputs)
    assert engine.core.aborted == []
    assert "p" not in engine._parallel


async def test_unseeded_choices_keep_no_seed() -> None:
    engine = _FakeEngine()
    outputs = await _started(engine, n=2, seed=None)
    assert [p.seed for p in engine.params.values()] == [None, None]  # each its request id's seed
    await outputs.aclose()
    assert engine.core.aborted == ["p-0", "p-1"]


async def test_abort_before_the_others_started_ends_each_with_abort() -> None:
    engine = _FakeEngine()
    outputs = _outputs(engine)
    task = asyncio.create_task(_next(outputs))
    await _settle()
    await engine.abort("p")
    assert engine.core.aborted == ["p-0"]
    engine.streams["p-0"].send_nowait(_out("p-0", 0, finished=True, reason="abort"))
    engine.streams["p-0"].close()
    got = [await task] + [await _next(outputs) for _ in range(2)]
    assert [(o.index, o.finished, o.finish_reason, o.text, o.token_ids) for o in got] == [
        (0, True, "abort", "", []),
        (1, True, "abort", "", []),
        (2, True, "abort", "", []),
    ]
    assert list(engine.streams) == ["p-0"]  # the others were never submitted
    with pytest.raises(StopAsyncIteration):
        await _next(outputs)


async def test_abort_while_choice_0_output_is_queued_still_starts_nothing() -> None:
    engine = _FakeEngine()
    outputs = _outputs(engine, n=2)
    reading = asyncio.create_task(_next(outputs))
    await _settle()
    await engine.abort("p")  # the abort reaches choice 0 after it sampled its first token
    engine.streams["p-0"].send_nowait(_out("p-0", 0))
    assert (await reading).index == 0
    synthesized = await _next(outputs)
    assert (synthesized.index, synthesized.finish_reason) == (1, "abort")
    assert list(engine.streams) == ["p-0"]


async def test_abort_after_start_reaches_every_unfinished_choice() -> None:
    engine = _FakeEngine()
    outputs = await _started(engine)
    engine.streams["p-1"].send_nowait(_out("p-1", 0, finished=True))
    assert (await _next(outputs)).index == 1
    await engine.abort("p")
    assert engine.core.aborted == ["p-0", "p-2"]


async def test_an_error_on_any_choice_is_raised_and_aborts_the_others() -> None:
    engine = _FakeEngine()
    outputs = await _started(engine)
    engine.streams["p-2"].send_nowait(EngineDeadError("boom"))
    with pytest.raises(EngineDeadError, match="boom"):
        await _next(outputs)
    assert sorted(engine.core.aborted) == ["p-0", "p-1"]
    with pytest.raises(StopAsyncIteration):
        await _next(outputs)


async def test_a_refused_choice_0_raises_before_any_other_starts() -> None:
    engine = _FakeEngine()
    outputs = _outputs(engine)
    task = asyncio.create_task(_next(outputs))
    await _settle()
    engine.streams["p-0"].send_nowait(InvalidRequestError("prompt", "too long for the pool"))
    engine.streams["p-0"].close()
    with pytest.raises(InvalidRequestError):
        await task
    assert list(engine.streams) == ["p-0"]


async def test_a_stream_ending_without_its_finished_output_is_an_error() -> None:
    engine = _FakeEngine()
    outputs = await _started(engine, n=2)
    engine.streams["p-1"].close()
    with pytest.raises(EngineDeadError, match="before the request finished"):
        await _next(outputs)
    assert engine.core.aborted == ["p-0"]


async def test_cancelling_the_consumer_aborts_every_choice() -> None:
    engine = _FakeEngine()
    outputs = _outputs(engine)

    async def consume() -> None:
        async for _ in outputs:
            pass

    task = asyncio.create_task(consume())
    await _settle()
    engine.streams["p-0"].send_nowait(_out("p-0", 0))
    await _settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.core.aborted == ["p-0", "p-1", "p-2"]
    assert all(stream.receiver_closed for stream in engine.streams.values())
    assert "p" not in engine._parallel


async def test_dropping_the_iterator_aborts_every_choice() -> None:
    engine = _FakeEngine()

    async def take_one() -> None:
        async for _ in _outputs(engine):
            break  # dropped here, unfinished and not closed

    consumer = asyncio.create_task(take_one())
    await _settle()
    engine.streams["p-0"].send_nowait(_out("p-0", 0))
    await consumer
    gc.collect()
    await _settle()
    assert engine.core.aborted == ["p-0", "p-1", "p-2"]
    assert "p" not in engine._parallel


async def test_the_same_id_twice_at_once_is_refused() -> None:
    engine = _FakeEngine()
    first = _outputs(engine, n=2)
    task = asyncio.create_task(_next(first))
    await _settle()
    with pytest.raises(InvalidRequestError) as err:
        await _next(_outputs(engine, n=2))
    assert err.value.field == "request_id"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
