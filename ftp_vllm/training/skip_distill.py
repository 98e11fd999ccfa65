"""Distil a skip update (``routing.skip_update``) on what the routed model outputs.

The ridge fit (``training.skip_fit``) imitates each block's update on dense states, one block at
a time. Served, a skipped token's state has already drifted at earlier blocks, and what matters
is the model's output, not each block's. Starting from the fit, this trains the update's
weights by gradient descent on KL(dense || routed) of the next-token distributions, with the
model frozen and the artifact's own decisions (its router, window and schedules): each
calibration prompt's leading tokens are routed like a served prompt, its last `tail` tokens run
dense as generated tokens do (attending to the routed K/V), and the KL is read at the last
routed token (a reply's first token) and at the dense ones (the rest of the reply), averaged
over those rows alike: giving the first row half the loss did worse on tune-split prompts (it
leans on one position per step), and so did a learning rate of 1e-3 (measured ad hoc with this
module, tune-split chat prompts only).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from ftp_vllm.reference import routed_forward
from ftp_vllm.routing.router import TokenRouter
from ftp_vllm.routing.schedule import SparsitySchedule
from ftp_vllm.routing.skip_update import SkipUpdate
from ftp_vllm.training.losses import distillation_loss


@dataclass
class DistillConfig:
    steps: int = 300
    lr: float = 3e-4
    tail: int = 32  # each prompt's last tokens, run dense like a reply
    seed: int = 0


@dataclass
class DistillStats:
    kl: list[float] = field(default_factory=list)  # training KL per step
    seconds: float = 0.0

    def summary(self, last: int = 20) -> dict[str, float]:
        first, final = self.kl[:last], self.kl[-last:]
        return {"kl_first": round(sum(first) / max(1, len(first)), 5),
                "kl_last": round(sum(final) / max(1, len(final)), 5)}


def distill_skip_update(
    model: torch.nn.Module,
    update: SkipUpdate,
    sequences: Sequence[Tensor],
    router: TokenRouter,
    schedule: SparsitySchedule,
    window: int | None,
    config: DistillConfig,
    progress: bool = True,
) -> tuple[SkipUpdate, DistillStats]:
    """The update after `config.steps` Adam steps, one calibration prompt and one of the
    schedule's targets per step (each in turn, shuffled), rounded to bfloat16 as stored."""
    usable = [s for s in sequences if len(s) > config.tail + 2]
    if not usable:
        raise ValueError(f"no calibration prompt is longer than the dense tail "
                         f"({config.tail} tokens) plus 2")
    if config.steps < 1:
        raise ValueError(f"distillation steps must be >= 1, got {config.steps}")
    rng = random.Random(config.seed)
    params = [t.detach().clone().float().requires_grad_(True)
              for t in (update.down, update.up, update.bias)]
    opt = torch.optim.Adam(params, lr=config.lr)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    targets = schedule.targets
    order: list[tuple[int, float]] = []
    teachers: dict[int, Tensor] = {}  # dense logits per prompt, read once for every target
    stats = DistillStats()
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="distil skip update", unit="step",
               disable=not progress)
    for _ in bar:
        if not order:
            order = [(i, t) for i in range(len(usable)) for t in targets]
            rng.shuffle(order)
        index, target = order.pop()
        ids = usable[index]
        n = len(ids)
        routed = n - config.tail
        at = torch.arange(routed - 1, n)
        blocks = schedule.blocks(target)
        if index not in teachers:
            with torch.no_grad():
                teachers[index] = routed_forward(model, ids, [n], logits_at=at).logits
        teacher = teachers[index]
        student = routed_forward(model, ids, [n], router, blocks, routed_lengths=[routed],
                                 logits_at=at, window=window,
                                 skip_update=SkipUpdate(*params)).logits
        loss = distillation_loss(student, teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_decay.step()
        stats.kl.append(float(loss.detach()))
        bar.set_postfix(kl=f"{stats.kl[-1]:.3f}", target=f"{target:g}")
    stats.seconds = time.perf_counter() - start
    # rounded as stored (``SkipUpdate.state_dict``): the update in memory is the one saved
    return SkipUpdate(*(p.detach().to(torch.bfloat16).float() for p in params)), stats


@torch.no_grad()
def last_token_kl(model: torch.nn.Module, sequences: Sequence[Tensor], router: TokenRouter,
                  blocks: Mapping[str, Tensor], window: int | None,
                  update: SkipUpdate | None) -> dict[str, float]:
    """Mean first-reply-token KL(dense || routed) over whole routed prompts, for each named
    per-block target vector: what the command prints on tune-split prompts before and after
    distillation."""
    totals = dict.fromkeys(blocks, 0.0)
    for ids in sequences:
        at = torch.tensor([len(ids) - 1])
        dense = routed_forward(model, ids, logits_at=at).logits
        for name, b in blocks.items():
            routed = routed_forward(model, ids, router=router, block_sparsity=b, logits_at=at,
                                    window=window, skip_update=update).logits
            totals[name] += float(distillation_loss(routed, dense))
    return {name: total / len(sequences) for name, total in totals.items()}
