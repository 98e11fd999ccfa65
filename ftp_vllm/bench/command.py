"""`ftp-vllm bench ...`: offline benchmarks of routed against plain vLLM.

    ftp-vllm bench prefill   prefill and decode throughput ratios, alternating rounds
    ftp-vllm bench profile   where one prefill's time goes (torch profiler), by kind of work
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ftp_vllm.bench import prefill, profile

    bench = subparsers.add_parser("bench", help="benchmarks of routed vs vanilla vLLM")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    prefill.add_bench_parser(sub)
    profile.add_bench_parser(sub)
