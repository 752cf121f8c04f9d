"""Transport benchmark: shm and tcp against multiprocessing.Queue and a Unix socketpair.

Two processes (the child is spawned, not forked). For 64 B, 4 KiB, 1 MiB and 16 MiB messages:
round-trip latency (p50, p99: parent sends, child echoes) and one-way throughput (parent
streams N messages, the child acknowledges the last). Then the CPU time an idle reader burns
while blocked for 5 s, and the Python cost of one shm write + read with nothing to wait for.
Prints a table with ratios against the baselines and writes JSON to
benchmarks/out/transport.json.

What tcp's per-frame integrity check costs: the row `tcp-nomac` is the same tcp link with the
frame tags switched off on both ends after the handshake (plain ``[u32 length][payload]``
frames, as before tags existed; never used outside this benchmark), `tcp-tls` the link inside
mutual TLS (certificates made with the `openssl` command; skipped without it), and the
in-process cost of tagging plus checking one frame (HMAC-SHA256) is printed per size.

    .venv/bin/python benchmarks/transport_bench.py [--quick] [--kinds tcp,tcp-nomac]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import anyio

from shardline.transport import shm, tcp

SIZES = [64, 4 << 10, 1 << 20, 16 << 20]
IDLE_SECONDS = 5.0
TOKEN = b"bench-token"
SPAWN = multiprocessing.get_context("spawn")


class Link(Protocol):
    def send(self, data: bytes) -> None: ...
    def recv(self) -> bytes | bytearray | memoryview: ...
    def close(self) -> None: ...


class TransportLink:
    """A shardline Transport driven through its blocking API (what a worker loop uses)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def send(self, data: bytes) -> None:
        self.transport.send_frame_blocking(data)

    def recv(self) -> bytes | bytearray | memoryview:
        frame: bytes | bytearray | memoryview = self.transport.recv_frame_blocking()
        return frame

    def close(self) -> None:
        self.transport.close()


class QueueLink:
    """Baseline: a pair of multiprocessing.Queue objects."""

    def __init__(self, outgoing: Any, incoming: Any) -> None:
        self.outgoing, self.incoming = outgoing, incoming

    def send(self, data: bytes) -> None:
        self.outgoing.put(data)

    def recv(self) -> bytes:
        data: bytes = self.incoming.get()
        return data

    def close(self) -> None:
        self.outgoing.close()
        self.outgoing.join_thread()


class SocketLink:
    """Baseline: a Unix socketpair with [u32 length][payload] frames, as a user would write."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        self.sock.sendall(len(data).to_bytes(4, "little"))
        self.sock.sendall(data)

    def _exact(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise EOFError("socketpair closed")
            got += n
        return buffer

    def recv(self) -> bytearray:
        return self._exact(int.from_bytes(self._exact(4), "little"))

    def close(self) -> None:
        self.sock.close()


def child_loop(link: Link) -> None:
    """Echo, or count a stream and acknowledge it, or measure idle CPU; b"Q" ends it."""
    while True:
        frame = link.recv()
        head = bytes(memoryview(frame)[:8])
        if head == b"QUIT____":
            break
        if head == b"STREAM__":
            count = int(bytes(memoryview(frame)[8:]))
            for _ in range(count):
                link.recv()
            link.send(b"ok")
        elif head == b"IDLE____":
            cpu_before = time.process_time()
            link.recv()  # the parent waits IDLE_SECONDS before sending this
            link.send(str(time.process_time() - cpu_before).encode())
        else:
            link.send(bytes(frame))
    link.close()


def untagged(link: tcp.TcpTransport) -> tcp.TcpTransport:
    """The same authenticated connection without frame tags (both ends must do this)."""
    return tcp.TcpTransport(link._sock, max_message_size=link.max_message_size, session=None)


def child_main(kind: str, arg: Any) -> None:
    link: Link
    if kind == "shm":
        link = TransportLink(shm.connect(arg))
    elif kind == "tcp":
        link = TransportLink(tcp.connect_blocking(arg, TOKEN))
    elif kind == "tcp-nomac":
        link = TransportLink(untagged(tcp.connect_blocking(arg, TOKEN)))
    elif kind == "tcp-tls":
        address, tls = arg
        link = TransportLink(tcp.connect_blocking(address, TOKEN, tls=tls))
    elif kind == "mp.Queue":
        link = QueueLink(arg[1], arg[0])
    else:
        link = SocketLink(arg)
    child_loop(link)


def make_tls(folder: Path) -> tuple[tcp.TlsConfig, tcp.TlsConfig] | None:
    """A CA and two certificates it signed (server, client), or None without `openssl`."""
    if shutil.which("openssl") is None:
        return None

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=bench-ca", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    (folder / "leaf.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    ends = []
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", "leaf.ext")  # fmt: skip
        ends.append(tcp.TlsConfig(*(str(folder / f) for f in (f"{name}.pem", f"{name}.key", "ca.pem"))))
    return ends[0], ends[1]


_TLS_DIRS: list[tempfile.TemporaryDirectory[str]] = []  # removed when the benchmark exits


def tls_dir() -> Path:
    _TLS_DIRS.append(tempfile.TemporaryDirectory(prefix="shardline-bench-tls-"))
    return Path(_TLS_DIRS[-1].name)


def start(kind: str) -> tuple[Link, Any, list[Any]]:
    """The parent's link and the child process."""
    if kind == "shm":
        ours, address = shm.create_link(nslots=64, slot_size=256 << 10)
        process = SPAWN.Process(target=child_main, args=(kind, address))
        process.start()
        return TransportLink(ours), process, []
    if kind.startswith("tcp"):
        tls = make_tls(tls_dir()) if kind == "tcp-tls" else None
        listener = tcp.TcpListener(TOKEN, tls=tls[0] if tls else None)
        arg = (listener.address, tls[1]) if tls else listener.address
        process = SPAWN.Process(target=child_main, args=(kind, arg))
        process.start()

        async def accept() -> Any:
            try:
                return await listener.accept()
            finally:
                await listener.aclose()

        link = anyio.run(accept)
        return TransportLink(untagged(link) if kind == "tcp-nomac" else link), process, []
    if kind == "mp.Queue":
        to_child, from_child = SPAWN.Queue(), SPAWN.Queue()
        process = SPAWN.Process(target=child_main, args=(kind, (to_child, from_child)))
        process.start()
        return QueueLink(to_child, from_child), process, [to_child, from_child]
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process = SPAWN.Process(target=child_main, args=(kind, child_sock))
    process.start()
    child_sock.close()
    return SocketLink(parent_sock), process, []


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(kind: str, quick: bool) -> dict[str, Any]:
    link, process, _ = start(kind)
    result: dict[str, Any] = {"round_trip": {}, "throughput": {}}
    try:
        link.send(b"warm-up_")
        link.recv()
        for size in SIZES:
            payload = os.urandom(size)
            iterations = {64: 5000, 4 << 10: 3000, 1 << 20: 200, 16 << 20: 30}[size]
            if quick:
                iterations = max(iterations // 10, 5)
            for _ in range(min(50, iterations)):  # warm-up
                link.send(payload)
                link.recv()
            samples = []
            for _ in range(iterations):
                started = time.perf_counter()
                link.send(payload)
                link.recv()
                samples.append(time.perf_counter() - started)
            result["round_trip"][size] = {
                "p50_us": percentile(samples, 0.5) * 1e6,
                "p99_us": percentile(samples, 0.99) * 1e6,
                "iterations": iterations,
            }
            count = max(20, min(20_000, (512 << 20) // size))
            if quick:
                count = max(count // 10, 5)
            started = time.perf_counter()
            link.send(b"STREAM__" + str(count).encode())
            for _ in range(count):
                link.send(payload)
            link.recv()
            elapsed = time.perf_counter() - started
            result["throughput"][size] = {"GB_per_s": count * size / elapsed / 1e9, "count": count}
        link.send(b"IDLE____")
        time.sleep(IDLE_SECONDS)
        link.send(b"wake")
        cpu = float(bytes(link.recv()))
        result["idle_cpu_percent_of_core"] = cpu / IDLE_SECONDS * 100
        link.send(b"QUIT____")
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()
        link.close()
    return result


def human(size: int) -> str:
    return (
        f"{size >> 20} MiB"
        if size >= 1 << 20
        else f"{size >> 10} KiB"
        if size >= 1024
        else f"{size} B"
    )


def shm_python_cost(iterations: int = 20_000) -> float:
    """Microseconds of Python for one 64 B shm write plus its read, in one process.

    Nothing waits (the slot is free and the frame is there), so this is the per-message
    cost the ring code adds on top of the two semaphore wake-ups of a cross-process hop.
    """
    from shardline.transport.shm_ring import Ring

    ring = Ring.create(16, 64 << 10, 1)
    writer = shm.RingWriter(ring)
    reader = shm.RingReader(Ring.attach(ring.address), 0)
    payload = b"x" * 64
    try:
        started = time.perf_counter()
        for _ in range(iterations):
            writer.write(payload)
            reader.read()
        return (time.perf_counter() - started) / iterations * 1e6
    finally:
        reader.close()
        writer.close()


def hmac_cost(size: int) -> float:
    """Microseconds to tag one frame of `size` bytes and check it on the other end, as
    `transport.tcp` does (HMAC-SHA256 under the session key: copy the keyed state, feed the
    header and the payload, digest; twice), in one process."""
    key, payload = os.urandom(32), os.urandom(size)
    send, recv = hmac.new(key, b"C", hashlib.sha256), hmac.new(key, b"C", hashlib.sha256)
    iterations = max(5, min(20_000, (256 << 20) // max(size, 1) // 4))
    started = time.perf_counter()
    for seq in range(iterations):
        header = size.to_bytes(4, "big") + seq.to_bytes(8, "big")
        mac = send.copy()
        mac.update(header)
        mac.update(payload)
        tag = mac.digest()
        check = recv.copy()
        check.update(header)
        check.update(payload)
        assert hmac.compare_digest(check.digest(), tag)
    return (time.perf_counter() - started) / iterations * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the iterations")
    parser.add_argument("--out", default="benchmarks/out/transport.json")
    parser.add_argument(
        "--kinds",
        default="shm,tcp,tcp-nomac,tcp-tls,mp.Queue,socketpair",
        help="comma-separated rows (mp.Queue and socketpair, the baselines, are always run)",
    )
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k not in ("mp.Queue", "socketpair")]
    if "tcp-tls" in kinds and shutil.which("openssl") is None:
        print("no openssl command: skipping tcp-tls", file=sys.stderr)
        kinds.remove("tcp-tls")
    kinds += ["mp.Queue", "socketpair"]
    results = {}
    for kind in kinds:
        print(f"measuring {kind} ...", file=sys.stderr, flush=True)
        results[kind] = measure(kind, args.quick)

    base_q, base_s = results["mp.Queue"], results["socketpair"]
    print(
        f"\nround trip (two processes), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'transport':<11} {'size':>7} {'p50 us':>9} {'p99 us':>9} {'GB/s':>7}"
        f" {'p50 vs Queue':>13} {'p50 vs sockpair':>16} {'GB/s vs Queue':>14} {'GB/s vs sockpair':>17}"
    )
    for kind in kinds:
        for size in SIZES:
            rt, tp = results[kind]["round_trip"][size], results[kind]["throughput"][size]
            speed_q = base_q["round_trip"][size]["p50_us"] / rt["p50_us"]
            speed_s = base_s["round_trip"][size]["p50_us"] / rt["p50_us"]
            tput_q = tp["GB_per_s"] / base_q["throughput"][size]["GB_per_s"]
            tput_s = tp["GB_per_s"] / base_s["throughput"][size]["GB_per_s"]
            print(
                f"{kind:<11} {human(size):>7} {rt['p50_us']:>9.1f} {rt['p99_us']:>9.1f}"
                f" {tp['GB_per_s']:>7.2f} {speed_q:>12.1f}x {speed_s:>15.2f}x"
                f" {tput_q:>13.2f}x {tput_s:>16.2f}x"
            )
    python_us = min(shm_python_cost() for _ in range(3))
    print(f"\nshm write + read of 64 B in one process (the ring code's Python, no waits): {python_us:.2f} us")
    tag_us = {size: min(hmac_cost(size) for _ in range(3)) for size in SIZES}
    print("\ntcp frame tag + check (HMAC-SHA256, one process, both ends' work):")
    for size in SIZES:
        print(f"  {human(size):>7} {tag_us[size]:>10.1f} us  ({size / tag_us[size] / 1e3:.2f} GB/s)")
    if "tcp" in results and "tcp-nomac" in results:
        print("\ntcp with frame tags vs without (tcp / tcp-nomac):")
        for size in SIZES:
            rt = results["tcp"]["round_trip"][size]["p50_us"]
            rt0 = results["tcp-nomac"]["round_trip"][size]["p50_us"]
            tp = results["tcp"]["throughput"][size]["GB_per_s"]
            tp0 = results["tcp-nomac"]["throughput"][size]["GB_per_s"]
            print(f"  {human(size):>7} round trip p50 {rt0:.1f} -> {rt:.1f} us ({rt - rt0:+.1f}),"
                  f" one-way {tp0:.2f} -> {tp:.2f} GB/s ({(tp / tp0 - 1) * 100:+.0f}%)")
    print(f"\nidle blocked reader over {IDLE_SECONDS:.0f} s (% of one core):")
    for kind in kinds:
        print(f"  {kind:<11} {results[kind]['idle_cpu_percent_of_core']:.3f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": platform.uname()._asdict(),
                "cpus": os.cpu_count(),
                "quick": args.quick,
                "results": results,
                "shm_python_us_per_write_read": python_us,
                "tcp_tag_and_check_us": tag_us,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    if "shm" not in results:
        return
    ratio = base_q["round_trip"][64]["p50_us"] / results["shm"]["round_trip"][64]["p50_us"]
    print(
        f"targets: shm 64 B round trip {ratio:.1f}x faster than mp.Queue (>= 10x), "
        f"{base_s['round_trip'][64]['p50_us'] / results['shm']['round_trip'][64]['p50_us']:.2f}x "
        f"vs socketpair (> 1x); shm 16 MiB one-way "
        f"{results['shm']['throughput'][16 << 20]['GB_per_s']:.2f} GB/s (>= 3); idle shm reader "
        f"{results['shm']['idle_cpu_percent_of_core']:.3f}% (< 1%)"
    )
    print(f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
