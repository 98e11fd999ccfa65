"""Router training: the LLM frozen, only the MLP router learns (FTP.md, three losses).

Decisions are hard in the forward pass and soft in the backward pass (straight-through), so
the routed model trained against is the one that will be served.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from ftp_vllm.reference import routed_forward
from ftp_vllm.routing.router import MLPRouter, RouterInputs, StaticRouter
from ftp_vllm.routing.schedule import SparsitySchedule
from ftp_vllm.training.losses import distillation_loss, guide_loss, guide_weight, sparsity_loss
from ftp_vllm.training.schedule_search import project_to_mean


@dataclass
class TrainConfig:
    steps: int = 240
    batch_size: int = 4
    lr: float = 3e-3
    min_target: float = 0.1  # per-sequence mean targets are drawn from [min, schedule max]
    guide_decay: float = 0.5  # fraction of training over which the guide weight goes 1 -> 0
    hidden: int = 64
    block_jitter: float = 0.15  # std of noise on per-block targets: covers searched schedules
    distill_positions: int = 16  # KL on each sequence's last tokens: what serving reads
    min_len_fraction: float = 0.5  # sequences are cut to a random length in [f * len, len]
    seed: int = 0


@dataclass
class TrainStats:
    loss: list[float] = field(default_factory=list)
    guide: list[float] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)
    distill: list[float] = field(default_factory=list)
    realized: list[float] = field(default_factory=list)  # hard token sparsity per step
    target: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, last: int = 20) -> dict[str, float]:
        def tail(xs: list[float]) -> float:
            xs = xs[-last:]
            return sum(xs) / max(1, len(xs))

        keys = ("loss", "distill", "realized", "target")
        return {k: round(tail(getattr(self, k)), 5) for k in keys}


class _StraightThroughGate:
    """Gate function for `routed_forward`: hard forward, soft backward; records what losses need."""

    def __init__(self, router: MLPRouter):
        self.router = router
        self.static = StaticRouter()
        self.logits: list[Tensor] = []
        self.static_keep: list[Tensor] = []
        self.skip_prob: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.hard: list[Tensor] = []

    def __call__(self, inputs: RouterInputs) -> Tensor:
        inputs = RouterInputs(
            inputs.layer, inputs.layout, inputs.block_sparsity, inputs.scores.detach()
        )
        logits = self.router.logits(inputs)
        p_keep = torch.softmax(logits.float(), dim=-1)[:, 1]
        forced = inputs.layout.protected | (inputs.block_sparsity <= 0)
        hard = (p_keep > 0.5).float()
        g = torch.where(forced, torch.ones_like(p_keep), hard + p_keep - p_keep.detach())
        self.logits.append(logits)
        self.static_keep.append(self.static.keep(inputs))
        self.skip_prob.append(torch.where(forced, torch.zeros_like(p_keep), 1 - p_keep))
        self.targets.append(inputs.block_sparsity)
        self.hard.append(g.detach() > 0.5)
        return g


def train_router(
    model: torch.nn.Module,
    sequences: list[Tensor],
    schedule: SparsitySchedule,
    config: TrainConfig,
    router: MLPRouter | None = None,
    progress: bool = True,
) -> tuple[MLPRouter, TrainStats]:
    """Train an MLP router on token sequences (calibration text only) against `schedule`."""
    if not sequences:
        raise ValueError("no training sequences")
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    router = router or MLPRouter(hidden=config.hidden)
    router.train()
    opt = torch.optim.Adam(router.parameters(), lr=config.lr)
    sched_lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    stats = TrainStats()
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="train router", disable=not progress)
    for step in bar:
        batch = [
            s[: rng.randint(int(len(s) * config.min_len_fraction), len(s))]
            for s in rng.sample(sequences, min(config.batch_size, len(sequences)))
        ]
        ids = torch.cat(batch)
        lengths = [len(s) for s in batch]
        means = [rng.uniform(config.min_target, schedule.max_target) for _ in batch]
        blocks = torch.stack([_jittered(schedule.blocks(m), m, config, gen) for m in means])
        at = tail_positions(lengths, config.distill_positions)
        with torch.no_grad():
            teacher = routed_forward(model, ids, lengths, logits_at=at).logits
        gate = _StraightThroughGate(router)
        student = routed_forward(
            model, ids, lengths, block_sparsity=blocks, gate=gate, logits_at=at
        ).logits
        w = guide_weight(step, config.steps, config.guide_decay)
        l_guide = torch.stack(
            [guide_loss(lg, sk) for lg, sk in zip(gate.logits, gate.static_keep, strict=True)]
        ).mean()
        l_sparse = sparsity_loss(gate.skip_prob, gate.targets)
        l_distill = distillation_loss(student, teacher)
        loss = w * l_guide + l_sparse + l_distill
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched_lr.step()
        realized = 1.0 - torch.stack(gate.hard).float().mean().item()
        for name, val in (
            ("loss", loss), ("guide", l_guide), ("sparsity", l_sparse), ("distill", l_distill)
        ):
            getattr(stats, name).append(float(val.detach()))
        stats.realized.append(realized)
        stats.target.append(float(blocks.mean()))
        bar.set_postfix(kl=f"{float(l_distill):.3f}", sp=f"{realized:.2f}/{stats.target[-1]:.2f}")
    stats.seconds = time.perf_counter() - start
    router.eval()
    return router, stats


def _jittered(blocks: Tensor, mean: float, config: TrainConfig, gen: torch.Generator) -> Tensor:
    """Per-block targets with noise, same mean: the router must serve any searched schedule.
    Dense blocks stay dense."""
    if config.block_jitter <= 0:
        return blocks
    noise = torch.randn(blocks.shape, generator=gen, dtype=blocks.dtype) * config.block_jitter
    return project_to_mean(blocks + noise * (blocks > 0), mean, 0.9)


def config_dict(config: TrainConfig) -> dict:
    return asdict(config)


def tail_positions(lengths: list[int], per_seq: int) -> Tensor:
    """Flattened indices of the last `per_seq` tokens of each sequence.

    Distillation and search read the outputs there: a served prompt's next token comes from its
    last position, and an answer scored by log-likelihood sits at the end of its prompt. A
    token skipped at every block has a meaningless output of its own, and that is fine, as long
    as its K/V still serve the tokens after it.
    """
    out, end = [], 0
    for n in lengths:
        end += n
        out += range(end - min(per_seq, n), end)
    return torch.tensor(out)
