"""CLI: ``ftp-vllm serve [vLLM server flags]``.

The subcommand hands every argument to its own full parser when it runs (vLLM's serve parser
plus this project's flags), so ``ftp-vllm --help`` stays light (no vLLM import) and
``ftp-vllm serve --help`` lists all of vLLM's flags.
"""

from __future__ import annotations

import argparse

SERVE_HELP = (
    "vLLM's OpenAI-compatible server with FTP routing (no arguments: SmolLM2-135M-Instruct "
    "with its shipped router at sparsity 0.3 on port 8000); every vLLM server flag passes "
    "through, see `ftp-vllm serve --help`"
)

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    # prefix_chars="+": every argument, "--port" included, lands in the remainder untouched.
    serve = subparsers.add_parser("serve", help=SERVE_HELP, add_help=False, prefix_chars="+")
    serve.add_argument("argv", nargs=argparse.REMAINDER)
    serve.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ftp_vllm.server.app import main

    return main(args.argv)
