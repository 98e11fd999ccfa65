"""Genetic search of per-block sparsity under a mean-sparsity budget (FTP's scheduler).

Fitness is measured on calibration ("tune") text only: how close the routed model's next-token
distributions stay to the dense model's (negative KL), with a penalty when the router skips
fewer pairs than the budget asks (so a schedule cannot win by under-spending).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from ftp_vllm.reference import routed_forward, token_sparsity
from ftp_vllm.routing.router import TokenRouter
from ftp_vllm.routing.skip_update import SkipUpdate
from ftp_vllm.training.losses import distillation_loss

Fitness = Callable[[Tensor], float]


@dataclass
class SearchConfig:
    population: int = 16
    generations: int = 12
    elite: int = 2
    mutation: float = 0.06  # std of the Gaussian mutation of each block's sparsity
    mutation_rate: float = 0.3  # fraction of blocks mutated per child
    max_block: float = 0.9  # no block skips more than this
    shortfall_penalty: float = 10.0
    seed: int = 0


def project_to_mean(v: Tensor, target: float, max_block: float) -> Tensor:
    """Closest-by-shift vector with entries in [0, max_block] and mean exactly `target`.

    Raising leaves blocks at exactly 0 alone where it can: a dense block is a decision
    (SmolLM2's first blocks must not skip), not a deficit to spread the budget into.
    """
    if not 0 <= target <= max_block:
        raise ValueError(f"target {target} outside [0, {max_block}]")
    v = v.double().clamp(0, max_block)
    for _ in range(100):
        gap = target - float(v.mean())
        if abs(gap) < 1e-9:
            break
        if gap > 0:
            free = (v > 0) & (v < max_block)
            if not bool(free.any()):
                free = v < max_block
        else:
            free = v > 0
        if not bool(free.any()):
            break
        v = (v + gap * len(v) / int(free.sum()) * free).clamp(0, max_block)
    return v


def dense_first(num_layers: int, target: float, first: int, max_block: float = 0.9) -> Tensor:
    """Schedule with the first `first` blocks dense and the budget spread evenly on the rest."""
    v = torch.full((num_layers,), float(target), dtype=torch.float64)
    v[:first] = 0.0
    return project_to_mean(v, target, max_block)


def kl_fitness(
    model: torch.nn.Module,
    ids: Tensor,
    lengths: list[int],
    router: TokenRouter,
    target: float,
    penalty: float = 10.0,
    logits_at: Tensor | None = None,
    window: int | None = None,
    skip_update: SkipUpdate | None = None,
) -> Fitness:
    """Fitness of a block schedule: -KL(dense || routed) - penalty * sparsity shortfall.

    KL is measured at `logits_at` (flattened token indices; default all tokens); `window`:
    window routing over windows of that many tokens (None: exact).
    """
    with torch.no_grad():
        teacher = routed_forward(model, ids, lengths, logits_at=logits_at).logits

    @torch.no_grad()
    def fitness(blocks: Tensor) -> float:
        out = routed_forward(model, ids, lengths, router, blocks, logits_at=logits_at,
                             window=window, skip_update=skip_update)
        shortfall = max(0.0, target - token_sparsity(out.keep))
        return -float(distillation_loss(out.logits, teacher)) - penalty * shortfall

    return fitness


@torch.no_grad()
def calibrate_budget(
    model: torch.nn.Module,
    ids: Tensor,
    lengths: list[int],
    router: TokenRouter,
    blocks: Tensor,
    target: float,
    max_block: float = 0.9,
    rounds: int = 3,
    window: int | None = None,
    skip_update: SkipUpdate | None = None,
) -> Tensor:
    """Rescale a schedule until the router's realized sparsity meets `target`.

    A learned router decides by argmax, so the schedule (its sparsity input) and what it
    actually skips differ; the search must spend the realized budget, not the nominal one.
    """
    for _ in range(rounds):
        realized = token_sparsity(
            routed_forward(model, ids, lengths, router, blocks, window=window,
                           skip_update=skip_update).keep)
        if realized <= 0 or abs(realized - target) < 0.005:
            break
        mean = min(float(blocks.mean()) * target / realized, max_block * 0.95)
        blocks = project_to_mean(blocks, mean, max_block)
    return blocks


def last_block_pin(num_layers: int, target: float = 1.0) -> dict[int, float]:
    """The last block skips every token it may, for routers that skip exactly their count;
    empty when a mean `target` cannot pay for a whole block.

    A token skipped at the last block keeps the hidden state it came in with; its K/V there
    are computed from that same state, so the only thing that changes is its own output row,
    which only its prompt log-probability would read (served dense, docs/ROUTER.md). No
    generated token sees the difference: that block's share of the budget is free.
    """
    return {num_layers - 1: 1.0} if target * num_layers >= 1.0 else {}


def pin_blocks(v: Tensor, target: float, max_block: float,
               pinned: Mapping[int, float] | None) -> Tensor:
    """`project_to_mean` with the `pinned` blocks fixed at their values and the others
    carrying the rest of the budget (mean `target` over all blocks)."""
    if not pinned:
        return project_to_mean(v, target, max_block)
    free = [i for i in range(len(v)) if i not in pinned]
    rest = (target * len(v) - sum(pinned.values())) / len(free)
    if rest < 0:
        raise ValueError(f"the pinned blocks alone skip more than a mean of {target}")
    out = v.double().clone()
    out[free] = project_to_mean(out[free], rest, max_block)
    for i, value in pinned.items():
        out[i] = value
    return out


def search_schedule(
    fitness: Fitness,
    num_layers: int,
    target: float,
    config: SearchConfig,
    init: list[Tensor] | None = None,
    progress: bool = True,
    pinned: Mapping[int, float] | None = None,
) -> tuple[Tensor, list[float]]:
    """Best per-block schedule with mean `target`, and the best fitness after each generation.

    pinned: blocks whose target is fixed (e.g. `last_block_pin`); the others share the rest
    of the budget."""
    rng = random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    cache: dict[tuple, float] = {}

    def score(v: Tensor) -> float:
        key = tuple(round(float(x), 4) for x in v)
        if key not in cache:
            cache[key] = fitness(v)
        return cache[key]

    def fix(v: Tensor) -> Tensor:
        return pin_blocks(v, target, config.max_block, pinned)

    uniform = torch.full((num_layers,), float(target), dtype=torch.float64)
    pop = [fix(v) for v in (init or [])] + [fix(uniform)]
    # FTP.md: the first and last blocks change their tokens most, so seed schedules sparing them.
    for first in (1, 2, 3):
        pop.append(fix(dense_first(num_layers, target, first, config.max_block)))
    if not pinned:
        spare_last = dense_first(num_layers, target, 2, config.max_block)
        spare_last[-1] = 0.0
        pop.append(fix(spare_last))
    while len(pop) < config.population:
        noise = torch.randn(num_layers, generator=gen, dtype=torch.float64) * 2 * config.mutation
        pop.append(fix(uniform + noise))
    pop = pop[: config.population]
    history = []
    bar = tqdm(range(config.generations), desc=f"schedule {target:.2f}", disable=not progress)
    for _ in bar:
        ranked = sorted(pop, key=score, reverse=True)
        history.append(score(ranked[0]))
        bar.set_postfix(best=f"{history[-1]:.4f}")
        children = ranked[: config.elite]
        while len(children) < config.population:
            a, b = (max(rng.sample(ranked, 3), key=score) for _ in range(2))
            w = torch.rand(num_layers, generator=gen, dtype=torch.float64)
            child = w * a + (1 - w) * b
            mask = torch.rand(num_layers, generator=gen) < config.mutation_rate
            noise = torch.randn(num_layers, generator=gen, dtype=torch.float64) * config.mutation
            children.append(fix(child + noise * mask * (child > 0)))
        pop = children
    best = max(pop, key=score)
    history.append(score(best))
    return best, history
