"""torch.distributed's rendezvous store listens on the rendezvous address only, not on every
interface (torch's own tcp:// path binds ``*:PORT``), and the ranks still meet through it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

# One rank of a world of two joins through `init_distributed`, runs an all-reduce, and reports
# every socket its process listens on.
RANK = textwrap.dedent(
    """
    import json, sys
    import psutil, torch, torch.distributed as dist
    from shardline.model.parallel_context import destroy_distributed, init_distributed
    rank, port = int(sys.argv[1]), int(sys.argv[2])
    init_distributed(rank=rank, world_size=2, tp_size=2, pp_size=1,
                     init_method=f"tcp://127.0.0.1:{port}", backend="gloo", device="cpu",
                     timeout_s=60)
    total = torch.ones(1)
    dist.all_reduce(total)
    listening = [[c.laddr.ip, c.laddr.port] for c in psutil.Process().net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    dist.barrier()
    destroy_distributed()
    print(json.dumps({"sum": total.item(), "listening": listening}))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_store_listens_on_the_rendezvous_address_only() -> None:
    port = _free_port()
    env = {"SHARDLINE_TP_ALLREDUCE": "gloo", "PYTHONWARNINGS": "ignore"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(rank), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
        )
        for rank in (0, 1)
    ]
    reports = []
    for proc in ranks:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode(errors="replace")
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert [r["sum"] for r in reports] == [2.0, 2.0]
    store = [ip for ip, p in reports[0]["listening"] if p == port]
    assert store == ["127.0.0.1"], reports[0]["listening"]  # rank 0 serves the store, here only
    for report in reports:  # nothing of either rank listens on every interface
        wildcard = [(ip, p) for ip, p in report["listening"] if ip in ("0.0.0.0", "::")]
        assert not wildcard, report["listening"]
