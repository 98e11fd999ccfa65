"""The first-token KL the engine tests compute from vLLM's top-20 log-probabilities is a lower
bound of the full KL, exact when both top lists hold the same tokens."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.engine_helpers import first_token_kl

VOCAB = 200
TOP = 20


def top_logprobs(logp: torch.Tensor, k: int = TOP) -> dict[int, SimpleNamespace]:
    v, i = logp.topk(k)
    return {int(t): SimpleNamespace(logprob=float(x)) for t, x in zip(i, v, strict=True)}


def full_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum())


def test_lower_bound_of_the_full_kl():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        p = (torch.randn(VOCAB, generator=g, dtype=torch.float64) * 3).log_softmax(-1)
        q = (p + torch.randn(VOCAB, generator=g, dtype=torch.float64) * 0.3).log_softmax(-1)
        got = first_token_kl(top_logprobs(q), top_logprobs(p))
        assert -1e-12 <= got <= full_kl(p, q) + 1e-12, (got, full_kl(p, q))


def test_exact_when_the_lists_cover_the_vocabulary():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(TOP, generator=g, dtype=torch.float64).log_softmax(-1)
    q = torch.randn(TOP, generator=g, dtype=torch.float64).log_softmax(-1)
    got = first_token_kl(top_logprobs(q), top_logprobs(p))
    assert abs(got - full_kl(p, q)) < 1e-9, (got, full_kl(p, q))


def test_a_swap_at_the_last_rank_stays_small():
    """Two runs agree except that the 20th and 21st tokens trade places: a tiny difference,
    which a made-up probability for the missing token would have read as a large KL."""
    p = torch.linspace(0, -8, VOCAB, dtype=torch.float64).log_softmax(-1)
    q = p.clone()
    q[TOP - 1], q[TOP] = p[TOP], p[TOP - 1]
    assert first_token_kl(top_logprobs(q), top_logprobs(p)) <= full_kl(p, q) + 1e-12
    assert full_kl(p, q) < 1e-3
