"""The project's Prometheus metrics (prefix ``ftp_``) and how worker counts reach them.

How worker-side counts reach ``/metrics`` (vLLM runs the model in other processes: the
engine core, and with tensor parallelism one worker per rank):

The plugin keeps its counts inside each worker (``ftp_vllm.plugin.stats.RoutingStats``:
monotonic totals, plus a queue of per-request records). The API server *pulls* them with
vLLM's own engine-client utility call, ``engine_client.collective_rpc("ftp_routing_stats",
kwargs={"drain_requests": True})``, which travels API server -> engine core -> every worker
over vLLM's existing channels and returns one snapshot per rank (every tensor-parallel rank
holds the same numbers, rank 0 is read).

With data parallelism (``--data-parallel-size N``) one API server drives N engine cores, each
with its own workers, counts and request records. ``AsyncLLM.collective_rpc`` runs the call on
every engine but returns engine 0's answer only (vLLM 0.32 ``DPLBAsyncMPClient.
call_utility_async``), which would drop the other engines' drained records. So the poller asks
every engine itself (``engine_stats_rpc``: the engine client's ``call_utility_all_async``),
keeps one baseline per engine, sums their counter increments and keeps every engine's
records. With external load balancing each API server manages only its own engine(s) and
reports those; Prometheus sums over targets. ``StatsPoller`` does this every
``--stats-interval`` seconds and again just before each ``/metrics`` scrape (bounded wait,
so a long prefill step never stalls a scrape), turns the totals into counter increments
(differences between snapshots) and observes one histogram sample per drained request
record. The metric objects live in the API server process and are registered on the
registry that vLLM's ``/metrics`` route serves, so they appear next to vLLM's own metrics.

Why not ``PROMETHEUS_MULTIPROC_DIR``: with it, workers would write metric files that the API
server merges, but vLLM only sets it up for several API servers, the directory must be shared
and wiped between runs (with Ray on other nodes it is not even shared), and gauges need a
merge mode. Pulling needs nothing from the deployment, works for TP and Ray workers alike,
and the counts come from the same numbers the plugin's tests check. If vLLM does run with
``PROMETHEUS_MULTIPROC_DIR`` (several API servers), these metrics still work: only the API
server that owns the poller changes them, gauges are merged by most recent value.

Requests sent by the self-benchmark (request ids ``ftp-selfbench-...``) are left out of the
histograms and of ``ftp_prefill_tokens_total``; the start-up run is also left out of the
per-layer counters (the engine is idle then, so its totals are the baseline).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ftp_vllm.contract import STATS_METHOD

logger = logging.getLogger("vllm.ftp_vllm.server")  # vLLM's handlers, one name

SELF_BENCH_PREFIX = "ftp-selfbench-"
MAX_RECENT = 4096
LOGPROBS_DENSE = "prompt_logprobs_dense_requests"  # RoutingStats.snapshot key

SPARSITY_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (1.0,)
SPEEDUP_BUCKETS = (1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0)

# name -> (type, labels, help): the contract (tests/test_deploy.py, docs/METRICS.md)
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "ftp_prefill_tokens_total": (
        "counter", (), "Prompt tokens that went through routed prefill."),
    "ftp_skipped_token_blocks_total": (
        "counter", ("layer",), "Prompt token x decoder block pairs skipped by the router."),
    "ftp_computed_token_blocks_total": (
        "counter", ("layer",), "Prompt token x decoder block pairs computed in routed prefill."),
    "ftp_request_token_sparsity": (
        "histogram", (), "Per routed request: fraction of prompt token x block pairs skipped."),
    "ftp_request_flop_speedup": (
        "histogram", (), "Per routed request: dense over routed prefill FLOPs (FLOP model)."),
    "ftp_measured_prefill_speedup": (
        "gauge", (), "Self-benchmark on this hardware: dense over routed prefill time "
                     "(0 = not measured)."),
    "ftp_target_sparsity": (
        "gauge", (), "The server's default target sparsity (0 = dense unless asked)."),
    "ftp_max_sparsity": (
        "gauge", (), "Highest per-request target sparsity the served router accepts."),
    "ftp_self_benchmark_prefill_seconds": (
        "gauge", ("mode",), "Self-benchmark: median time of one batch of prompts, prefill "
                            "and one token, mode dense or routed."),
    "ftp_stats_poll_errors_total": (
        "counter", (), "Failed reads of the workers' routing statistics."),
    "ftp_route_min_prompt_tokens": (
        "gauge", (), "Prompts shorter than this are served dense unless they set "
                     "ftp_sparsity (--route-min-tokens; auto: measured at start-up)."),
    "ftp_short_prompt_dense_requests_total": (
        "counter", (), "Requests served dense because their prompt is shorter than "
                       "ftp_route_min_prompt_tokens and they set no ftp_sparsity."),
    "ftp_prompt_logprobs_dense_requests_total": (
        "counter", (), "Requests served dense because they ask for prompt log-probabilities "
                       "and set no ftp_sparsity of their own."),
}


class FTPMetrics:
    """The metric objects (one set per API server process)."""

    def __init__(self, num_layers: int, registry: CollectorRegistry | None = REGISTRY):
        def name(n: str) -> str:  # prometheus_client appends _total to counters itself
            return n.removesuffix("_total") if METRICS[n][0] == "counter" else n

        def make(n: str, **kw: Any) -> Any:
            kind, labels, doc = METRICS[n]
            cls = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[kind]
            if kind == "gauge":
                kw.setdefault("multiprocess_mode", "mostrecent")
            return cls(name(n), doc, labelnames=labels, registry=registry, **kw)

        self.num_layers = num_layers
        self.prefill_tokens = make("ftp_prefill_tokens_total")
        self.skipped = make("ftp_skipped_token_blocks_total")
        self.computed = make("ftp_computed_token_blocks_total")
        self.request_sparsity = make("ftp_request_token_sparsity", buckets=SPARSITY_BUCKETS)
        self.request_speedup = make("ftp_request_flop_speedup", buckets=SPEEDUP_BUCKETS)
        self.measured_speedup = make("ftp_measured_prefill_speedup")
        self.target_sparsity = make("ftp_target_sparsity")
        self.max_sparsity = make("ftp_max_sparsity")
        self.bench_seconds = make("ftp_self_benchmark_prefill_seconds")
        self.poll_errors = make("ftp_stats_poll_errors_total")
        self.prompt_logprobs_dense = make("ftp_prompt_logprobs_dense_requests_total")
        self.route_min_tokens = make("ftp_route_min_prompt_tokens")
        self.short_prompt_dense = make("ftp_short_prompt_dense_requests_total")
        for layer in range(num_layers):  # every series exists from the start (rate() works)
            self.skipped.labels(layer=str(layer))
            self.computed.labels(layer=str(layer))
        for mode in ("dense", "routed"):
            self.bench_seconds.labels(mode=mode)
        self.measured_speedup.set(0.0)


def response_id(internal_id: str | None) -> str | None:
    """The id an OpenAI client sees for an engine request id.

    The engine appends ``-<8 hex>`` to the server's id; completions add ``-<prompt index>``
    (``cmpl-X-0-1a2b3c4d`` -> ``cmpl-X``), chat does not (``chatcmpl-X-1a2b3c4d``).
    """
    if not internal_id:
        return None
    rid = internal_id.rsplit("-", 1)[0] if re.search(r"-[0-9a-f]{8}$", internal_id) else \
        internal_id
    if rid.startswith("cmpl-"):
        m = re.match(r"^(.*)-(\d+)$", rid)
        if m:
            rid = m.group(1)
    return rid


Snapshot = dict[str, Any]


def engine_snapshots(results: Sequence[Any] | None) -> list[Snapshot | None]:
    """One snapshot per engine from a stats RPC's answer.

    ``results`` is one list of worker answers per engine (``engine_stats_rpc``) or, from a
    plain ``collective_rpc``, the worker answers of a single engine. An engine's snapshot is
    its first worker answer that is not None: its tensor-parallel ranks hold the same numbers
    and the same request records, so reading more than one would count them twice.
    """
    results = list(results or [])
    if not any(isinstance(r, list | tuple) for r in results):
        results = [results]  # the worker answers of one engine
    return [next((w for w in workers or [] if w is not None), None) for workers in results]


def merge_totals(snaps: Sequence[Snapshot | None]) -> Snapshot | None:
    """The engines' running totals as one snapshot (``/ftp/stats``): numbers and per-layer
    lists summed, the FLOP-model speedup recomputed from the summed FLOPs."""
    snaps = [s for s in snaps if s is not None]
    if not snaps:
        return None
    out: Snapshot = {}
    for key, first in snaps[0].items():
        if key == "requests":
            continue
        values = [s.get(key) for s in snaps]
        if isinstance(first, bool) or first is None:
            out[key] = first
        elif isinstance(first, int | float):
            out[key] = sum(v for v in values if isinstance(v, int | float))
        elif isinstance(first, list):
            width = max(len(v) for v in values if isinstance(v, list))
            out[key] = [sum(v[i] for v in values if isinstance(v, list) and i < len(v))
                        for i in range(width)]
        else:
            out[key] = first
    if "dense_flops" in out and "routed_flops" in out:
        out["flop_speedup"] = (out["dense_flops"] / out["routed_flops"]
                               if out["routed_flops"] else 1.0)
    out["engines"] = len(snaps)
    return out


def engine_stats_rpc(engine_client: Any) -> Callable[..., Awaitable[list[Any]]]:
    """``collective_rpc`` on every engine the client manages: one list of worker answers per
    engine (see the module doc for why ``engine_client.collective_rpc`` is not enough)."""
    core = getattr(engine_client, "engine_core", None)
    call_all = getattr(core, "call_utility_all_async", None)

    async def every_engine(method: str, timeout: float | None = None, args: tuple = (),
                           kwargs: dict[str, Any] | None = None) -> list[Any]:
        if call_all is None:  # a client without several engines (in-process, tests)
            return [await engine_client.collective_rpc(method, timeout=timeout, args=args,
                                                       kwargs=kwargs)]
        return list(await call_all("collective_rpc", method, timeout, tuple(args), kwargs))

    return every_engine


class StatsPoller:
    """Pulls the workers' routing statistics into ``FTPMetrics`` (see the module doc)."""

    def __init__(
        self,
        rpc: Callable[..., Awaitable[list[Any]]],
        metrics: FTPMetrics,
        interval: float = 1.0,
        rpc_timeout: float = 60.0,
    ):
        self.rpc = rpc  # engine_stats_rpc(engine_client), or one engine's collective_rpc
        self.metrics = metrics
        self.interval = interval
        self.rpc_timeout = rpc_timeout
        self.last: Snapshot | None = None  # all engines' totals (merge_totals)
        self.last_per_engine: dict[int, Snapshot] = {}  # each engine's baseline
        self.recent: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.polls = 0
        self.errors = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ reading
    async def poll(self, count: bool = True) -> Snapshot | None:
        """Read and apply every engine's snapshot; ``count=False`` takes them as the baseline
        only. Returns the merged totals (None when no engine routes)."""
        async with self._lock:
            results = await self.rpc(STATS_METHOD, timeout=self.rpc_timeout,
                                     kwargs={"drain_requests": True})
            snaps = engine_snapshots(results)
            if all(s is None for s in snaps):
                return None
            for engine, snap in enumerate(snaps):
                if snap is not None:
                    self.apply(snap, count=count, engine=engine)
            self.last = merge_totals(list(self.last_per_engine.values()))
            self.polls += 1
            return self.last

    async def refresh(self, max_wait: float = 2.0) -> None:
        """Bring the metrics up to date before a scrape, waiting at most `max_wait`."""
        try:
            await asyncio.wait_for(asyncio.shield(self._safe_poll()), max_wait)
        except TimeoutError:
            pass

    async def _safe_poll(self) -> None:
        try:
            await self.poll()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - an engine problem must not break /metrics
            self.errors += 1
            self.metrics.poll_errors.inc()
            if self.errors in (1, 10) or self.errors % 100 == 0:
                logger.warning("FTP metrics: reading routing stats failed (%d so far): %r",
                               self.errors, e)

    async def run(self) -> None:
        while True:
            await self._safe_poll()
            await asyncio.sleep(self.interval)

    def start(self) -> asyncio.Task:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="ftp-stats")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None

    # ------------------------------------------------------------------ applying
    def apply(self, snap: Snapshot, count: bool = True, engine: int = 0) -> None:
        """One engine's snapshot: counter increments against that engine's own baseline,
        histogram samples and id lookups from its drained records."""
        m = self.metrics
        records = list(snap.get("requests") or [])
        own = [r for r in records if str(r.get("request_id") or "").startswith(SELF_BENCH_PREFIX)]
        user = [r for r in records if r not in own]
        last = self.last_per_engine.get(engine)
        if last is None or snap.get("routed_tokens", 0) < last.get("routed_tokens", 0):
            last = {"routed_tokens": 0, "skipped_per_layer": [0] * m.num_layers,
                    "kept_per_layer": [0] * m.num_layers}  # first read, or the worker restarted
        self.last_per_engine[engine] = {k: v for k, v in snap.items() if k != "requests"}
        if not count:
            return
        own_tokens = sum(int(r.get("prompt_tokens", 0)) for r in own)
        # (the self-benchmark never asks for prompt logprobs: every one is a user request)
        lp, lp_base = (int(s.get(LOGPROBS_DENSE, 0)) for s in (snap, last))
        m.prompt_logprobs_dense.inc(lp - lp_base if lp >= lp_base else lp)
        m.prefill_tokens.inc(max(0, snap["routed_tokens"] - last["routed_tokens"] - own_tokens))
        n = min(m.num_layers, len(snap["skipped_per_layer"]))
        for layer in range(n):
            skipped = snap["skipped_per_layer"][layer] - last["skipped_per_layer"][layer]
            kept = snap["kept_per_layer"][layer] - last["kept_per_layer"][layer]
            for r in own:  # the self-benchmark's own requests stay out of the counters
                skipped -= r["skipped_per_layer"][layer]
                kept -= r["kept_per_layer"][layer]
            if skipped > 0:
                m.skipped.labels(layer=str(layer)).inc(skipped)
            if kept > 0:
                m.computed.labels(layer=str(layer)).inc(kept)
        for r in user:
            s, f = r.get("token_sparsity"), r.get("flop_speedup")
            if s is not None and math.isfinite(s):
                m.request_sparsity.observe(s)
            if f is not None and math.isfinite(f):
                m.request_speedup.observe(f)
            key = response_id(r.get("request_id"))
            if key is not None:
                self.recent.setdefault(key, []).append(r)
                self.recent.move_to_end(key)
                while len(self.recent) > MAX_RECENT:
                    self.recent.popitem(last=False)
