"""The `ftp-vllm` command line.

Each command group lives in its own module, which exposes `add_parser(subparsers)`: it adds
its subparser and sets `func` (called with the parsed arguments) through `set_defaults`. To
add a command (train, schedule, eval, bench, serve, ...), write such a module and list it in
`COMMAND_MODULES`. Keep module imports light (torch is fine, transformers and vLLM are not):
every module is imported to build `--help`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence

from ftp_vllm.artifact import DEFAULT_ARTIFACT

COMMAND_MODULES: list[str] = [
    "ftp_vllm.model.prepare",  # model prepare | path
    "ftp_vllm.data.command",  # data show | list
    "ftp_vllm.training.command",  # schedule, train
    "ftp_vllm.eval.command",  # eval
    "ftp_vllm.eval.fidelity_command",  # fidelity
    "ftp_vllm.report",  # report
    "ftp_vllm.bench.command",  # bench prefill | profile
    "ftp_vllm.cli",  # demo (below)
    "ftp_vllm.server.command",  # serve
    "ftp_vllm.bench.serve",  # serve-bench
]

DEMO_PROMPT = (
    "Explain in a few sentences why the sky is blue, and why sunsets are red. "
    "Keep the answer short and simple."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftp-vllm",
        description="FTP fine-grained token routing (arXiv 2412.11494) served inside vLLM.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as exc:
        # Bad input (our errors, a bad number, a missing file) carries its reason: no traceback.
        # FTP_VLLM_DEBUG=1 shows it anyway.
        if os.environ.get("FTP_VLLM_DEBUG") or isinstance(exc, RuntimeError) and not type(
            exc
        ).__module__.startswith("ftp_vllm"):
            raise
        print(f"ftp-vllm: error: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


# ----------------------------------------------------------------------------- demo


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="prepare the default model and print a routed greedy generation with its sparsity",
    )
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="user message (chat template)")
    demo.add_argument("--sparsity", type=float, default=0.3,
                      help="mean token sparsity over blocks (default 0.3)")
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.add_argument("--router", default=str(DEFAULT_ARTIFACT),
                      help="router artifact (default: the shipped window router, as served)")
    demo.add_argument("--model", default=None, help="model folder (default: prepared SmolLM2)")
    demo.add_argument("--no-dense", action="store_true",
                      help="skip the dense generation printed for comparison")
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from ftp_vllm.artifact import load_artifact, model_fingerprint
    from ftp_vllm.model import chat_prompt_ids, ensure_model, load_model
    from ftp_vllm.reference import greedy_generate
    from ftp_vllm.routing.router import DenseRouter

    path = ensure_model(args.model)
    artifact = load_artifact(args.router)
    args.sparsity = artifact.schedule.validate(args.sparsity)
    print(f"loading {path}", flush=True)
    model, tokenizer = load_model(path, dtype=torch.float32)
    artifact.check_model(model_fingerprint(model.config, model.model.norm.weight), args.router)
    torch.manual_seed(0)
    prompt_ids = chat_prompt_ids(tokenizer, args.prompt)
    num_layers = model.config.num_hidden_layers
    blocks = artifact.schedule.blocks(args.sparsity)
    router = artifact.router
    eos = tokenizer.eos_token_id
    print(f"prompt ({prompt_ids.numel()} tokens): {args.prompt!r}")

    runs = [("routed", f"{artifact.kind} router of {args.router}", router, blocks)]
    if not args.no_dense:
        runs.insert(0, ("dense", "no routing", DenseRouter(),
                        torch.zeros(num_layers, dtype=torch.float64)))
    outputs = {}
    for label, how, router, sched in runs:
        t0 = time.perf_counter()
        result = greedy_generate(model, prompt_ids, args.max_new_tokens, router, sched,
                                 eos_token_id=eos, window=artifact.window,
                                 skip_update=artifact.skip_update)
        elapsed = time.perf_counter() - t0
        keep = result.keep
        sparsity = 1.0 - keep.float().mean().item()
        per_block = 1.0 - keep.float().mean(dim=1)
        text = tokenizer.decode(result.tokens, skip_special_tokens=True)
        outputs[label] = result.tokens
        target = args.sparsity if label == "routed" else 0.0
        print(f"\n== {label} ({how}, target sparsity {target:.2f}) "
              f"{len(result.tokens)} tokens in {elapsed:.1f} s")
        print(text.strip())
        print(f"measured token sparsity: {sparsity:.3f} "
              f"({int((~keep).sum())} of {keep.numel()} prompt token-block pairs skipped; "
              f"per block min {per_block.min():.2f} max {per_block.max():.2f})")
    if "dense" in outputs:
        routed, dense = outputs["routed"], outputs["dense"]
        same = next((i for i, (a, b) in enumerate(zip(routed, dense, strict=False)) if a != b),
                    min(len(routed), len(dense)))
        print(f"\nrouted output agrees with dense for the first {same} of "
              f"{len(dense)} tokens")


if __name__ == "__main__":
    sys.exit(main())
