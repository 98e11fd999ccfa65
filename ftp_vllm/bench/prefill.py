"""`ftp-vllm bench prefill`: vanilla vLLM vs routed vLLM, same model, prompts and run.

Vanilla runs in vLLM's default mode (compiled), the routed engine as the plugin configures it
(eager). Prefix caching is off in both and every repeat uses fresh random prompts, so no
prefix-cache hit fakes a speedup. One routed engine serves every sparsity through the
per-request target. Prefill is timed as generation of one token; decode as the extra time of
`--decode-tokens` tokens over that. Beside each measured ratio: the FLOP-model ideal speedup
of the same requests (from the plugin's statistics).

    ftp-vllm bench prefill --router static --lengths 512 1024 2048
    python -m ftp_vllm.bench.prefill prefill ...
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_SPARSITIES = (0.0, 0.22, 0.3, 0.4)
DEFAULT_LENGTHS = (512, 1024, 2048)
KIND = "bench-prefill"  # results files of this kind feed docs/RESULTS.md


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks of routed vs vanilla vLLM")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = sub.add_parser("prefill", help="prefill (and decode) throughput, vanilla vs routed")
    p.add_argument("--model", default=None, help="HF folder (default: the prepared SmolLM2)")
    p.add_argument(
        "--router", default=None,
        help="router artifact folder, or 'static' for a static router with a uniform "
        "schedule (default: the shipped artifact, else static)",
    )
    p.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES))
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    p.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    p.add_argument("--repeats", type=int, default=2, help="timed batches per point")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.set_defaults(func=_cmd_prefill)


def _static_artifact(model_dir: Path, sparsities: list[float], out: Path) -> Path:
    from ftp_vllm.artifact import folder_fingerprint, uniform_artifact
    from ftp_vllm.routing.router import StaticRouter

    fp, _ = folder_fingerprint(model_dir)
    targets = tuple(sorted({s for s in sparsities if s > 0})) or (0.3,)
    return uniform_artifact(out, fp, StaticRouter(), "static", targets,
                            {"made_by": "ftp-vllm bench prefill"})


def _default_router() -> Path | None:
    from ftp_vllm.artifact import DEFAULT_ARTIFACT

    return DEFAULT_ARTIFACT if (DEFAULT_ARTIFACT / "router.json").exists() else None


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[dict[str, Any]]:
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


def _engine(model_dir: Path, max_len: int, dtype: str, hf_overrides: dict | None):
    from vllm import LLM

    from ftp_vllm.plugin.memory import llm_kv_kwargs

    kw: dict[str, Any] = dict(
        dtype=dtype, max_model_len=max_len, enable_prefix_caching=False, seed=0,
        skip_tokenizer_init=True,
        **llm_kv_kwargs(model_dir, dtype=dtype, max_model_len=max_len),
    )
    if hf_overrides:
        kw["hf_overrides"] = hf_overrides
    return LLM(str(model_dir), **kw)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig
    from vllm import SamplingParams

    from ftp_vllm.plugin import routing_overrides
    from ftp_vllm.plugin.offline import shutdown_engine

    if args.model is None:
        from ftp_vllm.model.prepare import ensure_model

        model_dir = ensure_model()
    else:
        model_dir = Path(args.model)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    tmp = tempfile.TemporaryDirectory(prefix="ftp-bench-")
    router = args.router or _default_router() or "static"
    if router == "static":
        router = _static_artifact(model_dir, args.sparsities, Path(tmp.name) / "static")
    max_len = max(args.lengths) + args.decode_tokens + 8
    lengths = sorted(args.lengths)
    decode_len = min(lengths)

    def prefill_params(s: float | None) -> Any:
        extra = None if s is None else {"ftp_sparsity": s}
        return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args=extra)

    def decode_params(s: float | None) -> Any:
        extra = None if s is None else {"ftp_sparsity": s}
        return SamplingParams(
            max_tokens=1 + args.decode_tokens, temperature=0.0, detokenize=False,
            ignore_eos=True, extra_args=extra,
        )

    def measure(llm: Any, s: float | None, stats: bool) -> dict[str, Any]:
        point: dict[str, Any] = {}
        for n in lengths:
            _time(llm, _prompts(args.prompts, n, vocab, seed=1), prefill_params(s))  # warm
            if stats:
                llm.collective_rpc("ftp_routing_stats", kwargs={"reset": True})
            t = 0.0
            for r in range(args.repeats):
                t += _time(llm, _prompts(args.prompts, n, vocab, seed=100 + r), prefill_params(s))
            rec = {"prefill_tok_s": args.prompts * n * args.repeats / t}
            if stats:
                st = llm.collective_rpc("ftp_routing_stats")[0]
                rec["flop_ideal"] = st["flop_speedup"]
                pairs = max(st["token_block_pairs"], 1)
                rec["token_sparsity"] = st["skipped_pairs"] / pairs
            point[n] = rec
        prompts = _prompts(args.prompts, decode_len, vocab, seed=7)
        t_prefill = _time(llm, prompts, prefill_params(s))
        t_all = _time(llm, _prompts(args.prompts, decode_len, vocab, seed=7), decode_params(s))
        point["decode_tok_s"] = args.prompts * args.decode_tokens / max(t_all - t_prefill, 1e-9)
        return point

    from ftp_vllm.eval.methods import display_path

    results: dict[str, Any] = {
        "kind": KIND,
        "model": Path(model_dir).name,
        "router": display_path(router),
        "command": "ftp-vllm " + " ".join(sys.argv[1:]),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"vanilla vLLM (default mode): {model_dir}", file=sys.stderr)
    llm = _engine(model_dir, max_len, args.dtype, None)
    vanilla = measure(llm, None, stats=False)
    shutdown_engine(llm)
    print(f"routed vLLM: router {router}", file=sys.stderr)
    max_s = max(args.sparsities)
    llm = _engine(model_dir, max_len, args.dtype, routing_overrides(router, max_s))
    routed = {s: measure(llm, s, stats=True) for s in args.sparsities}
    shutdown_engine(llm)
    tmp.cleanup()

    rows = []
    for s in args.sparsities:
        for n in lengths:
            r, v = routed[s][n], vanilla[n]
            rows.append(
                {
                    "sparsity": s, "prompt_len": n,
                    "vanilla_tok_s": v["prefill_tok_s"], "routed_tok_s": r["prefill_tok_s"],
                    "speedup": r["prefill_tok_s"] / v["prefill_tok_s"],
                    "flop_ideal": r.get("flop_ideal", 1.0),
                    "token_sparsity": r.get("token_sparsity", 0.0),
                    "decode_ratio": routed[s]["decode_tok_s"] / vanilla["decode_tok_s"],
                }
            )
    results["rows"] = rows
    results["vanilla_decode_tok_s"] = vanilla["decode_tok_s"]
    return results


def markdown_section(results: list[dict[str, Any]]) -> str:
    """Markdown for the latest prefill benchmark (a `ftp_vllm.report` section)."""
    rows = [r for r in results if r.get("kind") == KIND]
    if not rows:
        return "_No prefill benchmark yet: run `ftp-vllm bench prefill --json ...`._\n"
    rec = max(rows, key=lambda r: r.get("created", ""))
    return (
        f"`{rec['command']}` ({rec['device']}, {rec['model']}, router `{rec['router']}`, "
        f"vanilla decode {rec['vanilla_decode_tok_s']:.1f} tok/s)\n\n"
        + format_table(rec) + "\n"
    )


def format_table(results: dict[str, Any]) -> str:
    head = (
        "| sparsity | prompt | token sparsity | vanilla tok/s | routed tok/s | speedup "
        "| FLOP ideal | of ideal | decode ratio |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in results["rows"]:
        of_ideal = r["speedup"] / r["flop_ideal"]
        lines.append(
            f"| {r['sparsity']:.2f} | {r['prompt_len']} | {r['token_sparsity']:.3f} "
            f"| {r['vanilla_tok_s']:.1f} | {r['routed_tok_s']:.1f} | {r['speedup']:.3f}x "
            f"| {r['flop_ideal']:.3f}x | {of_ideal:.0%} | {r['decode_ratio']:.3f} |"
        )
    return "\n".join(lines)


def _cmd_prefill(args: argparse.Namespace) -> int:
    results = run_bench(args)
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftp_vllm.bench.prefill")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["bench"]:
        argv.insert(0, "bench")  # `python -m ftp_vllm.bench.prefill prefill ...`
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
