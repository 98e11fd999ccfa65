"""`ftp-vllm eval`: accuracy, sparsity, FLOPs and LAMBADA perplexity of one configuration.

Writes one results file (`results/NAME.json`, kind "eval") that `ftp-vllm report` turns into
docs/RESULTS.md. The file records the canonical command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from ftp_vllm.eval.methods import METHODS, REPO_ROOT, display_path

DEFAULT_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy")
RESULT_FORMAT = 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="zero-shot accuracy, sparsity, FLOPs and LAMBADA perplexity of one configuration",
        description="Score multiple-choice tasks by log-likelihood (as lm-evaluation-harness "
        "does) with the reference routed forward, and write a results JSON.",
    )
    p.add_argument("--method", choices=METHODS, default="dense")
    p.add_argument("--sparsity", type=float, default=0.3,
                   help="mean token sparsity over blocks (ignored by dense; default 0.3)")
    p.add_argument("--router", type=Path, default=None,
                   help="router artifact folder (default: the shipped SmolLM2 artifact); used "
                   "by ftp, and by static/random with the searched schedule")
    p.add_argument("--schedule", choices=["searched", "uniform"], default=None,
                   help="override the per-block schedule (default: searched for ftp/static, "
                   "uniform for static-uniform/random)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated tasks (default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--limit", type=int, default=None,
                   help="items per task: a fixed random subset (default: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="subset seed (and the random router's seed)")
    p.add_argument("--ppl-passages", type=int, default=32,
                   help="LAMBADA heldout passages for perplexity (0 = skip; default 32)")
    p.add_argument("--calibration-passages", type=int, default=64,
                   help="LAMBADA tune passages for ShortGPT's Block Influence (default 64)")
    p.add_argument("--batch-tokens", type=int, default=512,
                   help="prompt tokens flattened into one forward (default 512: the "
                   "flattened attention mask costs O(tokens^2))")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (default 2; on a machine busy with other jobs 1 is "
                   "often faster)")
    p.add_argument("--model", type=Path, default=None,
                   help="model folder (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--output", type=Path, default=None,
                   help="results file (default results/<method>[-s<S>]-l<limit>.json)")
    p.add_argument("--engine", choices=["reference", "vllm"], default="reference",
                   help="score with the reference routed forward (default) or through the vLLM "
                   "engine with the plugin (dense, ftp and static methods)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def default_output(args: argparse.Namespace) -> Path:
    name = args.method
    if args.method != "dense":
        name += f"-s{args.sparsity:g}"
        if args.schedule and args.method in ("ftp", "static", "random") and \
                args.schedule != {"ftp": "searched", "static": "searched",
                                  "random": "uniform"}[args.method]:
            name += f"-{args.schedule}"
    name += f"-l{args.limit}" if args.limit else "-all"
    if args.engine != "reference":
        name += f"-{args.engine}"
    return Path("results") / f"{name}.json"


def canonical_command(args: argparse.Namespace, output: Path) -> str:
    """The command that reproduces this run, every choice spelt out."""
    parts = ["ftp-vllm", "eval", "--method", args.method]
    if args.method != "dense":
        parts += ["--sparsity", f"{args.sparsity:g}"]
    if args.router is not None:
        parts += ["--router", display_path(args.router)]
    if args.schedule is not None:
        parts += ["--schedule", args.schedule]
    parts += ["--tasks", args.tasks]
    if args.engine != "reference":
        parts += ["--engine", args.engine]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.ppl_passages != 32:
        parts += ["--ppl-passages", str(args.ppl_passages)]
    if args.method == "shortgpt" and args.calibration_passages != 64:
        parts += ["--calibration-passages", str(args.calibration_passages)]
    parts += ["--output", display_path(output)]
    return shlex.join(parts)


def _vllm_scorer(args: argparse.Namespace, model_dir: Path, info: dict[str, Any]):
    """The vLLM-engine scorer of a method the plugin serves: its searched schedule."""
    from ftp_vllm.artifact import STATIC_ARTIFACT
    from ftp_vllm.eval.methods import METHOD_ARTIFACT
    from ftp_vllm.eval.vllm_scorer import VLLMScorer

    if args.method not in ("dense", "window", "ftp", "static") or \
            info.get("schedule", "searched") != "searched":
        raise ValueError("--engine vllm serves dense, window, ftp and static (searched "
                         "schedule) only")
    default = METHOD_ARTIFACT.get(args.method, STATIC_ARTIFACT)
    artifact = None if args.method == "dense" else (args.router or default)
    return VLLMScorer(model_dir, artifact, args.sparsity if artifact else 0.0)


def git_state() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--", "ftp_vllm"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def run(args: argparse.Namespace) -> int:
    import torch

    from ftp_vllm.data import calibration_passages, load_task
    from ftp_vllm.data.tasks import task_spec
    from ftp_vllm.eval.harness import HFEncoder, evaluate_task, perplexity
    from ftp_vllm.eval.methods import build_method, tune_calibration
    from ftp_vllm.eval.scoring import ScoreStats
    from ftp_vllm.model import MODEL_NAME, ensure_model, load_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty")
    for t in tasks:
        task_spec(t)  # unknown names fail before the model loads
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    output = args.output or default_output(args)
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()

    path = ensure_model(args.model)
    model, tokenizer = load_model(path, dtype=torch.float32)
    encoder = HFEncoder(tokenizer)
    setup = build_method(args.method, model, args.sparsity, artifact=args.router,
                         schedule=args.schedule, seed=args.seed,
                         batch_tokens=args.batch_tokens,
                         calibration=tune_calibration(tokenizer, args.calibration_passages))
    scorer = setup.scorer
    if args.engine == "vllm":
        scorer = _vllm_scorer(args, path, setup.info)
    progress = not args.no_progress

    per_task: dict[str, Any] = {}
    total = ScoreStats()
    for task in tasks:
        items = load_task(task, limit=args.limit, seed=args.seed)
        res = evaluate_task(task, items, encoder, scorer, chunk_tokens=args.batch_tokens,
                            progress=progress)
        per_task[task] = res.to_dict()
        total = total + res.stats
        print(f"{task}: acc {res.acc:.4f} acc_norm {res.acc_norm:.4f} (n={res.n}) "
              f"sparsity {res.stats.sparsity:.3f} flops {res.stats.flop_fraction:.3f} "
              f"{res.seconds / max(res.n, 1):.2f} s/item", flush=True)

    lambada = None
    if args.ppl_passages > 0:
        passages = calibration_passages("heldout", limit=args.ppl_passages, seed=0)
        ppl = perplexity(passages, encoder, scorer, chunk_tokens=args.batch_tokens,
                         progress=progress)
        lambada = {"split": "heldout", **ppl.to_dict()}
        print(f"lambada heldout: passage perplexity {ppl.perplexity:.3f} over {ppl.tokens} "
              f"tokens, last-word perplexity {ppl.word_perplexity:.3f} "
              f"(sparsity {ppl.stats.sparsity:.3f})", flush=True)

    result = {
        "kind": "eval",
        "format": RESULT_FORMAT,
        **setup.info,
        "model": MODEL_NAME if args.model is None else display_path(path),
        "dtype": "float32",
        "scorer": scorer.describe(),
        "tasks": per_task,
        "task_list": tasks,
        "limit": args.limit,
        "seed": args.seed,
        "average": {
            "acc": sum(r["acc"] for r in per_task.values()) / len(per_task),
            "acc_norm": sum(r["acc_norm"] for r in per_task.values()) / len(per_task),
        },
        "sparsity": total.sparsity,
        "flop_fraction": total.flop_fraction,
        "prompt_tokens": total.tokens,
        "lambada": lambada,
        "command": canonical_command(args, output),
        "git": git_state(),
        "started": started,
        "seconds": time.perf_counter() - t0,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"average acc {result['average']['acc']:.4f} acc_norm "
          f"{result['average']['acc_norm']:.4f}; sparsity {total.sparsity:.3f}, "
          f"FLOP fraction {total.flop_fraction:.3f}; wrote {output} "
          f"in {result['seconds']:.0f} s")
    return 0
