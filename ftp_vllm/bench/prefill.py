"""`ftp-vllm bench prefill`: plain vLLM vs routed vLLM, same model, prompts, machine and run.

Plain vLLM runs at its defaults (compiled, prefix caching and chunked prefill on); the routed
engine as `ftp-vllm serve` runs it (the shipped artifact's routing mode and vLLM's defaults).
Both engines stay up for the whole run and are timed in alternating rounds (the order flips
every round, and each waits until the other's worker stops polling), so drift of the machine
hits both alike; each point reports the median over rounds of the per-round ratio and its
spread (min-max). Every timed batch uses fresh random prompts, so no prefix-cache hit fakes a
speedup. One routed engine serves every sparsity through the per-request target. Prefill is
timed as generation of one token; decode over the engine's steps after every request has its
first token (`--decode-tokens` more each, 64 by default), so no prefill is in it (the
difference of two timed generations would carry both prefills' spread). Beside each measured
ratio: the FLOP-model ideal speedup of the same requests (from the plugin's statistics). Both
engines run on the allocator `ftp-vllm serve` gives its engines (tcmalloc on CPU,
``ftp_vllm.allocator``).

    ftp-vllm bench prefill --lengths 512 1024 2048 --rounds 3
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ftp_vllm.bench.results import emit, latest

DEFAULT_SPARSITIES = (0.0, 0.22, 0.3, 0.4)
DEFAULT_LENGTHS = (512, 1024, 2048)
KIND = "bench-prefill"  # results files of this kind feed docs/RESULTS.md
# vLLM's workers busy-poll their step queue for 1 s after their last step (shm_broadcast's
# SpinCondition), and on CPU both engines' workers are bound to the same cores: the engine
# timed next waits this long after the other one's last step so it does not share them.
SETTLE_S = 1.5


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prefill", help="prefill (and decode) throughput, vanilla vs routed")
    p.add_argument("--model", default=None, help="HF folder (default: the prepared SmolLM2)")
    p.add_argument(
        "--router", default=None,
        help="router artifact folder, or 'static' for a static router with a uniform "
        "schedule (default: the shipped artifact, else static)",
    )
    p.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES))
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    p.add_argument("--prompts", type=int, default=1, help="prompts per timed batch")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds (each times every point once per engine)")
    p.add_argument("--decode-tokens", type=int, default=64,
                   help="tokens generated for the decode measurement (default 64)")
    p.add_argument("--dtype", default="bfloat16", help="served dtype (default bfloat16)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.set_defaults(func=_cmd_prefill)


def _static_artifact(model_dir: Path, sparsities: list[float], out: Path) -> Path:
    from ftp_vllm.artifact import folder_fingerprint, uniform_artifact
    from ftp_vllm.routing.router import StaticRouter

    fp, _ = folder_fingerprint(model_dir)
    targets = tuple(sorted({s for s in sparsities if s > 0})) or (0.3,)
    return uniform_artifact(out, fp, StaticRouter(), "static", targets,
                            {"made_by": "ftp-vllm bench prefill"})


def default_router() -> Path | None:
    from ftp_vllm.artifact import DEFAULT_ARTIFACT

    return DEFAULT_ARTIFACT if (DEFAULT_ARTIFACT / "router.json").exists() else None


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [
        {"prompt_token_ids": torch.randint(100, vocab - 1, (length,), generator=g).tolist()}
        for _ in range(n)
    ]


def _time(llm: Any, prompts: list, params: Any) -> float:
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0


def decode_timing(llm: Any, prompts: list, params: Any) -> tuple[int, float]:
    """(tokens, seconds) of decode: the tokens generated after every request has its first
    one, and the time from then to the last step (the engine's own step loop, so prefill
    stays out)."""
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"ftp-bench-decode-{time.monotonic_ns()}-{i}", prompt, params)
    counts: dict[str, int] = {}
    start = end = 0.0
    base = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:  # cumulative outputs: each holds the request's tokens so far
            counts[out.request_id] = len(out.outputs[0].token_ids)
        if not start and len(counts) == len(prompts) and min(counts.values()) > 0:
            start, base = now, sum(counts.values())
        elif start and outs:
            end = now
    tokens = sum(counts.values()) - base
    if not start or end <= start or tokens <= 0:
        raise RuntimeError("the decode measurement saw no decode step (max_tokens must be "
                           "at least 2)")
    return tokens, end - start


def _engine(model_dir: Path, max_len: int, dtype: str, hf_overrides: dict | None):
    """An offline engine at vLLM's defaults (prefix caching, chunked prefill, compiled)."""
    from vllm import LLM

    from ftp_vllm.plugin.memory import llm_kv_kwargs

    kw: dict[str, Any] = dict(
        dtype=dtype, max_model_len=max_len, seed=0, skip_tokenizer_init=True,
        **llm_kv_kwargs(model_dir, dtype=dtype, max_model_len=max_len),
    )
    if hf_overrides:
        kw["hf_overrides"] = hf_overrides
    return LLM(str(model_dir), **kw)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig
    from vllm import SamplingParams

    from ftp_vllm.plugin import routing_overrides
    from ftp_vllm.plugin.offline import shutdown_engine

    if args.rounds < 1 or args.prompts < 1 or args.decode_tokens < 1:
        raise SystemExit("--rounds, --prompts and --decode-tokens must be at least 1")
    if args.model is None:
        from ftp_vllm.model.prepare import ensure_model

        model_dir = ensure_model()
    else:
        model_dir = Path(args.model)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    tmp = tempfile.TemporaryDirectory(prefix="ftp-bench-")
    router = args.router or default_router() or "static"
    if router == "static":
        router = _static_artifact(model_dir, args.sparsities, Path(tmp.name) / "static")
    max_len = max(args.lengths) + args.decode_tokens + 8
    lengths = sorted(args.lengths)
    decode_len = min(lengths)
    seeds = itertools.count(100)  # every timed batch gets fresh prompts

    def params(s: float | None, max_tokens: int = 1) -> Any:
        extra = None if s is None else {"ftp_sparsity": s}
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                              ignore_eos=True, extra_args=extra)

    def timed(llm: Any, n: int, p: Any) -> float:
        return _time(llm, random_prompts(args.prompts, n, vocab, seed=next(seeds)), p)

    def decode_tok_s(llm: Any, s: float | None) -> float:
        prompts = random_prompts(args.prompts, decode_len, vocab, seed=next(seeds))
        tokens, seconds = decode_timing(llm, prompts, params(s, 1 + args.decode_tokens))
        return tokens / seconds

    from ftp_vllm.allocator import preload_for_engines

    allocator = preload_for_engines()  # as `ftp-vllm serve` does, for both engines
    if allocator is not None:
        print(allocator[1], file=sys.stderr)
    print(f"vanilla vLLM (defaults): {model_dir}", file=sys.stderr)
    vanilla = _engine(model_dir, max_len, args.dtype, None)
    print(f"routed vLLM: router {router}", file=sys.stderr)
    routed = _engine(model_dir, max_len, args.dtype,
                     routing_overrides(router, max(args.sparsities)))
    try:
        for n in lengths:  # warm-up: compiled shapes, first-use allocations
            timed(vanilla, n, params(None))
            for s in args.sparsities:
                timed(routed, n, params(s))
        van: dict[int, list[float]] = {n: [] for n in lengths}
        rou: dict[tuple[float, int], list[float]] = {}
        ideal: dict[tuple[float, int], list[float]] = {}
        skipped: dict[tuple[float, int], list[float]] = {}
        dec_v: list[float] = []
        dec_r: dict[float, list[float]] = {s: [] for s in args.sparsities}

        def run_vanilla() -> None:
            for n in lengths:
                van[n].append(args.prompts * n / timed(vanilla, n, params(None)))
            dec_v.append(decode_tok_s(vanilla, None))

        def run_routed() -> None:
            for s in args.sparsities:
                for n in lengths:
                    routed.collective_rpc("ftp_routing_stats", kwargs={"reset": True})
                    t = timed(routed, n, params(s))
                    st = routed.collective_rpc("ftp_routing_stats")[0]
                    rou.setdefault((s, n), []).append(args.prompts * n / t)
                    ideal.setdefault((s, n), []).append(st["flop_speedup"])
                    pairs = max(st["token_block_pairs"], 1)
                    skipped.setdefault((s, n), []).append(st["skipped_pairs"] / pairs)
                dec_r[s].append(decode_tok_s(routed, s))

        for r in range(args.rounds):
            order = (run_vanilla, run_routed) if r % 2 == 0 else (run_routed, run_vanilla)
            t0 = time.perf_counter()
            for run in order:
                time.sleep(SETTLE_S)
                run()
            print(f"round {r + 1}/{args.rounds} ({'vanilla' if r % 2 == 0 else 'routed'} "
                  f"first): {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        shutdown_engine(routed)
        shutdown_engine(vanilla)
        tmp.cleanup()

    from ftp_vllm.eval.methods import display_path

    rows = []
    for s in args.sparsities:
        dec = _spread([r / v for r, v in zip(dec_r[s], dec_v, strict=True)])
        for n in lengths:
            ratio = _spread([r / v for r, v in zip(rou[(s, n)], van[n], strict=True)])
            rows.append({
                "sparsity": s, "prompt_len": n,
                "vanilla_tok_s": statistics.median(van[n]),
                "routed_tok_s": statistics.median(rou[(s, n)]),
                "speedup": ratio["median"], "speedup_min": ratio["min"],
                "speedup_max": ratio["max"],
                "flop_ideal": statistics.median(ideal[(s, n)]),
                "token_sparsity": statistics.median(skipped[(s, n)]),
                "decode_ratio": dec["median"], "decode_ratio_min": dec["min"],
                "decode_ratio_max": dec["max"],
            })
    return {
        "kind": KIND,
        "model": Path(model_dir).name,
        "router": display_path(router),
        "command": "ftp-vllm " + " ".join(sys.argv[1:]),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "dtype": args.dtype,
        "rounds": args.rounds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
        "vanilla_decode_tok_s": statistics.median(dec_v),
    }


def markdown_section(results: list[dict[str, Any]]) -> str:
    """Markdown for the latest prefill benchmark (a `ftp_vllm.report` section)."""
    rec = latest(results, KIND)
    if rec is None:
        return "_No prefill benchmark yet: run `ftp-vllm bench prefill --json ...`._\n"
    return (
        f"`{rec['command']}` ({rec['device']}, {rec['model']}, router `{rec['router']}`, "
        f"vanilla decode {rec['vanilla_decode_tok_s']:.1f} tok/s)\n\n"
        + format_table(rec) + "\n"
    )


def format_table(results: dict[str, Any]) -> str:
    head = (
        "| sparsity | prompt | token sparsity | vanilla tok/s | routed tok/s | speedup (min-max) "
        "| FLOP ideal | of ideal | decode ratio (min-max) |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in results["rows"]:
        of_ideal = r["speedup"] / r["flop_ideal"]
        spread = (f" ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
                  if "speedup_min" in r else "")
        dspread = (f" ({r['decode_ratio_min']:.2f}-{r['decode_ratio_max']:.2f})"
                   if "decode_ratio_min" in r else "")
        lines.append(
            f"| {r['sparsity']:.2f} | {r['prompt_len']} | {r['token_sparsity']:.3f} "
            f"| {r['vanilla_tok_s']:.1f} | {r['routed_tok_s']:.1f} | {r['speedup']:.3f}x{spread} "
            f"| {r['flop_ideal']:.3f}x | {of_ideal:.0%} | {r['decode_ratio']:.3f}{dspread} |"
        )
    return "\n".join(lines)


def _cmd_prefill(args: argparse.Namespace) -> int:
    results = run_bench(args)
    return emit(results, format_table(results), args.json)
