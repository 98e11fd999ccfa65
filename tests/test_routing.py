"""Router factors, routers and schedules: definitions from docs/ROUTER.md, on hand-made cases."""

import math

import pytest
import torch

from ftp_vllm.routing.factors import attention_scores, descending_rank, router_factors
from ftp_vllm.routing.layout import TokenLayout
from ftp_vllm.routing.router import (
    DenseRouter,
    MaskRouter,
    MLPRouter,
    RandomRouter,
    RouterInputs,
    StaticRouter,
)
from ftp_vllm.routing.schedule import SparsitySchedule


def test_layout_from_lengths():
    lay = TokenLayout.from_lengths([3, 1, 2])
    assert lay.seq_ids.tolist() == [0, 0, 0, 1, 2, 2]
    assert lay.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert lay.last_index.tolist() == [2, 3, 5]
    assert lay.protected.tolist() == [True, False, True, True, True, True]
    with pytest.raises(ValueError):
        TokenLayout.from_lengths([2, 0])


def _naive_scores(q, k, scale):
    """Per-request definition written out with full softmax."""
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, dim=1)
    logits = torch.einsum("hd,thd->th", q[-1], k) * scale
    return torch.softmax(logits, dim=0).mean(1)


def test_attention_scores_match_definition_and_flattening():
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    qs = [torch.randn(n, 4, 8) for n in lengths]
    ks = [torch.randn(n, 2, 8) for n in lengths]
    flat = attention_scores(torch.cat(qs), torch.cat(ks), TokenLayout.from_lengths(lengths), 0.3)
    per = torch.cat([_naive_scores(q, k, 0.3) for q, k in zip(qs, ks, strict=True)])
    torch.testing.assert_close(flat, per, rtol=1e-5, atol=1e-6)
    one = [
        attention_scores(q, k, TokenLayout.from_lengths([len(q)]), 0.3)
        for q, k in zip(qs, ks, strict=True)
    ]
    torch.testing.assert_close(flat, torch.cat(one), rtol=1e-5, atol=1e-6)
    lay = TokenLayout.from_lengths(lengths)
    sums = torch.zeros(len(lengths)).index_add_(0, lay.seq_ids, flat)
    torch.testing.assert_close(sums, torch.ones(len(lengths)))


def test_rank_descending_with_ties_to_earlier_token():
    lay = TokenLayout.from_lengths([4, 3])
    vals = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.3, 0.9, 0.1])
    assert descending_rank(vals, lay).tolist() == [3, 0, 1, 2, 1, 0, 2]


def test_router_factors_values():
    lay = TokenLayout.from_lengths([3, 1])
    scores = torch.tensor([0.5, 0.25, 0.25, 1.0])
    f = router_factors(scores, lay, torch.tensor([0.3, 0.3, 0.3, 0.0]))
    assert f.shape == (4, 4)
    torch.testing.assert_close(f[:, 0], torch.tensor([0.0, 0.5, 1.0, 0.0]))
    torch.testing.assert_close(
        f[:, 1], torch.tensor([math.log(1.5), math.log(0.75), math.log(0.75), 0.0])
    )
    torch.testing.assert_close(f[:, 2], torch.tensor([0.0, 0.5, 1.0, 0.0]))
    torch.testing.assert_close(f[:, 3], torch.tensor([0.3, 0.3, 0.3, 0.0]))


def _inputs(lengths, s, layer=0, scores=None):
    lay = TokenLayout.from_lengths(lengths)
    bs = torch.as_tensor(s, dtype=torch.float64)
    bs = bs.expand(lay.num_tokens) if bs.ndim == 0 else bs[lay.seq_ids]
    if scores is None:
        scores = torch.full((lay.num_tokens,), 1.0) / lay.token_lengths
    return RouterInputs(layer=layer, layout=lay, block_sparsity=bs, scores=scores)


def test_static_router_keeps_first_then_most_recent():
    keep = StaticRouter().keep(_inputs([10], 0.3))
    assert keep.tolist() == [True, False, False, False] + [True] * 6
    # Several requests, each with its own target; never skips first or last.
    keep = StaticRouter().keep(_inputs([10, 4, 2, 1], [0.5, 0.99, 0.9, 0.9]))
    assert keep[:10].tolist() == [True] + [False] * 5 + [True] * 4
    assert keep[10:14].tolist() == [True, False, False, True]
    assert keep[14:].tolist() == [True, True, True]


def test_zero_target_keeps_everything_for_every_router():
    inp = _inputs([6, 7], [0.0, 0.5])
    router = MLPRouter()
    with torch.no_grad():
        router.net[-1].bias.copy_(torch.tensor([10.0, -10.0]))  # always "skip"
    for r in (router, StaticRouter(), RandomRouter(seed=1)):
        keep = r.keep(inp)
        assert keep[:6].all(), type(r).__name__
        assert not keep[6:].all(), type(r).__name__
        assert keep[6] and keep[12]


def test_random_router_budget_matches_static():
    inp = _inputs([50, 20], 0.4)
    rk, sk = RandomRouter(seed=3).keep(inp), StaticRouter().keep(inp)
    assert int(rk.sum()) == int(sk.sum())
    assert rk[0] and rk[49] and rk[50] and rk[69]
    assert not torch.equal(rk, sk)


def test_mask_and_dense_router():
    inp = _inputs([4], 0.5, layer=1)
    masks = torch.tensor([[True] * 4, [True, False, False, False]])
    assert MaskRouter(masks).keep(inp).tolist() == [True, False, False, True]
    assert DenseRouter().keep(inp).all()
    with pytest.raises(ValueError, match="shape"):
        MaskRouter(masks).keep(_inputs([5], 0.5, layer=1))


def test_mlp_router_argmax_and_needs_scores():
    router = MLPRouter()
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
        router.net[-1].bias.copy_(torch.tensor([1.0, 0.0]))  # prefers skip
    keep = router.keep(_inputs([5], 0.3))
    assert keep.tolist() == [True, False, False, False, True]
    with pytest.raises(ValueError, match="scores"):
        router.logits(RouterInputs(0, TokenLayout.from_lengths([3]), torch.zeros(3)))


def test_schedule_interpolates_and_refuses_out_of_range():
    sched = SparsitySchedule({0.2: [0.1, 0.3], 0.4: [0.3, 0.5]}, num_layers=2)
    torch.testing.assert_close(sched.blocks(0.2), torch.tensor([0.1, 0.3], dtype=torch.float64))
    torch.testing.assert_close(sched.blocks(0.3), torch.tensor([0.2, 0.4], dtype=torch.float64))
    torch.testing.assert_close(sched.blocks(0.1), torch.tensor([0.05, 0.15], dtype=torch.float64))
    assert sched.blocks(0).sum() == 0
    for bad in (-0.1, 0.5, "x", None):
        with pytest.raises(ValueError):
            sched.blocks(bad)
    with pytest.raises(ValueError, match="blocks"):
        SparsitySchedule({0.2: [0.1]}, num_layers=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SparsitySchedule({0.2: [0.1, 1.5]}, num_layers=2)
    with pytest.raises(ValueError, match=r"mean sparsity must lie in \[0, 1\)"):
        SparsitySchedule({1.0: [1.0, 1.0]}, num_layers=2)
    # A block may skip all it may (the free last block, docs/ROUTER.md).
    assert SparsitySchedule({0.3: [0.0, 0.6], 0.5: [0.0, 1.0]}, num_layers=2).blocks(0.5)[1] == 1
