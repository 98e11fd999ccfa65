"""`ftp-vllm schedule` and `ftp-vllm train`: the offline FTP pipeline.

    1. ftp-vllm schedule --router static --output A_static   # GA with the static router
    2. ftp-vllm train --schedule-from A_static --output A    # router, three losses
    3. ftp-vllm schedule --router A --output A               # GA fine-tune with that router

and, for any artifact, `ftp-vllm skip-update --router A --output B`: what skipped tokens gain
(``routing.skip_update``), fitted to the dense model on train-split text.

All text comes from the LAMBADA calibration splits ("train" for the router, "tune" for the
search fitness); evaluation items are never seen here.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_TARGETS = "0.22,0.3,0.4"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sp = subparsers.add_parser(
        "schedule",
        help="genetic search of per-block sparsity (writes the schedules of a router artifact)",
    )
    sp.add_argument("--router", default="static",
                    help="'static' or a router artifact folder to fine-tune the schedule for")
    sp.add_argument("--output", required=True, help="artifact folder to write")
    sp.add_argument("--targets", default=DEFAULT_TARGETS, help="mean sparsities to search")
    sp.add_argument("--population", type=int, default=10)
    sp.add_argument("--generations", type=int, default=8)
    sp.add_argument("--num-seqs", type=int, default=4, help="tune-split sequences for fitness")
    sp.add_argument("--seq-len", type=int, default=128)
    sp.add_argument("--chat-lengths", type=int, nargs="+", default=None, metavar="N",
                    help="fitness on chat prompts instead: tune-split passages in the chat "
                    "template (the form of the held-out fidelity prompts, other text), "
                    "--num-seqs per length, KL at each prompt's last token (the first "
                    "generated token's distribution)")
    sp.add_argument("--window", type=int, default=None,
                    help="search for window routing over aligned windows of this many tokens "
                    "(composes with prefix caching and chunked prefill; docs/ROUTER.md); "
                    "default: exact routing over whole prompts")
    _common(sp)
    sp.set_defaults(func=_cmd_schedule)

    tp = subparsers.add_parser("train", help="train the MLP router (model frozen, three losses)")
    tp.add_argument("--schedule-from", default=None,
                    help="artifact whose schedules to train against (default: uniform)")
    tp.add_argument("--output", required=True, help="artifact folder to write")
    tp.add_argument("--targets", default=DEFAULT_TARGETS,
                    help="targets of the default schedule when --schedule-from is not given")
    tp.add_argument("--dense-first", type=int, default=2,
                    help="default schedule: this many first blocks dense, the rest uniform")
    tp.add_argument("--steps", type=int, default=120)
    tp.add_argument("--batch-size", type=int, default=2)
    tp.add_argument("--lr", type=float, default=3e-3)
    tp.add_argument("--num-seqs", type=int, default=256, help="train-split sequences")
    tp.add_argument("--seq-len", type=int, default=128)
    _common(tp)
    tp.set_defaults(func=_cmd_train)

    up = subparsers.add_parser(
        "skip-update",
        help="fit what skipped tokens gain at each block (low-rank linear estimate of the "
        "block's update) and write it into a copy of a router artifact")
    up.add_argument("--router", required=True, help="router artifact folder to start from")
    up.add_argument("--output", required=True, help="artifact folder to write")
    up.add_argument("--rank", type=int, default=64,
                    help="rank of each block's linear map (cost per skipped token and block: "
                    "4 x hidden x rank FLOPs)")
    up.add_argument("--ridge", type=float, default=1e-2, help="ridge weight of the regression")
    up.add_argument("--chat-lengths", type=int, nargs="+", default=[256, 512, 1024], metavar="N",
                    help="calibration prompts: train-split passages in the chat template, "
                    "--num-seqs of about each of these lengths")
    up.add_argument("--num-seqs", type=int, default=24, help="prompts per length")
    up.add_argument("--distill-steps", type=int, default=300,
                    help="then train the fitted update on the routed model's output KL for this "
                    "many steps, one calibration prompt each (0: the fit alone)")
    up.add_argument("--distill-lr", type=float, default=3e-4, help="Adam learning rate")
    up.add_argument("--tune-prompts", type=int, default=4,
                    help="tune-split prompts per length on which the first-reply-token KL at "
                    "each target is printed and recorded, before and after distillation")
    _common(up)
    up.set_defaults(func=_cmd_skip_update)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: prepared SmolLM2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")


def _targets(text: str) -> list[float]:
    try:
        targets = sorted({float(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--targets must be comma-separated numbers, got {text!r}") from None
    if not targets or not all(0 < t < 0.9 for t in targets):
        raise ValueError(f"--targets must lie in (0, 0.9), got {text!r}")
    return targets


def _setup(args: argparse.Namespace):
    from ftp_vllm.artifact import model_fingerprint
    from ftp_vllm.model import ensure_model, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = ensure_model(args.model)
    model, tokenizer = load_model(path)
    return model, tokenizer, model_fingerprint(model.config, model.model.norm.weight), path


def _provenance(args: argparse.Namespace, model_path: Path, **extra) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "command": "ftp-vllm " + " ".join(sys.argv[1:]),
        "git_commit": commit or None,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": Path(model_path).name,
        **extra,
    }


def fitness_sequences(tokenizer, num_seqs: int, seq_len: int,
                      chat_lengths: list[int] | None, seed: int = 0,
                      ) -> tuple[list[torch.Tensor], str, str, int]:
    """The schedule search's fitness text (tune split only): sequences, their description, the
    fitness's, and how many last tokens of each the KL reads. Chat prompts (`chat_lengths`)
    are scored where serving users feel it, at the last token (the first generated token)."""
    from ftp_vllm.data.calibration import calibration_passages, calibration_sequences

    if chat_lengths:
        from ftp_vllm.eval.heldout import build_prompts

        prompts = build_prompts(tokenizer, chat_lengths, num_seqs, seed,
                                passages=tuple(calibration_passages("tune")))
        return ([torch.tensor(p.ids) for p in prompts],
                f"lambada tune split in the chat template, {num_seqs} prompt(s) of about "
                f"each of {chat_lengths} tokens", "-KL(dense || routed), last token/prompt", 1)
    return (calibration_sequences(tokenizer, "tune", num_seqs, seq_len, seed),
            f"lambada tune split, {num_seqs} x {seq_len} tokens",
            "-KL(dense || routed), last 16 tokens/seq", 16)


def _cmd_schedule(args: argparse.Namespace) -> None:
    from ftp_vllm.artifact import RouterArtifact, load_artifact
    from ftp_vllm.routing.router import StaticRouter
    from ftp_vllm.routing.schedule import SparsitySchedule
    from ftp_vllm.training.schedule_search import (
        SearchConfig,
        calibrate_budget,
        kl_fitness,
        last_block_pin,
        search_schedule,
    )
    from ftp_vllm.training.trainer import tail_positions

    targets = _targets(args.targets)
    model, tokenizer, fingerprint, model_path = _setup(args)
    num_layers = model.config.num_hidden_layers
    if args.router == "static":
        base = None
        router, kind, skip_update = StaticRouter(), "static", None
    else:
        base = load_artifact(args.router)
        base.check_model(fingerprint, args.router)
        router, kind, skip_update = base.router, base.kind, base.skip_update
    seqs, data, fitness_text, tail = fitness_sequences(
        tokenizer, args.num_seqs, args.seq_len, args.chat_lengths, args.seed)
    ids, lengths = torch.cat(seqs), [len(s) for s in seqs]
    at = tail_positions(lengths, tail)
    cfg = SearchConfig(population=args.population, generations=args.generations, seed=args.seed)
    # A router that skips exactly its count (static, or any router in window mode) skips all
    # it may at the last block, which costs generation nothing; an argmax router (exact MLP)
    # reads the target as an input it was trained on, so its schedule stays searched whole.
    counts = kind == "static" or bool(args.window)
    found, history, pinned = {}, {}, {}
    start = time.perf_counter()
    for target in targets:
        init, budget = [], target
        if base is not None:
            # A learned router skips what it decides, not exactly its input: search under the
            # nominal budget at which it realizes `target` on the tune text.
            start_blocks = base.schedule.blocks(min(target, base.schedule.max_target))
            init = [calibrate_budget(model, ids, lengths, router, start_blocks, target,
                                     window=args.window, skip_update=skip_update)]
            budget = float(init[0].mean())
            print(f"target {target:g}: router input budget {budget:.3f}", flush=True)
        fitness = kl_fitness(model, ids, lengths, router, target, logits_at=at,
                             window=args.window, skip_update=skip_update)
        pins = last_block_pin(num_layers, budget) if counts else {}
        best, hist = search_schedule(fitness, num_layers, budget, cfg, init=init, pinned=pins)
        pinned[f"{target:g}"] = {str(i): v for i, v in pins.items()}
        found[target], history[f"{target:g}"] = best, [round(h, 5) for h in hist]
        print(f"target {target:g}: fitness {hist[0]:.4f} -> {hist[-1]:.4f}", flush=True)
    artifact = RouterArtifact(
        kind=kind,
        schedule=SparsitySchedule(found, num_layers),
        fingerprint=fingerprint,
        router=router,
        provenance=_provenance(
            args, model_path,
            schedule_search={
                "data": data,
                "fitness": f"{fitness_text}, - 10 x sparsity shortfall",
                "config": vars(cfg), "best_fitness_per_generation": history,
                "pinned_blocks": pinned,
                "seconds": round(time.perf_counter() - start, 1),
            },
            **({key: base.provenance[key] for key in ("training", "skip_update")
                if key in base.provenance} if base else {}),
        ),
        window=args.window,
        skip_update=skip_update,
    )
    print(f"wrote {artifact.save(args.output)}")


def _cmd_skip_update(args: argparse.Namespace) -> None:
    import dataclasses

    from tqdm import tqdm

    from ftp_vllm.artifact import load_artifact
    from ftp_vllm.data.calibration import calibration_passages
    from ftp_vllm.eval.heldout import build_prompts
    from ftp_vllm.training.skip_distill import DistillConfig, distill_skip_update, last_token_kl
    from ftp_vllm.training.skip_fit import block_moments, fit_skip_update

    model, tokenizer, fingerprint, model_path = _setup(args)
    base = load_artifact(args.router)
    base.check_model(fingerprint, args.router)
    hidden = model.config.hidden_size
    if not 1 <= args.rank <= hidden:
        raise ValueError(f"--rank must lie in [1, {hidden}] (the model's hidden size), "
                         f"got {args.rank}")
    if args.distill_steps < 0:
        raise ValueError(f"--distill-steps must be >= 0, got {args.distill_steps}")
    if not args.distill_lr > 0:
        raise ValueError(f"--distill-lr must be > 0, got {args.distill_lr}")
    if args.tune_prompts < 0:
        raise ValueError(f"--tune-prompts must be >= 0, got {args.tune_prompts}")
    prompts = build_prompts(tokenizer, args.chat_lengths, args.num_seqs, args.seed,
                            passages=tuple(calibration_passages("train")))
    seqs = [torch.tensor(p.ids) for p in prompts]
    start = time.perf_counter()
    with tqdm(total=len(seqs), desc="dense block updates", unit="prompt") as bar:
        moments = block_moments(model, seqs, progress=lambda n: bar.update(1))
    update = fit_skip_update(moments, args.rank, args.ridge)
    seconds = round(time.perf_counter() - start, 1)
    tokens = moments[0].n
    print(f"fitted rank {args.rank} on {tokens} tokens in {seconds} s")
    tune = [torch.tensor(p.ids) for p in build_prompts(
        tokenizer, args.chat_lengths, args.tune_prompts, args.seed,
        passages=tuple(calibration_passages("tune")))] if args.tune_prompts > 0 else []

    targets = {f"{t:g}": base.schedule.blocks(t) for t in base.schedule.targets}

    def tune_kl(candidate) -> dict[str, float]:
        if not tune:
            return {}
        kls = last_token_kl(model, tune, base.router, targets, base.window, candidate)
        print("first-reply-token KL on tune prompts, by target: "
              + ", ".join(f"{t}: {v:.4f}" for t, v in kls.items()), flush=True)
        return {t: round(v, 4) for t, v in kls.items()}

    fitted_kl = tune_kl(update)
    distill = None
    if args.distill_steps:
        config = DistillConfig(steps=args.distill_steps, lr=args.distill_lr, seed=args.seed)
        update, stats = distill_skip_update(model, update, seqs, base.router, base.schedule,
                                            base.window, config)
        print(f"distilled in {stats.seconds:.0f} s: {stats.summary()}")
        distill = {"config": dataclasses.asdict(config), "final": stats.summary(),
                   "tune_kl_after": tune_kl(update), "seconds": round(stats.seconds, 1)}
    provenance = {
        **base.provenance,
        "skip_update": _provenance(
            args, model_path,
            data=f"lambada train split in the chat template, {args.num_seqs} prompt(s) of "
                 f"about each of {args.chat_lengths} tokens ({tokens} tokens)",
            rank=args.rank, ridge=args.ridge, seconds=seconds,
            tune_kl_fitted=fitted_kl, distillation=distill),
    }
    artifact = dataclasses.replace(base, skip_update=update, provenance=provenance)
    print(f"wrote {artifact.save(args.output)}")


def _cmd_train(args: argparse.Namespace) -> None:
    from ftp_vllm.artifact import RouterArtifact, load_artifact
    from ftp_vllm.data.calibration import calibration_sequences
    from ftp_vllm.routing.schedule import SparsitySchedule
    from ftp_vllm.training.schedule_search import dense_first
    from ftp_vllm.training.trainer import TrainConfig, config_dict, train_router

    model, tokenizer, fingerprint, model_path = _setup(args)
    num_layers = model.config.num_hidden_layers
    if args.schedule_from:
        source = load_artifact(args.schedule_from)
        source.check_model(fingerprint, args.schedule_from)
        schedule, search = source.schedule, source.provenance.get("schedule_search")
    else:
        schedule = SparsitySchedule({
            t: dense_first(num_layers, t, args.dense_first) for t in _targets(args.targets)
        }, num_layers)
        search = None
    seqs = calibration_sequences(tokenizer, "train", args.num_seqs, args.seq_len, args.seed)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    router, stats = train_router(model, seqs, schedule, cfg)
    print(f"trained in {stats.seconds:.0f} s: {stats.summary()}")
    artifact = RouterArtifact(
        kind="mlp",
        schedule=schedule,
        fingerprint=fingerprint,
        router=router,
        provenance=_provenance(
            args, model_path,
            training={
                "data": f"lambada train split, {args.num_seqs} x {args.seq_len} tokens",
                "config": config_dict(cfg), "final": stats.summary(),
                "seconds": round(stats.seconds, 1),
            },
            schedule_search=search,
        ),
    )
    print(f"wrote {artifact.save(args.output)}")
