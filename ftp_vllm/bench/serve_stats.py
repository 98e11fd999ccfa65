"""Statistics and the RESULTS.md section of `ftp-vllm serve-bench` (no vLLM import).

- ``round_orders``: servers one at a time, each round rotates the order (ABC, BCA, CAB), so
  every server takes every position once in 3 rounds and drift on a shared machine does not
  favour one of them; the routed server comes first in round 0 (the same-mode baseline is
  derived from what its engine runs);
- ``summarize``: per workload and mode, the median and the min-max of total token throughput
  and of each run's median TTFT over rounds; the routed mode's ratios against both vanilla
  baselines, as ratios of medians with the min-max of the per-round ratios (same round, same
  prompts); realized sparsity and prefix-cache hit rate (medians over rounds).

Ratios are "higher is better" for the routed server: throughput routed / vanilla, TTFT
vanilla / routed.
"""

from __future__ import annotations

import shlex
import statistics
from collections.abc import Sequence
from typing import Any

from ftp_vllm.bench.results import latest

KIND = "serve-bench"
FORMAT = 2  # record layout; records without "format" are the single-server (dense/routed) kind

VANILLA_DEFAULT = "vanilla-default"
VANILLA_SAME_MODE = "vanilla-same-mode"
ROUTED = "routed"
DENSE = "dense"  # the routed server with ftp_sparsity 0 per request (optional, not a baseline)
BASELINES = (VANILLA_DEFAULT, VANILLA_SAME_MODE)
MODES = (ROUTED, VANILLA_SAME_MODE, VANILLA_DEFAULT, DENSE)  # canonical order, routed first


def round_orders(items: Sequence[str], rounds: int) -> list[list[str]]:
    """Round r runs `items` rotated left by r: each item takes each position equally often."""
    items = list(items)
    n = len(items)
    return [items[r % n:] + items[:r % n] if n else [] for r in range(max(1, rounds))]


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """Median, min, max and count of the values that exist (None when there are none)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _ratios(routed: dict[int, dict], base: dict[int, dict], key: str,
            invert: bool) -> dict[str, Any] | None:
    """Ratio of medians over rounds, and the spread of per-round ratios (rounds both ran)."""
    r_med = spread([x.get(key) for x in routed.values()])
    b_med = spread([x.get(key) for x in base.values()])
    if not r_med or not b_med:
        return None
    num, den = (b_med, r_med) if invert else (r_med, b_med)
    per_round = [_ratio(base[i].get(key), routed[i].get(key)) if invert
                 else _ratio(routed[i].get(key), base[i].get(key))
                 for i in sorted(set(routed) & set(base))]
    s = spread(per_round) or {}
    return {"ratio": _ratio(num["median"], den["median"]),
            "round_min": s.get("min"), "round_max": s.get("max")}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """{workload: {"modes": {mode: stats}, "ratios": {baseline: {...}}}} over rounds."""
    out: dict[str, Any] = {}
    for wl in dict.fromkeys(r["workload"] for r in runs):
        by_mode: dict[str, dict[int, dict]] = {}
        for r in runs:
            if r["workload"] == wl and not r.get("failed"):
                by_mode.setdefault(r["mode"], {})[r["round"]] = r
        modes = {}
        for mode, per_round in by_mode.items():
            rs = list(per_round.values())
            modes[mode] = {
                "rounds": len(rs),
                "total_token_throughput": spread([r.get("total_token_throughput") for r in rs]),
                "median_ttft_ms": spread([r.get("median_ttft_ms") for r in rs]),
                "token_sparsity": spread([(r.get("routing") or {}).get("token_sparsity")
                                          for r in rs if mode in (ROUTED, DENSE)]),
                "prefix_cache_hit_rate": spread([(r.get("prefix_cache") or {}).get("hit_rate")
                                                 for r in rs]),
            }
        ratios = {}
        if ROUTED in by_mode:
            for base in (*BASELINES, DENSE):
                if base in by_mode:
                    ratios[base] = {
                        "throughput": _ratios(by_mode[ROUTED], by_mode[base],
                                              "total_token_throughput", invert=False),
                        "ttft": _ratios(by_mode[ROUTED], by_mode[base], "median_ttft_ms",
                                        invert=True)}
        out[wl] = {"modes": modes, "ratios": ratios}
    return out


# ------------------------------------------------------------------------------ markdown
def _f(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _med(s: dict | None, digits: int = 0, scale: float = 1.0) -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return _f(s["median"] * scale, digits)
    return (f"{_f(s['median'] * scale, digits)} ({_f(s['min'] * scale, digits)}-"
            f"{_f(s['max'] * scale, digits)})")


def _ratio_cell(r: dict | None) -> str:
    if not r or r.get("ratio") is None:
        return "-"
    if r.get("round_min") is None or r["round_min"] == r["round_max"]:
        return f"{r['ratio']:.2f}x"
    return f"{r['ratio']:.2f}x ({r['round_min']:.2f}-{r['round_max']:.2f})"


def _pct(s: dict | None) -> str:
    return "-" if not s else f"{100 * s['median']:.0f}%"


def record_dtype(rec: dict[str, Any]) -> str | None:
    """The `--dtype` the record's servers were started with (read from its command, which
    every record carries); None: the model's own."""
    args = shlex.split(rec.get("command") or "")
    for i, a in enumerate(args):
        if a == "--dtype" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--dtype="):
            return a.split("=", 1)[1]
    return None


def latest_per_target(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest serve-bench record of each routed target and served dtype, highest target
    first (the served default's run, then e.g. a `--sparsity 0` run measuring the plugin's
    cost), the model's own dtype before a `--dtype` run."""
    by_key: dict[tuple[Any, str | None], list[dict[str, Any]]] = {}
    for rec in results:
        if rec.get("kind") == KIND:
            by_key.setdefault((rec.get("target"), record_dtype(rec)), []).append(rec)

    def order(item: tuple[tuple[Any, str | None], list[dict[str, Any]]]) -> tuple:
        (target, dtype), _ = item
        return (target is None, -(target or 0), dtype is not None, dtype or "")

    return [latest(recs, KIND) for _, recs in sorted(by_key.items(), key=order)]


def markdown_section(results: list[dict[str, Any]]) -> str:
    """Markdown for the newest serve-bench result of each routed target (a `ftp_vllm.report`
    section)."""
    recs = latest_per_target(results)
    if not recs:
        return "_No serving benchmark yet: run `ftp-vllm serve-bench`._\n"
    return "\n".join(record_markdown(rec) for rec in recs)


def _servers(rec: dict[str, Any]) -> str:
    """How many servers the record ran, in words."""
    modes = [m for m in MODES if any(r.get("mode") == m for r in rec.get("runs", []))]
    words = {1: "one server", 2: "two servers", 3: "three servers", 4: "four servers"}
    return words.get(len(modes), f"{len(modes)} servers")


def record_markdown(rec: dict[str, Any]) -> str:
    """One serve-bench record: summary per workload, then every run."""
    if rec.get("format", 1) < FORMAT:
        return legacy_markdown(rec)
    hw, srv = rec.get("hardware", {}), rec.get("servers", {})
    same = srv.get(VANILLA_SAME_MODE)
    same_is_default = same is not None and not same.get("flags")
    same_note = (f"vLLM with `{' '.join(same['flags'])}` (plain vLLM's nearest mode to the "
                 "routed server's steps that route, which leave vLLM's compiled graph)"
                 if same and same.get("flags")
                 else "identical to vanilla default (the routed engine runs vLLM's default "
                      "execution mode), not started separately" if same_is_default
                 else "not run")
    exe = (srv.get(ROUTED) or {}).get("execution") or {}
    lines = [
        f"`{rec.get('command', 'ftp-vllm serve-bench')}`",
        "",
        f"vLLM's benchmark client (`vllm bench serve`, in-process; multi-turn through its chat "
        f"request function) against {_servers(rec)} started one at a time (vLLM "
        f"{rec.get('vllm', '?')}, {hw.get('machine', '?')}, {hw.get('cpus', '?')} CPUs, model "
        f"{rec.get('model', '?')} in {record_dtype(rec) or 'its own dtype'}, router "
        f"{rec.get('router') or '-'}, target "
        f"{rec.get('target') if rec.get('target') is not None else '-'}), "
        f"{rec.get('rounds', '?')} round(s) in rotated order. **vanilla default**: plain vLLM "
        "at its defaults (`--no-routing`: prefix caching, chunked prefill, compiled); "
        f"**vanilla same mode**: {same_note}; **routed**: `ftp-vllm serve` at its defaults"
        + (f" (engine: enforce_eager={exe.get('enforce_eager')}, prefix caching "
           f"{exe.get('enable_prefix_caching')}, chunked prefill "
           f"{exe.get('enable_chunked_prefill')})" if exe else "")
        + ". Total token throughput (tok/s, prompt + output) and median TTFT (s): median over "
        "rounds (min-max); ratios: routed over each vanilla (TTFT: vanilla / routed; > 1 means "
        "routed is better), ratio of medians (per-round min-max); sparsity: realized token "
        "sparsity of the routed runs (`ftp_` counters); hit rate: vLLM's prefix-cache hits / "
        "queries during the runs (vanilla default / routed).",
        "",
        "| workload | metric | vanilla default | vanilla same mode | routed | "
        "routed / default | routed / same mode | sparsity | hit rate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    wls = rec.get("workloads", {})
    for wl, s in (rec.get("summary") or {}).items():
        m, rt = s.get("modes", {}), s.get("ratios", {})
        vd, vs, ro = (m.get(k) or {} for k in (VANILLA_DEFAULT, VANILLA_SAME_MODE, ROUTED))
        same_key = VANILLA_DEFAULT if same_is_default else VANILLA_SAME_MODE
        if same_is_default:
            vs = vd
        desc = (wls.get(wl) or {}).get("description", "")
        label = f"{wl}: {desc}" if desc else wl
        hit = f"{_pct(vd.get('prefix_cache_hit_rate'))} / {_pct(ro.get('prefix_cache_hit_rate'))}"
        lines.append(
            f"| {label} | tok/s | {_med(vd.get('total_token_throughput'))} | "
            f"{_med(vs.get('total_token_throughput'))} | {_med(ro.get('total_token_throughput'))}"
            f" | {_ratio_cell((rt.get(VANILLA_DEFAULT) or {}).get('throughput'))} | "
            f"{_ratio_cell((rt.get(same_key) or {}).get('throughput'))} | "
            f"{_f((ro.get('token_sparsity') or {}).get('median'), 3)} | {hit} |")
        lines.append(
            f"| | median TTFT s | {_med(vd.get('median_ttft_ms'), 2, 1e-3)} | "
            f"{_med(vs.get('median_ttft_ms'), 2, 1e-3)} | "
            f"{_med(ro.get('median_ttft_ms'), 2, 1e-3)} | "
            f"{_ratio_cell((rt.get(VANILLA_DEFAULT) or {}).get('ttft'))} | "
            f"{_ratio_cell((rt.get(same_key) or {}).get('ttft'))} | | |")
    dense_rows = [(wl, s["ratios"][DENSE]) for wl, s in (rec.get("summary") or {}).items()
                  if DENSE in s.get("ratios", {})]
    if dense_rows:
        lines += ["", "Routed over **dense** (the routed server, requests asking `ftp_sparsity` "
                      "0; not a baseline for speed claims): " + "; ".join(
                          f"{wl} tok/s {_ratio_cell(r['throughput'])}, TTFT "
                          f"{_ratio_cell(r['ttft'])}" for wl, r in dense_rows) + "."]
    if rec.get("complete") is False:
        lines += ["", "**Incomplete run** (stopped early): only the runs below were measured."]
    failed = sum(r.get("failed", 0) or 0 for r in rec.get("runs", []))
    if failed:
        lines += ["", f"**{failed} request(s) failed** (see the runs in the JSON record)."]
    lines += ["", "Per run (round, server order, workload):", "",
              "| mode | round | target | workload | tok/s | TTFT median ms | TTFT p99 ms | "
              "TPOT median ms | sparsity | hit rate | failed |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rec.get("runs", []):
        target = "-" if r.get("sparsity") is None else f"{r['sparsity']:g}"
        rt_ = r.get("routing") or {}
        hr = (r.get("prefix_cache") or {}).get("hit_rate")
        lines.append(
            f"| {r['mode']} | {r['round']} | {target} | {r['workload']} | "
            f"{_f(r.get('total_token_throughput'))} | {_f(r.get('median_ttft_ms'))} | "
            f"{_f(r.get('p99_ttft_ms'))} | {_f(r.get('median_tpot_ms'))} | "
            f"{_f(rt_.get('token_sparsity'), 3) if r['mode'] in (ROUTED, DENSE) else '-'} | "
            f"{'-' if hr is None else f'{100 * hr:.0f}%'} | {r.get('failed', 0)} |")
    return "\n".join(lines) + "\n"


def legacy_markdown(rec: dict[str, Any]) -> str:
    """A format-1 record (one routed server, dense vs routed requests; no vanilla baseline)."""
    w, hw = rec["workload"], rec.get("hardware", {})
    lines = [
        "_Old-format record (routed vs dense on one server, no plain-vLLM baseline): "
        "superseded by `ftp-vllm serve-bench`, which compares with plain vLLM._",
        "",
        f"vLLM's benchmark client (`vllm bench serve`) against `ftp-vllm serve` "
        f"(vLLM {rec.get('vllm', '?')}, {hw.get('machine', '?')}, {hw.get('cpus', '?')} CPUs"
        f"{', model ' + rec['server']['model'] if rec.get('server', {}).get('model') else ''}"
        f"{', router ' + rec['server']['router'] if rec.get('server', {}).get('router') else ''}"
        f"): {w['num_prompts']} random prompts of {w['input_len']} tokens, {w['output_len']} "
        f"output tokens each, request rate {w['request_rate']}. Latencies in ms.",
        "",
        "| mode | round | target | measured sparsity | req/s | tok/s (in+out) | "
        "TTFT median | TTFT p99 | TPOT median | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rec["runs"]:
        rt = r.get("routing") or {}
        meas = rt.get("token_sparsity") if r.get("sparsity") else None
        target = "-" if r.get("sparsity") is None else f"{r['sparsity']:g}"
        lines.append(
            f"| {r['mode']} | {r.get('round', 0)} | {target} | {_f(meas, 3)} | "
            f"{_f(r.get('request_throughput'), 2)} | {_f(r.get('total_token_throughput'))} | "
            f"{_f(r.get('median_ttft_ms'))} | {_f(r.get('p99_ttft_ms'))} | "
            f"{_f(r.get('median_tpot_ms'))} | {r.get('failed', 0)} |")
    s = rec.get("summary") or {}
    if s.get("median_ttft_speedup"):
        lines += ["", f"Routed over dense: median TTFT {_f(s.get('median_ttft_speedup'), 2)}x "
                      f"faster, request throughput {_f(s.get('request_throughput_ratio'), 2)}x."]
    return "\n".join(lines) + "\n"
