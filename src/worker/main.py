"""Worker entry: one rank's life from start to exit.

Message order on the wire, per rank::

    worker -> engine   Hello(rank, world_size, pid)          right after connecting
    worker -> engine   Heartbeat(rank, seq)                  every heartbeat_interval, from a thread
    worker -> engine   WorkerReady(rank, num_kv_blocks)      model loaded, KV cache allocated
    engine -> workers  ExecuteStep ...                       each answered by StepResult (output rank)
    engine -> workers  Shutdown                              clean exit, status 0
    worker -> engine   WorkerError(rank, kind, message, tb)  on any failure, then exit status 1

``run_worker(config_dict)`` is what the worker program (``python -m shardline.worker``,
started by ``shardline.worker.launch.launch_worker`` with its config on stdin) runs.
``Worker(config).run()`` also runs in a thread of the engine's process (single rank,
``inproc`` channels): then there is no torch.distributed group and nothing process-global
(threads, logging handlers) is changed unless asked. A worker never hangs on a dead engine:
receives time out to check the parent, and in its own process the heartbeat thread exits the
process if the parent disappears. A rank whose parent (the engine) is gone unlinks the
shared-memory names it knows before it exits, the engine's rings and the TP communicator's
(`_unlink_orphaned_names`): the engine created them and can no longer remove them.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import MutableMapping
from typing import Any

import psutil
import torch

from shardline.model import profiling, q8_linear
from shardline.model.registry import ModelRegistry
from shardline.transport import connect_worker_channels
from shardline.transport.errors import TransportClosed
from shardline.transport.messages import (
    ExecuteStep,
    Heartbeat,
    Hello,
    InitWorker,
    Shutdown,
    WorkerError,
    WorkerReady,
)
from shardline.worker.config import WorkerConfig
from shardline.worker.heap import IdleTrim, retain_freed_memory
from shardline.worker.kv_cache import commit_kv_cache

logger = logging.getLogger("shardline.worker")

RECV_POLL_SECONDS = 1.0  # how often an idle worker checks that its parent is alive
ORPHAN_GRACE_SECONDS = 2 * RECV_POLL_SECONDS  # then the heartbeat thread forces the exit


class _RankAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every record with the rank, also when the worker is a thread."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[rank {self.extra['rank'] if self.extra else '?'}] {msg}", kwargs


def _torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype")
    return dtype


def import_plugins(plugins: list[str]) -> None:
    """Import each ``"module:function"`` (calling the function) or plain ``"module"``."""
    for spec in plugins:
        module_name, _, func_name = spec.partition(":")
        module = importlib.import_module(module_name)
        if func_name:
            func = getattr(module, func_name, None)
            if not callable(func):
                raise ValueError(f"plugin {spec!r}: {module_name} has no callable {func_name!r}")
            func()


class Worker:
    """One rank: connect, load, size the KV cache, then serve steps until Shutdown."""

    def __init__(self, config: dict[str, Any] | WorkerConfig, *, own_process: bool = False) -> None:
        self.config = config if isinstance(config, WorkerConfig) else WorkerConfig.from_dict(config)
        self.own_process = own_process
        self.log = _RankAdapter(logger, {"rank": self.config.rank})
        self._channels: Any = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._distributed = False
        self.idle_trim = IdleTrim(enabled=False)  # run_worker enables it in a worker process
        self._watch_ppid = (
            self.config.parent_pid is not None and os.getppid() == self.config.parent_pid
        )

    # ----------------------------------------------------------------- life cycle
    def run(self) -> int:
        """Serve until Shutdown (returns 0) or a failure (reports WorkerError, returns 1)."""
        cfg = self.config
        try:
            if self.own_process or cfg.num_threads is not None:
                torch.set_num_threads(cfg.torch_threads)
            self._channels = connect_worker_channels(cfg.channels_address, cfg.rank)
            self._channels.send(Hello(rank=cfg.rank, world_size=cfg.world_size, pid=os.getpid()))
            self._start_heartbeat()
            # After connecting, so that a plugin that fails to import is reported (WorkerError).
            import_plugins(cfg.plugins)
            ModelRegistry.register_specs(cfg.model_specs)
            runner = self._load()
            self._channels.send(WorkerReady(rank=cfg.rank, num_kv_blocks=runner.num_kv_blocks))
            commit_kv_cache(runner.model)  # in the background: ready first, pages committed after
            self.log.info("ready with %d KV blocks", runner.num_kv_blocks)
            self._serve(runner)
            return 0
        except TransportClosed:
            self.log.info("engine closed the channels; exiting")
            return 0
        except BaseException as exc:  # report everything, KeyboardInterrupt included
            self._report(exc)
            return 1
        finally:
            self._close()

    def _load(self) -> Any:
        from shardline.model.config import ModelConfig
        from shardline.model.loader import load_model
        from shardline.model.packed_linear import load_packed_model
        from shardline.worker.heap import release_free_memory
        from shardline.worker.kv_cache import agree_num_blocks, determine_num_blocks
        from shardline.worker.model_runner import ModelRunner

        cfg = self.config
        parallel_context = self._init_parallel()
        device = parallel_context.device
        dtype = _torch_dtype(cfg.dtype)
        if dtype is None and device.type == "cpu":
            dtype = torch.float32
        model_config = ModelConfig.from_path(
            cfg.model_path,
            dtype=dtype,
            architecture=cfg.model_arch,
            max_model_len=cfg.max_model_len,
        )
        started = time.monotonic()
        if device.type == "cpu":
            # Packed before the KV cache is sized, so the copy counts against memory.
            model, packing = load_packed_model(model_config, parallel_context)
        else:
            model, packing = load_model(model_config, parallel_context), {"packed": 0}
        if packing["packed"]:
            if packing["freed"] or packing["mapped"]:
                release_free_memory()
            self.log.info(
                "packed linear weights: %.1f MiB (%d of %d as integer blocks), %s; float32 "
                "copies let go: %.1f MiB", packing["packed"] / 2**20, packing["blocks"],
                packing["weights"], "read from the packed-weight cache" if packing["cached"]
                else "packed now and cached for the next start", packing["freed"] / 2**20)
        if packing.get("int8_layers"):
            self.log.info("int8 activations (SHARDLINE_CPU_ACTIVATIONS=int8): %d linear layers take "
                          "the int8-activation GEMM (results differ from float32's by the "
                          "activations' 8-bit rounding)", packing["int8_layers"])
        elif q8_linear.enabled():
            self.log.warning("SHARDLINE_CPU_ACTIVATIONS=int8, but no linear layer of this model takes "
                             "the int8-activation GEMM (it takes GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K "
                             "weights, or float32 weights that are such blocks, on a CPU float32 rank "
                             "with packing on): the model runs as without it")
        if packing.get("mapped"):
            self.log.info("token embedding mapped from the checkpoint: %.1f MiB, rows read as used",
                          packing["mapped"] / 2**20)
        if packing.get("gguf_layers"):
            self.log.info("GGUF weights kept in the file's blocks (mapped, no float32 copy): %d layers, "
                          "%.1f MiB", packing["gguf_layers"], packing["gguf_bytes"] / 2**20)
        self.log.info("weights ready in %.2f s", time.monotonic() - started)
        kv_dtype = model_config.dtype if cfg.kv_cache_dtype == "auto" else getattr(torch, cfg.kv_cache_dtype)
        local_blocks = determine_num_blocks(
            model,
            block_size=cfg.block_size,
            dtype=kv_dtype,
            device=device,
            num_kv_blocks=cfg.num_kv_blocks,
            kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=model_config.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            local_world_size=cfg.world_size,
        )
        num_blocks = agree_num_blocks(local_blocks, device)
        runner = ModelRunner(
            model,
            parallel_context,
            block_size=cfg.block_size,
            dtype=model_config.dtype,
            seed=cfg.seed,
            hidden_size=getattr(model_config.hf_config, "hidden_size", None),
            keep_sampled_tokens=cfg.pp_size == 1,
        )
        # CUDA graphs pad decode batches into one extra block that no request is ever given.
        use_graphs = cfg.cuda_graphs and device.type == "cuda" and cfg.world_size == 1
        # CPU pages are committed in the background once the rank is ready (`_commit_kv`).
        allocated = runner.initialize_kv_cache(num_blocks, scratch_blocks=1 if use_graphs else 0,
                                               populate=False, kv_dtype=kv_dtype)
        if use_graphs:
            from shardline.worker.cuda_graphs import CudaGraphDecoder

            graphs = CudaGraphDecoder(model, block_size=cfg.block_size, max_model_len=model_config.max_model_len,
                                      max_num_seqs=cfg.max_num_seqs, pad_block=num_blocks, device=device)
            graphs.capture()
            runner.model = graphs
        self.log.info(
            "loaded %s (%s, %s); KV cache %d blocks, %.1f MiB of %s",
            model_config.architecture,
            model_config.dtype,
            device,
            num_blocks,
            allocated / 2**20,
            str(kv_dtype).removeprefix("torch."),
        )
        return runner

    def _init_parallel(self) -> Any:
        from shardline.model.parallel_context import ParallelContext, init_distributed

        cfg = self.config
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            # One GPU per rank; DP replicas on one machine take consecutive ranges.
            index = (cfg.dp_rank * cfg.world_size + cfg.rank) % max(1, torch.cuda.device_count())
            device = torch.device("cuda", index)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if cfg.world_size == 1:
            return ParallelContext(dp_rank=cfg.dp_rank, dp_size=cfg.dp_size, device=device)
        assert cfg.dist_init_method is not None  # WorkerConfig checks this for world_size > 1
        context = init_distributed(
            rank=cfg.rank,
            world_size=cfg.world_size,
            tp_size=cfg.tp_size,
            pp_size=cfg.pp_size,
            dp_rank=cfg.dp_rank,
            dp_size=cfg.dp_size,
            init_method=cfg.dist_init_method,
            backend=cfg.dist_backend,
            device=device,
            enable_expert_parallel=cfg.enable_expert_parallel,
        )
        self._distributed = True
        return context

    def _serve(self, runner: Any) -> None:
        # The loop: 1) receive (timing out to check the parent)  2) act  3) answer.
        while True:
            try:
                msg = self._channels.recv(timeout=RECV_POLL_SECONDS)
            except TimeoutError:
                self.idle_trim.idle()  # idle for a poll: the last burst's heap goes back
                if self._parent_gone():
                    self.log.warning("parent process %s is gone; exiting", self.config.parent_pid)
                    self._unlink_orphaned_names()
                    return
                continue
            if isinstance(msg, ExecuteStep):
                with profiling.timed("step"):
                    result = runner.execute(msg)
                self.idle_trim.worked()
                if result is not None:
                    self._channels.send(result)
            elif isinstance(msg, Shutdown):
                self.log.info("shutdown requested")
                profiling.dump(self.config.rank)
                return
            elif isinstance(msg, InitWorker):
                self.log.debug("ignoring InitWorker: the config came at start")
            else:
                raise RuntimeError(f"worker cannot handle a {type(msg).__name__} message")

    def _parent_gone(self) -> bool:
        parent = self.config.parent_pid
        if parent is None or parent == os.getpid():
            return False
        if self._watch_ppid:  # robust against pid reuse: our parent changes when it dies
            return os.getppid() != parent
        return not psutil.pid_exists(parent)

    # ----------------------------------------------------------------- heartbeat
    def _start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(
            target=self._heartbeat_loop, name=f"shardline-heartbeat-{self.config.rank}", daemon=True
        )
        self._heartbeat.start()

    def _heartbeat_loop(self) -> None:
        seq = 0
        orphaned_since: float | None = None
        while not self._stop.wait(self.config.heartbeat_interval):
            if self.own_process and self._parent_gone():
                # An idle main thread notices within RECV_POLL_SECONDS and exits cleanly; one
                # stuck in a forward or a collective with a dead peer never will: leave for it.
                now = time.monotonic()
                orphaned_since = orphaned_since or now
                if now - orphaned_since > ORPHAN_GRACE_SECONDS:
                    self.log.error("parent process gone while busy; exiting")
                    self._unlink_orphaned_names()  # os._exit runs no finalizer or `_close`
                    os._exit(1)
            seq += 1
            try:
                self._channels.send(Heartbeat(rank=self.config.rank, seq=seq))
            except Exception as exc:  # channels closed or broken: the main thread will notice
                self.log.debug("heartbeat stopped: %s", exc)
                return

    # ----------------------------------------------------------------- failure and exit
    def _report(self, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.log.error("failed: %s: %s\n%s", type(exc).__name__, exc, tb)
        if self._channels is None:
            return
        try:
            self._channels.send(
                WorkerError(
                    rank=self.config.rank, kind=type(exc).__name__, message=str(exc), traceback=tb
                )
            )
        except Exception as send_exc:  # the engine may be gone already; the exit code says it
            self.log.error("could not report the failure: %s", send_exc)

    def _unlink_orphaned_names(self) -> None:
        """The engine is gone: unlink the shared-memory names this rank knows, the engine's
        channel rings (segments and semaphores) and the TP shm communicator's while it still
        owns any, so nothing stays in /dev/shm even if shardline never starts again. Only
        names go (mappings stay valid), so it is safe from the heartbeat thread while the main
        thread is busy; idempotent."""
        channels = self._channels
        unlink = getattr(channels, "unlink_shm_names", None)
        if unlink is not None:
            try:
                names = unlink()
                if names:
                    self.log.info("unlinked the dead engine's %d shared-memory names", len(names))
            except Exception as exc:  # best effort: the next start's sweep removes the rest
                self.log.warning("could not unlink the engine's shared memory: %s", exc)
        shm_comm = sys.modules.get("shardline.model.parallel.shm_comm")
        if shm_comm is not None:
            try:
                shm_comm.unlink_all()
            except Exception as exc:
                self.log.warning("could not unlink the TP communicator's names: %s", exc)

    def _close(self) -> None:
        if self.own_process and self._parent_gone():  # every exit path of an orphan passes here
            self._unlink_orphaned_names()
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)
        if self._distributed:
            try:
                from shardline.model.parallel_context import destroy_distributed

                destroy_distributed()
            except Exception as exc:  # never mask the real exit reason
                self.log.warning("destroy_distributed failed: %s", exc)
            self._distributed = False
        if self._channels is not None:
            try:
                self._channels.close()
            except Exception as exc:
                self.log.warning("closing channels failed: %s", exc)
            self._channels = None


def _configure_process_logging(rank: int) -> None:
    from shardline import log

    log.configure(log.level_from_env(), f"worker {rank}")


def _report_bad_config(config: Any, rank: int, exc: Exception) -> None:
    """Best effort: tell the engine why this rank cannot start, so it does not wait for it."""
    try:
        channels = connect_worker_channels(config["channels_address"], rank, timeout=10.0)
    except Exception:
        return
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        channels.send(
            WorkerError(rank=rank, kind=type(exc).__name__, message=str(exc), traceback=tb)
        )
    except Exception:
        pass  # nothing more to do; the exit status tells the executor
    finally:
        channels.close()


def run_worker(config: dict[str, Any]) -> None:
    """The worker program's body: run one rank and exit with its status (0 = clean Shutdown,
    1 = a failure reported as WorkerError, 2 = a config it cannot use)."""
    rank = config.get("rank", -1) if isinstance(config, dict) else -1
    # Ctrl-C reaches the whole foreground process group; the engine decides when workers stop
    # (Shutdown, or its death noticed through the parent check), so a worker ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _configure_process_logging(rank)
    retained = retain_freed_memory()  # before the model loads: every step's activations stay mapped
    try:
        worker = Worker(config, own_process=True)
        worker.idle_trim = IdleTrim(enabled=retained)
    except Exception as exc:
        logger.exception("invalid worker config")
        _report_bad_config(config, rank, exc)
        sys.exit(2)
    status = worker.run()
    logging.shutdown()
    sys.exit(status)
