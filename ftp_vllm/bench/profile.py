"""`ftp-vllm bench profile`: where one prefill's time goes, plain vLLM vs routed (torch profiler).

One engine at a time runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the
single-process executor, set by this command only), so PyTorch's profiler sees the model's
every op. For each configuration, one warm-up prompt, then one fresh random prompt of
``--tokens`` tokens prefilled (one output token) under the profiler. Time is split by what
each op does: routing's own work (step plan, router decision, subset attention metadata,
statistics; the labels are put on the runtime's methods for this command only), attention
(including the K/V cache write), linear layers, norms/RoPE/activations (in compiled runs:
inductor's fused kernels), gather/scatter of kept tokens, other ops, and the rest of the wall
time outside any op (Python, scheduler, sampler). ``host copies`` counts keep masks copied to
the host per step (one device synchronisation each on a GPU; free on the CPU).

    ftp-vllm bench profile --tokens 2048 --json results/profile_prefill.json
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from ftp_vllm.bench.results import emit, latest

KIND = "bench-profile"
CATEGORIES = (
    "routing: plan", "routing: router", "routing: metadata", "routing: stats",
    "attention", "linear", "norms, RoPE, activations", "gather/scatter", "other ops",
    "outside ops",
)
_RANGES = {  # RoutingRuntime method -> category (labels added for this command only)
    "_build_plan": "routing: plan",
    "route": "routing: router",
    "_subset_route": "routing: metadata",
    "part_metadata": "routing: metadata",
    "finish_step": "routing: stats",
}


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="profile one prefill: vanilla vs routed, by kind of work")
    p.add_argument("--model", default=None, help="HF folder (default: the prepared SmolLM2)")
    p.add_argument("--router", default=None,
                   help="router artifact folder (default: the shipped artifact)")
    p.add_argument("--tokens", type=int, default=2048, help="prompt length (default 2048)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.3, 0.4])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.set_defaults(func=_cmd_profile)


def op_category(name: str) -> str:
    """The kind of work an op (or an inductor graph call) does, from its name."""
    n = name.lower()
    if "attention" in n or "attn" in n:
        return "attention"
    if any(k in n for k in ("onednn_mm", "weight_packed_linear", "aten::mm", "aten::addmm",
                            "aten::linear", "aten::matmul", "aten::bmm")):
        return "linear"
    if any(k in n for k in ("rms_norm", "rotary", "silu", "compiledfxgraph", "cpp_fused",
                            "layer_norm")):
        return "norms, RoPE, activations"
    if any(k in n for k in ("index_select", "index_copy", "index_add", "aten::zeros_like")):
        return "gather/scatter"
    return "other ops"


def split_profile(events: Any, wall_us: float,
                  top: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """Microseconds per category: each op's self time goes to the routing label it runs
    under, else to the category of the outermost op it runs in (so an op's internal copies
    count as that op); wall time not inside any op is ``outside ops``. ``top``, if given,
    collects the self time per op name within each category."""
    totals: dict[str, float] = defaultdict(float)

    def walk(ev: Any, inherited: str | None) -> None:
        name = ev.name
        cat = inherited
        if name.startswith("ftp."):
            cat = name[4:]
        elif cat is None and "::" in name:
            cat = op_category(name)
        key = cat or op_category(name)
        totals[key] += ev.self_cpu_time_total
        if top is not None:
            per = top.setdefault(key, {})
            per[name] = per.get(name, 0.0) + ev.self_cpu_time_total
        for child in ev.cpu_children:
            walk(child, cat)

    roots = [ev for ev in events if ev.cpu_parent is None]
    for ev in roots:
        walk(ev, None)
    totals["outside ops"] += max(wall_us - sum(ev.cpu_time_total for ev in roots), 0.0)
    return {c: totals.get(c, 0.0) for c in CATEGORIES}


def _label_runtime() -> None:
    """Put profiler labels on the routing runtime's methods."""
    import torch

    from ftp_vllm.plugin.runtime import RoutingRuntime

    for method, category in _RANGES.items():
        fn = getattr(RoutingRuntime, method)
        if getattr(fn, "_ftp_labelled", False):
            continue

        def wrap(fn: Any = fn, label: str = "ftp." + category) -> Any:
            @functools.wraps(fn)
            def labelled(*a: Any, **kw: Any) -> Any:
                with torch.profiler.record_function(label):
                    return fn(*a, **kw)

            labelled._ftp_labelled = True
            return labelled

        setattr(RoutingRuntime, method, wrap())


def run_profile(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from ftp_vllm.bench.prefill import default_router, random_prompts
    from ftp_vllm.contract import STATS_METHOD
    from ftp_vllm.eval.methods import display_path
    from ftp_vllm.plugin import routing_overrides
    from ftp_vllm.plugin.memory import llm_kv_kwargs
    from ftp_vllm.plugin.offline import shutdown_engine

    if args.model is None:
        from ftp_vllm.model.prepare import ensure_model

        model_dir = ensure_model()
    else:
        model_dir = Path(args.model)
    router = args.router or default_router()
    if router is None:
        raise SystemExit("no router artifact: pass --router")
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    max_len = args.tokens + 8
    _label_runtime()
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)

    def engine(**kw: Any) -> Any:
        return LLM(str(model_dir), dtype=args.dtype, max_model_len=max_len, seed=0,
                   skip_tokenizer_init=True, distributed_executor_backend="uni",
                   **llm_kv_kwargs(model_dir, dtype=args.dtype, max_model_len=max_len), **kw)

    def one(llm: Any, s: float | None, seed: int) -> tuple[dict[str, float], float, int, dict]:
        extra = None if s is None else {"ftp_sparsity": s}
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                extra_args=extra)
        llm.generate(random_prompts(1, args.tokens, vocab, seed=seed), params, use_tqdm=False)
        prompt = random_prompts(1, args.tokens, vocab, seed=seed + 1)
        if s is not None:
            llm.collective_rpc(STATS_METHOD, kwargs={"reset": True})
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            llm.generate(prompt, params, use_tqdm=False)
            wall_us = (time.perf_counter() - t0) * 1e6
        top: dict[str, dict[str, float]] = {}
        split = split_profile(prof.events(), wall_us, top)
        biggest = {cat: {n: round(t / 1e3, 1) for n, t in sorted(
            ops.items(), key=lambda kv: -kv[1])[:4]} for cat, ops in top.items()}
        host = llm.collective_rpc(STATS_METHOD)[0]["host_copies"] if s is not None else 0
        return split, wall_us, host, biggest

    configs: list[dict[str, Any]] = []
    plan = [("vanilla (defaults, compiled)", {}, [None]),
            ("vanilla --enforce-eager", {"enforce_eager": True}, [None]),
            ("routed", {"hf_overrides": routing_overrides(router, max(args.sparsities))},
             args.sparsities)]
    for i, (name, kw, targets) in enumerate(plan):
        print(f"profiling {name} ...", file=sys.stderr)
        llm = engine(**kw)
        try:
            for s in targets:
                split, wall, host, biggest = one(
                    llm, s, seed=1000 * (i + 1) + int(100 * (s or 0)))
                label = name if s is None else f"{name} {s:g}"
                configs.append({"config": label, "sparsity": s or 0.0, "wall_ms": wall / 1e3,
                                "host_copies": host,
                                "ms": {c: v / 1e3 for c, v in split.items()},
                                "top_ops_ms": biggest})
                print(f"  {label}: {wall / 1e3:.0f} ms", file=sys.stderr)
        finally:
            shutdown_engine(llm)
    return {
        "kind": KIND, "model": Path(model_dir).name, "router": display_path(router),
        "tokens": args.tokens, "dtype": args.dtype,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "command": "ftp-vllm " + " ".join(sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "configs": configs,
    }


def format_table(results: dict[str, Any]) -> str:
    """Milliseconds per kind of work, one column per configuration."""
    cfgs = results["configs"]
    lines = ["| ms | " + " | ".join(c["config"] for c in cfgs) + " |",
             "|---|" + "---|" * len(cfgs)]
    for cat in CATEGORIES:
        lines.append(f"| {cat} | " + " | ".join(f"{c['ms'][cat]:.0f}" for c in cfgs) + " |")
    lines.append("| **wall** | " + " | ".join(f"**{c['wall_ms']:.0f}**" for c in cfgs) + " |")
    lines.append("| keep masks copied to host | "
                 + " | ".join(str(c["host_copies"]) for c in cfgs) + " |")
    return "\n".join(lines)


def markdown_section(results: list[dict[str, Any]]) -> str:
    """Markdown for the latest profile (a `ftp_vllm.report` section)."""
    rec = latest(results, KIND)
    if rec is None:
        return "_No profile yet: run `ftp-vllm bench profile --json ...`._\n"
    return (f"`{rec['command']}` ({rec['device']}, {rec['model']}, {rec['dtype']}, router "
            f"`{rec['router']}`, one {rec['tokens']}-token prompt)\n\n"
            + format_table(rec) + "\n")


def _cmd_profile(args: argparse.Namespace) -> int:
    results = run_profile(args)
    return emit(results, format_table(results), args.json)
