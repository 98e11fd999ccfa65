"""Router training and the genetic schedule search, on tiny models and toy problems."""

import pytest
import torch

from ftp_vllm.reference import routed_forward, token_sparsity
from ftp_vllm.routing.router import StaticRouter
from ftp_vllm.routing.schedule import SparsitySchedule
from ftp_vllm.training.schedule_search import (
    SearchConfig,
    calibrate_budget,
    dense_first,
    kl_fitness,
    last_block_pin,
    project_to_mean,
    search_schedule,
)
from ftp_vllm.training.trainer import TrainConfig, train_router
from tests.tiny_models import tiny_model


def test_project_to_mean_respects_budget_and_bounds():
    v = torch.tensor([0.9, 0.0, 0.5, 0.2, 0.95], dtype=torch.float64)
    for target in (0.0, 0.1, 0.3, 0.6, 0.85):
        p = project_to_mean(v, target, 0.9)
        assert abs(float(p.mean()) - target) < 1e-6
        assert float(p.min()) >= 0 and float(p.max()) <= 0.9 + 1e-12


def test_genetic_search_improves_toy_fitness_within_budget():
    optimum = project_to_mean(torch.linspace(0.0, 0.8, 12), 0.3, 0.9)

    def fitness(v):
        return -float(((v - optimum) ** 2).sum())

    cfg = SearchConfig(population=12, generations=25, seed=1)
    best, history = search_schedule(fitness, 12, 0.3, cfg, progress=False)
    uniform = torch.full((12,), 0.3, dtype=torch.float64)
    assert abs(float(best.mean()) - 0.3) < 1e-6
    assert history[-1] > fitness(uniform) * 0.25  # at least 4x closer than uniform
    assert all(b >= a for a, b in zip(history, history[1:], strict=False))  # elitism


def test_pinned_search_keeps_the_pin_and_spends_the_rest_of_the_budget():
    pinned = last_block_pin(12)
    optimum = project_to_mean(torch.linspace(0.0, 0.8, 12), 0.3, 0.9)

    def fitness(v):
        return -float(((v[:-1] - optimum[:-1]) ** 2).sum())

    cfg = SearchConfig(population=8, generations=4, seed=1)
    best, _ = search_schedule(fitness, 12, 0.3, cfg, progress=False, pinned=pinned)
    assert best[-1] == 1.0 and float(best[:-1].max()) <= 0.9 + 1e-12
    assert abs(float(best.mean()) - 0.3) < 1e-6
    assert last_block_pin(12, 1 / 13) == {}  # a budget below one block pins nothing


@pytest.mark.parametrize("window", [None, 8])
def test_skipping_the_last_block_changes_nothing_generation_reads(window):
    """Why the search pins the last block: a prompt skipping all it may there leaves the
    first generated token's logits bit-exact, so that block's budget is free."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (50,), generator=torch.Generator().manual_seed(0))
    lengths, last = [30, 20], torch.tensor([29, 49])
    blocks = torch.tensor([0.0, 0.3, 0.3, 0.0], dtype=torch.float64)
    pinned = blocks.clone()
    pinned[-1] = 1.0
    base = routed_forward(model, ids, lengths, StaticRouter(), blocks, logits_at=last,
                          window=window)
    free = routed_forward(model, ids, lengths, StaticRouter(), pinned, logits_at=last,
                          window=window)
    assert int(free.keep[-1].sum()) == 4  # only each prompt's first and last token computed
    assert torch.equal(free.logits, base.logits)
    # ... while the same budget one block earlier does change them.
    early = routed_forward(model, ids, lengths, StaticRouter(), pinned.flip(0), logits_at=last,
                           window=window)
    assert not torch.equal(early.logits, base.logits)


def test_kl_fitness_prefers_dense_and_penalises_shortfall():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    fit = kl_fitness(model, ids, [20, 20], StaticRouter(), target=0.3)
    assert fit(torch.full((4,), 0.3)) < 0
    sparse = fit(torch.full((4,), 0.3))
    # Spending less than the budget is penalised beyond what its lower KL gains.
    assert fit(torch.zeros(4)) < sparse


def test_training_moves_router_toward_targets_and_lowers_loss():
    model = tiny_model("qwen2")
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 128, (24,), generator=gen) for _ in range(8)]
    sched = SparsitySchedule.uniform([0.3, 0.5], 4)
    cfg = TrainConfig(steps=40, batch_size=4, lr=1e-2, seed=0)
    router, stats = train_router(model, seqs, sched, cfg, progress=False)
    assert len(stats.loss) == 40
    assert sum(stats.loss[-10:]) < sum(stats.loss[:10])
    assert all(not p.requires_grad for p in model.parameters())
    # The trained router actually skips tokens in the served (hard) forward.
    out = routed_forward(model, seqs[0], router=router, block_sparsity=sched.blocks(0.5))
    assert 0.05 < token_sparsity(out.keep) < 0.95


def test_projection_keeps_dense_blocks_dense():
    v = torch.tensor([0.0, 0.0, 0.2, 0.3], dtype=torch.float64)
    p = project_to_mean(v, 0.3, 0.9)
    assert p[:2].tolist() == [0.0, 0.0] and abs(float(p.mean()) - 0.3) < 1e-9
    d = dense_first(10, 0.27, 1)
    assert d[0] == 0 and torch.allclose(d[1:], torch.full((9,), 0.3, dtype=torch.float64))


class _HalfHearted(StaticRouter):
    """Skips half of what it is asked to: a router whose input and output disagree."""

    def _keep(self, inputs):
        from dataclasses import replace

        return super()._keep(replace(inputs, block_sparsity=inputs.block_sparsity / 2))


def test_calibrate_budget_meets_realized_target():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0))
    blocks = torch.full((4,), 0.2, dtype=torch.float64)
    out = calibrate_budget(model, ids, [100, 100], _HalfHearted(), blocks, 0.2)
    assert float(out.mean()) == pytest.approx(0.4, abs=0.03)
    realized = token_sparsity(routed_forward(model, ids, [100, 100], _HalfHearted(), out).keep)
    assert realized == pytest.approx(0.2, abs=0.01)
