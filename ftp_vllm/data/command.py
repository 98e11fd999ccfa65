"""`ftp-vllm data show | list`: look at the evaluation items and the calibration splits."""

from __future__ import annotations

import argparse

from ftp_vllm.data.calibration import SPLITS, calibration_passages
from ftp_vllm.data.tasks import TASKS, all_items, format_item, load_task


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """`ftp-vllm data ...`"""
    data = subparsers.add_parser("data", help="evaluation tasks and calibration text")
    sub = data.add_subparsers(dest="data_command", required=True)
    show = sub.add_parser("show", help="print a few formatted items of a task")
    show.add_argument("task", choices=[*TASKS, "calibration"],
                      help="task name, or 'calibration' for LAMBADA calibration passages")
    show.add_argument("--limit", type=int, default=3, help="how many items (default 3)")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--split", default="train", choices=list(SPLITS),
                      help="calibration split (with TASK=calibration)")
    show.set_defaults(func=_cmd_show)
    lst = sub.add_parser("list", help="list tasks and calibration splits with their sizes")
    lst.set_defaults(func=_cmd_list)


def _cmd_show(args: argparse.Namespace) -> None:
    if args.task == "calibration":
        passages = calibration_passages(args.split)
        print(f"calibration/{args.split}: {len(passages)} LAMBADA passages")
        for p in passages[: args.limit]:
            print(f"--- {p!r}")
        return
    items = load_task(args.task, limit=args.limit, seed=args.seed)
    total = len(all_items(args.task))
    spec = TASKS[args.task]
    print(f"{args.task}: {total} items ({spec.dataset} {spec.split}); showing {len(items)}")
    for item in items:
        print(format_item(item))


def _cmd_list(args: argparse.Namespace) -> None:
    for name, spec in TASKS.items():
        print(f"{name:14s} {len(all_items(name)):6d} items  {spec.dataset} ({spec.split})")
    for split in SPLITS:
        print(f"calibration/{split:8s} {len(calibration_passages(split)):6d} LAMBADA passages")
