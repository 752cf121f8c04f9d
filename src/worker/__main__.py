"""`python -m shardline.worker`: one worker rank as its own program.

Started by `shardline.worker.launch.launch_worker` (the engine's executor and the node agent),
which writes the rank's WorkerConfig to this program's stdin (msgpack) and closes it; the
program then runs `shardline.worker.main.run_worker` and exits with its status (0 after a
clean Shutdown, 1 after a reported failure, 2 for a config it cannot use).
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    # Ctrl-C reaches the whole foreground process group; the engine decides when workers stop.
    # Ignored from the first moment (run_worker ignores it too, once its imports are done).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from shardline.worker.launch import read_launch_payload

    try:
        config = read_launch_payload(sys.stdin.buffer)
    except ValueError as exc:
        print(f"shardline.worker: {exc}", file=sys.stderr)
        sys.exit(2)
    from shardline.worker.main import run_worker

    run_worker(config)


if __name__ == "__main__":
    main()
