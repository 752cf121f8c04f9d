"""EngineConfig: every knob of an engine, validated once, never mutated."""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from shardline.engine.errors import InvalidRequestError
from shardline.engine.speculative import SpeculativeConfig, SpeculativeConfigError

TransportKind = Literal["shm", "tcp", "inproc"]
_TRANSPORTS = ("shm", "tcp", "inproc")
ExecutorBackend = Literal["mp", "ray"]
_EXECUTOR_BACKENDS = ("mp", "ray")
_DEVICES = ("cpu", "cuda")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# --dtype values (vLLM's) -> the torch dtype's name; "auto" is resolved by `torch_dtype_name`.
DTYPES = {"auto": "auto", "float32": "float32", "float": "float32", "bfloat16": "bfloat16",
          "float16": "float16", "half": "float16"}
_CHECKPOINT_HALF_DTYPES = ("bfloat16", "float16")
# --kv-cache-dtype values (vLLM's) -> the cache's torch dtype name; "auto" is the model's dtype.
KV_CACHE_DTYPES = {"auto": "auto", "float16": "float16", "bfloat16": "bfloat16",
                   "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
CPU_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")
JINJA_MARKS = ("{", "}", "\n")  # as vLLM: a --chat-template with one of these may be the text itself


class ConfigError(InvalidRequestError):
    """An EngineConfig field is invalid or inconsistent with another field."""


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(name, message)


@dataclass(frozen=True)
class EngineConfig:
    """How to run an engine: which model, how it is sharded, how big its batches and cache are.

    Validation happens here (without I/O, but for whether a `chat_template` that is not jinja
    text names a file, and `device="auto"` looking for CUDA); checks that need the model (heads divisible by the
    tensor-parallel size, layers by the pipeline size) happen in `Engine.start`.
    """

    model: str = "smollm2-135m-instruct"
    """Name of a known model (fetched on first use) or a local Hugging Face directory."""
    model_arch: str | None = None
    """Architecture override; default is `architectures[0]` from the model's config.json."""
    served_model_name: str | tuple[str, ...] | None = None
    """The name(s) clients use for the model: the first is the one responses report, and a
    request naming any of them is served; default: the model's name (its directory's name)."""
    generation_config: str = "auto"
    """Where requests' default sampling settings come from (as vLLM's --generation-config):
    "auto" reads the model directory's generation_config.json (its temperature, top_p, top_k,
    min_p, repetition_penalty and max_new_tokens become defaults for the SamplingParams fields
    a request leaves out); "vllm" ignores those defaults (built-in ones apply); any other value
    is a folder holding a generation_config.json to read instead. Every id in the file's
    eos_token_id ends a request with "auto" and "vllm" alike (the model's file) and with a
    folder (that file); "none" ignores the file altogether."""
    chat_template: str | None = None
    """A chat template that replaces the tokenizer's: a file holding one, or the jinja text
    itself (as vLLM's --chat-template); default: the tokenizer's own."""
    tensor_parallel_size: int = 1
    """Worker processes one replica's layers are split across (tensor parallelism)."""
    pipeline_parallel_size: int = 1
    """Pipeline stages one replica's layers are split into."""
    data_parallel_size: int = 1
    """Independent replicas of the model, each with its own workers; requests go to the least
    busy one."""
    enable_expert_parallel: bool = False
    """Mixture-of-experts models: spread each MoE layer's experts over the tensor-parallel
    ranks of a replica (each rank holds num_experts / tensor_parallel_size whole experts)
    instead of splitting every expert's weights (vLLM's --enable-expert-parallel). The experts
    must divide evenly; a dense model ignores it."""
    transport: TransportKind = "shm"
    """How the engine talks to its workers: shared memory, tcp, or one in-process worker."""
    device: str = "cpu"
    """"cpu", "cuda" (or "cuda:N"), or "auto": CUDA when a CUDA device and a CUDA build of torch
    are present, else the CPU (resolved when the config is built)."""
    dtype: str | None = "auto"
    """Weights and activations dtype (as vLLM's --dtype): "auto" is float32 on the CPU and, on
    CUDA, the checkpoint's bfloat16 or float16 (bfloat16 for a float32 checkpoint); or float32
    (float), bfloat16, float16 (half). None means "auto"."""
    max_logprobs: int = 20
    """The most log-probabilities a request may ask for per token (logprobs, top_logprobs,
    prompt_logprobs; as vLLM's --max-logprobs); -1: no cap but the vocabulary."""
    block_size: int = 16
    """Tokens per KV-cache block (a power of two up to 128)."""
    num_kv_blocks: int | None = None
    """Fixed KV pool size; default: as many as `kv_cache_memory_bytes` holds."""
    kv_cache_memory_bytes: int | None = None
    """KV-cache bytes per worker. Default on CPU: room for one sequence of `max_model_len`
    tokens, at least 256 MiB (for the default model 360 MiB, which keeps engine and worker
    within ~1 GiB), never more than a quarter of the available RAM, and never more blocks than
    `max_num_seqs` full-length sequences use. Default on CUDA: see `gpu_memory_utilization`.
    The pages are committed in the background once the workers are ready."""
    kv_cache_dtype: str = "auto"
    """The KV cache's element type (as vLLM's --kv-cache-dtype): "auto" is the model's dtype
    (float32 on the CPU); "float16" or "bfloat16" (CPU and CUDA) halve a float32 cache, so the
    same `kv_cache_memory_bytes` holds twice the tokens, with the decode kernel reading 16-bit
    K/V (docs/KV_CACHE.md states the accuracy); "fp8" (= "fp8_e4m3") and "fp8_e5m2", CUDA only,
    store float8 with scale 1.0. Stores round to nearest; attention computes in the model's dtype."""
    gpu_memory_utilization: float = 0.9
    """On CUDA, the share of each GPU's memory a worker may use (as vLLM's
    `--gpu-memory-utilization`): the KV cache gets what this leaves after the weights (and
    whatever else already uses the device). Ignored when `kv_cache_memory_bytes` is set."""
    max_model_len: int | None = None
    """Context length: prompt plus generated tokens; default: the model's."""
    max_num_seqs: int = 128
    """Sequences in one batch at most."""
    max_num_batched_tokens: int = 2048
    """Tokens one step computes at most (prefill chunks and decodes together)."""
    long_prefill_token_threshold: int = 0
    """One request's prefill chunk takes at most this many tokens of a step (as vLLM's
    --long-prefill-token-threshold); 0 = a quarter of max_num_batched_tokens. A long prompt
    then leaves room in every step for the others, also for those that arrive while its
    chunks are in flight; alone, an 8,000-token prefill measured no slower in 512-token chunks
    than in 2,048-token ones (benchmarks/RESULTS.md section 14)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of a prompt prefix an earlier request computed."""
    max_waiting_requests: int = 4096
    """Unfinished requests the engine holds; beyond it new ones are refused (HTTP 429)
    instead of queueing without bound."""
    seed: int = 0
    """Seed of the workers' random state (requests with their own seed use theirs)."""
    plugins: tuple[str, ...] = field(default_factory=tuple)
    """"module:function" names imported in every worker before the model loads (registrations)."""
    worker_start_timeout: float = 300.0
    """Seconds the workers have to load the model and report ready."""
    heartbeat_interval: float = 0.5
    """Seconds between a worker's heartbeats (below worker_timeout)."""
    worker_timeout: float = 2.0
    """A worker that sends nothing (no heartbeat, no result) for this long is declared dead."""
    freeze_gc: bool = True
    """Call `gc.freeze()` once the engine is up (as vLLM does): objects alive by then (torch,
    the tokenizer, the caller's own start-up state) leave the cyclic collector's sight, so the
    collections serving triggers stay cheap (~100 ms each before, with ~10^5 library objects).
    It affects the whole process; an app that relies on collecting cycles created before the
    engine starts can turn it off."""
    max_worker_restarts: int = 3
    """Times a failed worker group is restarted (requests recompute); 0 = fail fast."""
    restart_backoff: float = 0.5
    """The first restart is immediate; each further one waits this long, doubling."""
    num_threads: int | None = None
    """torch threads per worker; default: CPU cores divided among the local workers."""
    async_scheduling: bool = True
    """Schedule step N+1 while step N runs on the workers (its sampled tokens are fed in by the
    workers, which keep them); the same tokens as scheduling after each step. Replicas without
    pipeline stages only (pipeline_parallel_size = 1; any tensor_parallel_size: every TP rank
    samples the same tokens); ignored otherwise."""
    cuda_graphs: bool = True
    """On CUDA, replay captured CUDA graphs for decode batches (single-rank workers); False runs
    every step eagerly (as vLLM's enforce_eager). No effect on CPU."""
    tcp_token: str | None = None
    """Shared secret for the tcp transport and node agents; default: a random one per engine."""
    nodes: int = 1
    """Machines one replica's ranks span. Node 0 is the head (this process); every other node K
    runs `SHARDLINE_TOKEN=TCP_TOKEN shardline worker --head HEAD_HOST:HEAD_PORT --node-rank K`."""
    ranks_per_node: tuple[int, ...] | None = None
    """Ranks on each node, node 0 first (consecutive ranks, node 0 the lowest); default: an
    even split of world_size."""
    head_host: str = "127.0.0.1"
    """The head's address as the other nodes reach it (agents, remote ranks, rendezvous)."""
    head_port: int = 0
    """Port node agents connect to; required (1-65535) when nodes > 1."""
    dist_master_addr: str | None = None
    """torch.distributed rendezvous host; default head_host when nodes > 1, else 127.0.0.1."""
    tls_certfile: str | None = None
    """With `tls_keyfile` and `tls_ca_certs` (all three or none; nodes > 1 only): mutual TLS
    for the links between nodes (agents and the other nodes' ranks' channels). The head's
    certificate (PEM); every node's agent gets `--tls-certfile/--tls-keyfile/--tls-ca` with
    its own certificate signed by the same CA."""
    tls_keyfile: str | None = None
    """The private key of `tls_certfile` (PEM)."""
    tls_ca_certs: str | None = None
    """The CA (PEM) that signed every node's certificate; peers must present one it signed."""
    distributed_executor_backend: ExecutorBackend = "mp"
    """How the ranks are placed and started (vLLM's --distributed-executor-backend): "mp",
    worker processes of this machine (and node agents for `nodes` > 1); "ray", Ray actors
    placed by a placement group per replica on a Ray cluster (docs/RAY.md; needs
    `pip install 'shardline[ray]'`). Messages go over shardline's transports either way."""
    ray_address: str | None = None
    """With distributed_executor_backend = "ray": the cluster to join (ray.init's address,
    e.g. "auto" or "ray://host:10001"); default $RAY_ADDRESS, else a new local cluster."""
    log_stats_interval: float = 10.0
    """Seconds between the stats lines logged while the engine is busy (throughput, running and
    waiting requests, KV-cache usage, prefix-cache hit rate; engine.stats_logger); 0 turns them
    off (vLLM's --disable-log-stats)."""
    speculative_config: str | dict[str, Any] | SpeculativeConfig | None = None
    """Speculative decoding (as vLLM's --speculative-config, a JSON object): e.g.
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    drafts up to 4 tokens a decode step by prompt lookup and verifies them in one step (greedy
    output unchanged; sampling keeps its distribution). Only method "ngram" (a draft model is
    refused); turns async_scheduling off. Requests with structured output,
    logit_bias, min_tokens, penalties, or top-k/top-p/min-p sampling decode without drafts.
    Off by default (engine/speculative.py)."""

    def __post_init__(self) -> None:
        _require(bool(self.model), "model", "must name a model or a directory")
        self._normalize()
        _require(
            isinstance(self.generation_config, str) and bool(self.generation_config),
            "generation_config",
            f"must be 'auto', 'vllm', 'none' or a folder holding generation_config.json, got {self.generation_config!r}",
        )
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        _require(self.transport in _TRANSPORTS, "transport", f"must be one of {_TRANSPORTS}, got {self.transport!r}")
        _require(self.device.split(":")[0] in _DEVICES, "device", f"must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        _require(
            self.transport != "inproc" or self.world_size == 1,
            "transport",
            f"'inproc' runs one in-process worker; tensor_parallel_size x pipeline_parallel_size = "
            f"{self.world_size} needs 'shm' or 'tcp'",
        )
        _require(
            isinstance(self.long_prefill_token_threshold, int) and self.long_prefill_token_threshold >= 0,
            "long_prefill_token_threshold",
            f"must be an integer >= 0, got {self.long_prefill_token_threshold!r}",
        )
        _require(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", f"must be a power of two <= 128, got {self.block_size}")
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", f"must be >= 1, got {self.num_kv_blocks}")
        _require(
            self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
            "kv_cache_memory_bytes",
            f"must be > 0, got {self.kv_cache_memory_bytes}",
        )
        self._validate_kv_cache_dtype()
        _require(
            isinstance(self.gpu_memory_utilization, int | float) and 0 < self.gpu_memory_utilization <= 1,
            "gpu_memory_utilization",
            f"must be in (0, 1], got {self.gpu_memory_utilization!r}",
        )
        _require(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", f"must be >= 2, got {self.max_model_len}")
        _require(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        _require(
            self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            f"must be >= 1, got {self.max_num_batched_tokens}",
        )
        _require(self.max_waiting_requests >= 1, "max_waiting_requests", f"must be >= 1, got {self.max_waiting_requests}")
        _require(self.worker_timeout > 0, "worker_timeout", f"must be > 0, got {self.worker_timeout}")
        _require(
            0 < self.heartbeat_interval < self.worker_timeout,
            "heartbeat_interval",
            f"must be > 0 and below worker_timeout ({self.worker_timeout}), got {self.heartbeat_interval}",
        )
        _require(self.max_worker_restarts >= 0, "max_worker_restarts", f"must be >= 0, got {self.max_worker_restarts}")
        _require(self.restart_backoff >= 0, "restart_backoff", f"must be >= 0, got {self.restart_backoff}")
        _require(self.worker_start_timeout > 0, "worker_start_timeout", f"must be > 0, got {self.worker_start_timeout}")
        self._validate_nodes()
        self._validate_tls()
        self._validate_speculative()
        self._validate_executor_backend()
        _require(isinstance(self.log_stats_interval, int | float) and self.log_stats_interval >= 0,
                 "log_stats_interval", f"must be a number of seconds >= 0 (0: off), got {self.log_stats_interval!r}")

    def _validate_kv_cache_dtype(self) -> None:
        """`kv_cache_dtype` one of KV_CACHE_DTYPES, and float8 only on CUDA."""
        value = self.kv_cache_dtype
        _require(isinstance(value, str) and value in KV_CACHE_DTYPES, "kv_cache_dtype",
                 f"must be one of {', '.join(KV_CACHE_DTYPES)}, got {value!r}")
        _require(not value.startswith("fp8") or self.device.startswith("cuda"), "kv_cache_dtype",
                 f"{value!r} (float8) needs a CUDA device; on the CPU ({self.device!r}) it must be "
                 f"one of {', '.join(CPU_KV_CACHE_DTYPES)}")

    def _validate_speculative(self) -> None:
        """`speculative_config` in its one form (a SpeculativeConfig), or a ConfigError naming it."""
        if self.speculative_config is None:
            return
        try:
            spec = SpeculativeConfig.parse(self.speculative_config)
        except SpeculativeConfigError as exc:
            raise ConfigError("speculative_config", str(exc)) from None
        object.__setattr__(self, "speculative_config", spec)

    @property
    def speculative(self) -> SpeculativeConfig | None:
        """The speculative decoding settings, or None (off)."""
        spec = self.speculative_config
        return spec if isinstance(spec, SpeculativeConfig) else None

    def _normalize(self) -> None:
        """Settings with more than one spelling, in their one form (the dataclass is frozen,
        so this is the one place they change): served names as a tuple, dtype by its torch
        name ("auto" stays), device "auto" resolved."""
        names = self.served_model_name
        if names is not None and not isinstance(names, str):
            names = tuple(names) if isinstance(names, Sequence) else names
            _require(isinstance(names, tuple) and bool(names), "served_model_name",
                     f"must be a name or a non-empty list of names, got {self.served_model_name!r}")
            object.__setattr__(self, "served_model_name", names)
        _require(all(isinstance(n, str) and n.strip() for n in self.served_model_names), "served_model_name",
                 f"every name must be a non-empty string, got {self.served_model_name!r}")
        dtype = "auto" if self.dtype is None else self.dtype
        _require(isinstance(dtype, str) and dtype in DTYPES, "dtype",
                 f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", DTYPES[dtype])
        _require(isinstance(self.device, str), "device", f"must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        if self.device == "auto":
            object.__setattr__(self, "device", "cuda" if cuda_available() else "cpu")
        _require(
            isinstance(self.max_logprobs, int) and not isinstance(self.max_logprobs, bool) and self.max_logprobs >= -1,
            "max_logprobs",
            f"must be an integer >= 0, or -1 for no cap, got {self.max_logprobs!r}",
        )
        if self.chat_template is not None:
            _require(isinstance(self.chat_template, str) and bool(self.chat_template.strip()), "chat_template",
                     f"must be a file or a jinja template, got {self.chat_template!r}")
            _require(
                pathlib.Path(self.chat_template).expanduser().is_file()
                or any(mark in self.chat_template for mark in JINJA_MARKS),
                "chat_template",
                f"{self.chat_template!r} is neither a file nor a jinja template (no {{, }} or newline in it)",
            )

    @property
    def served_model_names(self) -> tuple[str, ...]:
        """Every name clients may use for the model, the reported one first (empty: the
        model's own name)."""
        names = self.served_model_name
        if names is None:
            return ()
        return (names,) if isinstance(names, str) else tuple(names)

    def _validate_nodes(self) -> None:
        """Multi-node fields: the node split must add up to TP x PP, and agents need a way in."""
        _require(isinstance(self.nodes, int) and self.nodes >= 1, "nodes", f"must be an integer >= 1, got {self.nodes!r}")
        _require(0 <= self.head_port <= 65535, "head_port", f"must be a TCP port (0-65535), got {self.head_port}")
        _require(bool(self.head_host), "head_host", "must be an address the other nodes can reach")
        shape = (
            f"world size {self.world_size} = tensor_parallel_size {self.tensor_parallel_size} x "
            f"pipeline_parallel_size {self.pipeline_parallel_size}"
        )
        if self.ranks_per_node is not None:
            ranks = tuple(self.ranks_per_node)
            _require(
                len(ranks) == self.nodes,
                "ranks_per_node",
                f"lists {len(ranks)} nodes but nodes = {self.nodes}",
            )
            _require(all(isinstance(r, int) and r >= 1 for r in ranks), "ranks_per_node", f"every node needs >= 1 rank, got {ranks}")
            _require(
                sum(ranks) == self.world_size,
                "ranks_per_node",
                f"{shape}, but ranks_per_node {ranks} sums to {sum(ranks)}",
            )
        else:
            _require(
                self.world_size % self.nodes == 0,
                "nodes",
                f"{shape} does not split evenly over {self.nodes} nodes; set ranks_per_node",
            )
        if self.nodes == 1:
            return
        _require(
            self.transport in ("shm", "tcp"),
            "transport",
            f"nodes = {self.nodes} needs 'shm' (shared memory on the head, tcp to other nodes) or 'tcp', got {self.transport!r}",
        )
        _require(self.data_parallel_size == 1, "data_parallel_size", f"multi-node runs support one replica, got {self.data_parallel_size}")
        _require(1 <= self.head_port <= 65535, "head_port", f"nodes = {self.nodes} needs the port the agents connect to, got {self.head_port}")
        _require(bool(self.tcp_token), "tcp_token", f"nodes = {self.nodes} needs the shared token the agents were given")

    def _validate_tls(self) -> None:
        """TLS files: all three or none, and only where there are links between nodes."""
        names = ("tls_certfile", "tls_keyfile", "tls_ca_certs")
        given = [name for name in names if getattr(self, name)]
        if not given:
            return
        missing = [name for name in names if name not in given]
        _require(not missing, missing[0] if missing else names[0], f"TLS needs all of {', '.join(names)}; {', '.join(given)} given without {', '.join(missing)}")
        _require(self.nodes > 1, given[0], f"TLS protects the links between nodes; nodes = {self.nodes} has none")

    def _validate_executor_backend(self) -> None:
        """The ray backend: Ray installed, one node setting (Ray places the ranks)."""
        backend = self.distributed_executor_backend
        _require(backend in _EXECUTOR_BACKENDS, "distributed_executor_backend", f"must be one of {_EXECUTOR_BACKENDS}, got {backend!r}")
        if backend == "mp":
            _require(self.ray_address is None, "ray_address", "is for distributed_executor_backend = 'ray'")
            return
        _require(ray_installed(), "distributed_executor_backend",
                 "'ray' needs Ray, which is not installed: pip install 'shardline[ray]'")
        _require(self.nodes == 1, "nodes", f"Ray places the ranks on its nodes; nodes = {self.nodes} is for the 'mp' backend's agents")
        _require(self.transport != "inproc", "transport", "'inproc' runs in this process; the 'ray' backend needs 'shm' or 'tcp'")

    @cached_property
    def node_ranks(self) -> tuple[int, ...]:
        """How many ranks each node runs, node 0 (the head) first."""
        if self.ranks_per_node is not None:
            return tuple(self.ranks_per_node)
        return (self.world_size // self.nodes,) * self.nodes

    @cached_property
    def rendezvous_host(self) -> str:
        """Where torch.distributed's store listens: reachable from every node."""
        if self.dist_master_addr:
            return self.dist_master_addr
        return self.head_host if self.nodes > 1 else "127.0.0.1"

    @cached_property
    def world_size(self) -> int:
        """Ranks in one data-parallel replica's worker group."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @cached_property
    def output_rank(self) -> int:
        """The rank that samples: tensor-parallel rank 0 of the last pipeline stage."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    @cached_property
    def torch_dtype_name(self) -> str:
        """The workers' dtype: `dtype`, or for "auto" float32 on the CPU and on CUDA the
        checkpoint's half dtype (its config.json's torch_dtype; bfloat16 for a float32 one, as
        vLLM). Reads config.json once for "auto" on CUDA; the engine asks only after it
        located the model."""
        if self.dtype not in (None, "auto"):
            return str(self.dtype)
        if not self.device.startswith("cuda"):
            return "float32"
        from shardline.engine.model_info import checkpoint_dtype

        found = checkpoint_dtype(self.model)
        return found if found in _CHECKPOINT_HALF_DTYPES else "bfloat16"

    @cached_property
    def threads_per_worker(self) -> int:
        if self.num_threads is not None:
            return max(1, self.num_threads)
        workers = self.node_ranks[0] * self.data_parallel_size  # the ranks on this machine
        return max(1, (os.cpu_count() or 1) // workers)


def ray_installed() -> bool:
    """Whether `import ray` would find Ray (without importing it: that takes a second)."""
    if "ray" in sys.modules:
        return sys.modules["ray"] is not None
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def cuda_available() -> bool:
    """Whether the workers could run on CUDA: a CUDA device, and a torch built for CUDA that
    sees it. Without an NVIDIA driver it answers at once; with one it asks torch (in this
    process if torch is already imported, else in a short child process: the engine's own
    process never imports torch, which costs seconds and ~300 MB)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    if not pathlib.Path("/proc/driver/nvidia/version").exists() and not any(pathlib.Path("/dev").glob("nvidia[0-9]*")):
        return False
    import subprocess

    try:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.stdout.strip() == "True"
