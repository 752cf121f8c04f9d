"""The shm ring under random interleavings, and what it leaves behind (nothing)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import stat
import threading

import pytest
import transport_peers
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.transport import shm
from shardline.transport.errors import TransportClosed
from shardline.transport.shm_ring import Ring, sweep_stale
from support.leaks import our_shm_entries

SPAWN = multiprocessing.get_context("spawn")


@settings(max_examples=60, deadline=None)
@given(
    nslots=st.integers(1, 4),
    slot_size=st.integers(1, 16),
    nreaders=st.integers(1, 3),
    ops=st.lists(
        st.tuples(st.sampled_from(["write", "read"]), st.integers(0, 60), st.integers(0, 2)),
        max_size=60,
    ),
)
def test_random_interleavings_deliver_everything_once_in_order(
    nslots: int, slot_size: int, nreaders: int, ops: list[tuple[str, int, int]]
) -> None:
    ring = Ring.create(nslots, slot_size, nreaders)
    writer = shm.RingWriter(ring)
    reader_rings = [Ring.attach(ring.address) for _ in range(nreaders)]
    readers = [shm.RingReader(r, i) for i, r in enumerate(reader_rings)]
    sent: list[bytes] = []
    received: list[list[bytes]] = [[] for _ in range(nreaders)]
    try:
        for op, size, who in ops:
            if op == "write":
                payload = os.urandom(min(size, nslots * slot_size))  # fits without a reader
                if writer.has_room(len(payload)):
                    writer.write(payload)
                    sent.append(payload)
            else:
                reader = readers[who % nreaders]
                if reader.available():
                    received[who % nreaders].append(bytes(reader.read(timeout=1)))
        for index, reader in enumerate(readers):  # drain
            while reader.available():
                received[index].append(bytes(reader.read(timeout=1)))
        assert all(got == sent for got in received)
    finally:
        writer.close()
        for reader in readers:
            reader.close()
    assert not [n for n in our_shm_entries() if ring.base.strip("/") in n]


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=40), nreaders=st.integers(1, 3))
def test_concurrent_writer_and_readers_deliver_in_order(sizes: list[int], nreaders: int) -> None:
    ring = Ring.create(3, 512, nreaders)
    writer = shm.RingWriter(ring)
    readers = [shm.RingReader(Ring.attach(ring.address), i) for i in range(nreaders)]
    payloads = [os.urandom(size) for size in sizes]
    received: list[list[bytes]] = [[] for _ in range(nreaders)]

    def consume(index: int) -> None:
        for _ in payloads:
            received[index].append(bytes(readers[index].read(timeout=10)))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(nreaders)]
    for thread in threads:
        thread.start()
    for payload in payloads:
        writer.write(payload)
    for thread in threads:
        thread.join(30)
    writer.close()
    for reader in readers:
        reader.close()
    assert received == [payloads] * nreaders


def test_names_are_private_random_and_carry_the_creator_pid() -> None:
    first, second = Ring.create(2, 64, 2), Ring.create(2, 64, 2)
    try:
        assert first.base != second.base
        assert first.base.startswith(f"/shardline_{os.getpid()}_")
        mine = [n for n in our_shm_entries() if first.base.strip("/") in n]
        assert len(mine) == 1 + 2 * 2  # the segment and two semaphores per reader
        for name in mine:
            assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600
    finally:
        first.close()
        second.close()
    assert not [n for n in our_shm_entries() if first.base.strip("/") in n]


def test_closing_unlinks_and_a_finalizer_covers_forgotten_rings() -> None:
    link, address = shm.create_link(nslots=2, slot_size=64)
    peer = shm.connect(address)
    names = [address["recv"]["name"].strip("/"), address["send"]["name"].strip("/")]
    peer.close()
    link.close()
    assert not [n for n in our_shm_entries() if any(b in n for b in names)]
    forgotten = Ring.create(2, 64, 1)
    name = forgotten.base.strip("/")
    del forgotten
    assert not [n for n in our_shm_entries() if name in n]


def test_a_closed_reader_end_refuses_further_use() -> None:
    link, address = shm.create_link(nslots=2, slot_size=64)
    peer = shm.connect(address)
    peer.close()
    with pytest.raises(TransportClosed):
        peer.recv_frame_blocking(0.1)
    with pytest.raises(TransportClosed):
        link.send_frame_blocking(b"to a closed peer")
    link.close()


def test_sweep_removes_names_left_by_a_killed_creator() -> None:
    queue = SPAWN.Queue()
    process = SPAWN.Process(target=transport_peers.create_ring_and_sleep, args=(queue,))
    process.start()
    try:
        base = queue.get(timeout=60).strip("/")
        assert [n for n in our_shm_entries() if base in n]
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        removed = sweep_stale()
        assert sorted(n for n in removed if base in n) == sorted(
            n for n in removed if base in n
        ) and any(base in n for n in removed)
        assert not [n for n in our_shm_entries() if base in n]
    finally:
        if process.is_alive():
            process.kill()
        process.join(10)
        queue.close()
        queue.join_thread()


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_frames_at_the_slot_boundary_round_trip_whatever_their_type(kind: type) -> None:
    """One-slot frames of bytes take the inline fast path, the others the general one."""
    slot_size = 32
    ring = Ring.create(4, slot_size, 1)
    writer = shm.RingWriter(ring)
    reader = shm.RingReader(Ring.attach(ring.address), 0)
    try:
        for size in (0, 1, slot_size - 1, slot_size, slot_size + 1, 3 * slot_size):
            payload = os.urandom(size)
            writer.write(kind(payload))
            assert bytes(reader.read(timeout=1)) == payload
        assert reader.available() == 0 and writer.has_room(4 * slot_size)
    finally:
        writer.close()
        reader.close()


def test_sweep_leaves_other_users_entries_alone() -> None:
    """A stale-looking name that another user owns is theirs (issue 20 item 9): root too
    leaves it; the same name owned by us is swept."""
    from shardline.transport.shm_ring import NAME_PREFIX

    dead_pid = 2**22 + 12345  # above Linux's default pid_max: no such process
    ours = f"{NAME_PREFIX}{dead_pid}_ours_test"
    theirs = f"{NAME_PREFIX}{dead_pid}_theirs_test"
    for name in (ours, theirs):
        with open(f"/dev/shm/{name}", "wb") as f:
            f.write(b"x")
    try:
        if os.geteuid() == 0:
            os.chown(f"/dev/shm/{theirs}", 12345, 12345)
        else:  # not root: another user's entry cannot be made here; ours is still swept
            os.unlink(f"/dev/shm/{theirs}")
        removed = sweep_stale()
        assert ours in removed and not os.path.exists(f"/dev/shm/{ours}")
        if os.geteuid() == 0:
            assert theirs not in removed and os.path.exists(f"/dev/shm/{theirs}")
    finally:
        for name in (ours, theirs):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")


def test_a_frame_published_just_before_the_writers_close_is_still_read() -> None:
    """The writer publishes and closes between a reader's wait slice and its peer check."""
    ring = Ring.create(2, 64, 1)
    writer = shm.RingWriter(ring)
    reader = shm.RingReader(Ring.attach(ring.address), 0)
    real_check = reader._check_writer
    calls = []

    def racing_check() -> None:  # the slice ended empty; the frame and the close land now
        if not calls:
            writer.write(b"last words")
            writer.close()
        calls.append(1)
        real_check()

    reader._check_writer = racing_check
    try:
        assert bytes(reader.read(timeout=5)) == b"last words"
        with pytest.raises(TransportClosed, match="writer closed"):
            reader.read(timeout=5)
        with pytest.raises(TransportClosed, match="writer closed"):  # and stays closed
            reader.read(timeout=5)
    finally:
        reader.close()
        writer.close()
