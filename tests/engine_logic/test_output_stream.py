"""OutputStream and RequestOutputs (what `Engine.generate` returns), against a fake core.

RequestOutputs replaced `generate`'s async-generator layers; these pin the generator
behaviour it keeps: lazy validation, errors reach the caller, every way of leaving early
aborts the request exactly when the old `finally` did.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from shardline.engine.api import RequestOutputs
from shardline.engine.errors import EngineDeadError, InvalidRequestError
from shardline.engine.output_stream import END_OF_STREAM, OutputStream
from shardline.engine.request import RequestOutput, SamplingParams


def _out(index: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", f"t{index}", "", [index], [], None, finished, "length" if finished else None, 1, index + 1)


class _FakeCore:
    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class _FakeEngine:
    """The one method RequestOutputs calls on its engine."""

    def __init__(self) -> None:
        self.core = _FakeCore()
        self.stream = OutputStream()
        self.submitted: list[tuple[list[int], SamplingParams, str | None]] = []

    def _submit(
        self, token_ids: list[int], params: SamplingParams, request_id: str | None, grammar: Any = None
    ) -> tuple[Any, str, OutputStream]:
        self.submitted.append((token_ids, params, request_id))
        return self.core, request_id or "generated", self.stream


def _outputs(engine: _FakeEngine, prepare: Callable[[], list[int]] = lambda: [1, 2]) -> RequestOutputs:
    return RequestOutputs(engine, prepare, None, "rid")  # type: ignore[arg-type]


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def _collect(iterable: Any) -> tuple[asyncio.Task[None], list[Any]]:
    """A task reading `iterable` to its end, and the list it fills."""
    received: list[Any] = []

    async def read() -> None:
        async for item in iterable:
            received.append(item)

    return asyncio.create_task(read()), received


async def _started(engine: _FakeEngine, first: RequestOutput) -> RequestOutputs:
    """Outputs whose consumer already waited for, and got, `first`."""
    outputs = _outputs(engine)
    waiting = asyncio.create_task(outputs.__anext__())
    await _settle()
    engine.stream.send_nowait(first)
    assert await waiting == first
    return outputs


async def _assert_over(engine: _FakeEngine, outputs: RequestOutputs, aborted: list[str]) -> None:
    """The iteration is over (as a generator's after it returned or raised)."""
    assert engine.core.aborted == aborted
    with pytest.raises(StopAsyncIteration):
        await outputs.__anext__()


# ------------------------------------------------------------------ OutputStream


async def test_stream_hands_items_to_a_waiter_and_queues_otherwise() -> None:
    stream = OutputStream()
    waiting = stream.next_future()
    assert not waiting.done()
    stream.send_nowait(_out(0))
    assert waiting.done() and waiting.result() == _out(0)
    stream.send_nowait(_out(1))
    stream.send_nowait(_out(2))
    stream.close()
    got = [await stream.next_future() for _ in range(3)]
    assert got == [_out(1), _out(2), END_OF_STREAM]
    with pytest.raises(anyio.ClosedResourceError):
        stream.send_nowait(_out(3))


async def test_stream_close_wakes_a_waiter_and_iteration_ends() -> None:
    stream = OutputStream()
    task, received = _collect(stream)
    await _settle()
    stream.send_nowait(_out(0))
    await _settle()
    stream.close()
    await asyncio.wait_for(task, 5)
    assert received == [_out(0)]


async def test_stream_after_receiver_closed() -> None:
    stream = OutputStream()
    stream.send_nowait(_out(0))
    stream.close_receiver()
    assert stream.receiver_closed
    with pytest.raises(anyio.BrokenResourceError):
        stream.send_nowait(_out(1))
    with pytest.raises(anyio.ClosedResourceError):
        stream.next_future()


async def test_stream_a_cancelled_wait_does_not_swallow_the_next_item() -> None:
    stream = OutputStream()
    task = asyncio.create_task(stream.receive())
    await _settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stream.send_nowait(_out(0))
    assert await stream.receive() == _out(0)


# ------------------------------------------------------------------ RequestOutputs


async def test_outputs_validate_lazily_and_raise_on_first_next() -> None:
    engine = _FakeEngine()

    def bad() -> list[int]:
        raise InvalidRequestError("prompt", "bad")

    outputs = _outputs(engine, bad)  # nothing happens yet
    assert engine.submitted == []
    with pytest.raises(InvalidRequestError):
        await outputs.__anext__()
    with pytest.raises(StopAsyncIteration):  # a generator that raised is over
        await outputs.__anext__()
    assert engine.submitted == [] and engine.core.aborted == []


async def test_outputs_stream_to_the_end_without_abort() -> None:
    engine = _FakeEngine()
    task, got = _collect(_outputs(engine))
    await _settle()
    assert engine.submitted[0][0] == [1, 2] and engine.submitted[0][2] == "rid"
    for index in range(3):
        engine.stream.send_nowait(_out(index))
        await _settle()
    engine.stream.send_nowait(_out(3, finished=True))
    engine.stream.close()
    await asyncio.wait_for(task, 5)
    assert got == [_out(0), _out(1), _out(2), _out(3, finished=True)]
    assert engine.core.aborted == []
    assert engine.stream.receiver_closed


async def test_outputs_drain_a_backlog_without_yielding() -> None:
    engine = _FakeEngine()
    outputs = await _started(engine, _out(0))
    for index in range(1, 4):
        engine.stream.send_nowait(_out(index))
    loop_passes = 0

    def count() -> None:
        nonlocal loop_passes
        loop_passes += 1

    asyncio.get_running_loop().call_soon(count)
    assert [await outputs.__anext__() for _ in range(3)] == [_out(1), _out(2), _out(3)]
    assert loop_passes == 0  # the queued items came without an event-loop pass


async def test_outputs_raise_an_engine_error_and_abort() -> None:
    engine = _FakeEngine()
    outputs = await _started(engine, _out(0))
    engine.stream.send_nowait(EngineDeadError("boom"))
    with pytest.raises(EngineDeadError, match="boom"):
        await outputs.__anext__()
    await _assert_over(engine, outputs, ["rid"])


async def test_outputs_end_without_a_finished_output_is_an_error() -> None:
    engine = _FakeEngine()
    outputs = _outputs(engine)
    waiting = asyncio.create_task(outputs.__anext__())
    await _settle()
    engine.stream.close()
    with pytest.raises(EngineDeadError, match="before the request finished"):
        await waiting
    assert engine.core.aborted == ["rid"]


async def test_cancelling_the_consumer_aborts_the_request() -> None:
    engine = _FakeEngine()
    outputs = _outputs(engine)

    async def consume() -> None:
        async for _ in outputs:
            pass

    task = asyncio.create_task(consume())
    await _settle()
    engine.stream.send_nowait(_out(0))
    await _settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stream.receiver_closed  # later outputs raise BrokenResourceError in the core
    await _assert_over(engine, outputs, ["rid"])


async def test_aclose_aborts_an_unfinished_request_once() -> None:
    engine = _FakeEngine()
    outputs = await _started(engine, _out(0))
    await outputs.aclose()
    await outputs.aclose()
    await _assert_over(engine, outputs, ["rid"])


async def test_aclose_before_start_submits_nothing() -> None:
    engine = _FakeEngine()
    outputs = _outputs(engine)
    await outputs.aclose()
    await _assert_over(engine, outputs, [])
    assert engine.submitted == []


async def test_aclose_after_the_finished_output_does_not_abort() -> None:
    engine = _FakeEngine()
    outputs = await _started(engine, _out(0, finished=True))
    await outputs.aclose()
    assert engine.core.aborted == []


async def test_dropping_the_iterator_mid_stream_aborts() -> None:
    engine = _FakeEngine()

    async def take_one() -> None:
        async for _ in _outputs(engine):
            break  # the iterator is dropped here, unfinished and not closed

    consumer = asyncio.create_task(take_one())
    await _settle()
    engine.stream.send_nowait(_out(0))
    await consumer
    gc.collect()
    await _settle()
    assert engine.core.aborted == ["rid"]
    assert engine.stream.receiver_closed
