"""CLI: ``ftp-vllm serve [vLLM server flags]`` and ``ftp-vllm serve-bench [...]``.

Both subcommands hand every argument to their own full parser when they run (vLLM's serve
parser plus this project's flags, or the bench script's), so ``ftp-vllm --help`` stays light
(no vLLM import) and ``ftp-vllm serve --help`` lists all of vLLM's flags.
"""

from __future__ import annotations

import argparse

SERVE_HELP = (
    "vLLM's OpenAI-compatible server with FTP routing (no arguments: SmolLM2-135M-Instruct "
    "with its shipped router at sparsity 0.3 on port 8000); every vLLM server flag passes "
    "through, see `ftp-vllm serve --help`"
)
BENCH_HELP = (
    "vLLM's benchmark client (`vllm bench serve`) against routed and dense serving; writes "
    "results/serve_bench.json and .md (see `ftp-vllm serve-bench --help`)"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    # prefix_chars="+": every argument, "--port" included, lands in the remainder untouched.
    serve = subparsers.add_parser("serve", help=SERVE_HELP, add_help=False, prefix_chars="+")
    serve.add_argument("argv", nargs=argparse.REMAINDER)
    serve.set_defaults(func=_cmd_serve)
    bench = subparsers.add_parser("serve-bench", help=BENCH_HELP, add_help=False,
                                  prefix_chars="+")
    bench.add_argument("argv", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_cmd_bench)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ftp_vllm.server.app import main

    return main(args.argv)


def _cmd_bench(args: argparse.Namespace) -> int:
    from ftp_vllm.bench.serve import main

    return main(args.argv)
