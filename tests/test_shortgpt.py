"""ShortGPT baseline: Block Influence, which blocks go, and the pruned model."""

import pytest
import torch
import torch.nn.functional as F

from ftp_vllm.eval.scoring import ReferenceScorer
from ftp_vllm.shortgpt import block_influence, num_blocks_to_drop, plan, prune
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _seqs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (12, 5, 20)]


def test_block_count_matches_sparsity():
    assert num_blocks_to_drop(0.22, 30) == 7
    assert num_blocks_to_drop(0.3, 30) == 9
    assert num_blocks_to_drop(0.4, 30) == 12
    assert num_blocks_to_drop(0.0, 30) == 0
    with pytest.raises(ValueError):
        num_blocks_to_drop(1.0, 30)


def test_plan_drops_the_lowest_influence_blocks():
    bi = [0.9, 0.05, 0.3, 0.01, 0.2, 0.5]
    p = plan(bi, 0.5)  # k = 3
    assert p.dropped == [1, 3, 4]
    assert p.k == 3 and p.sparsity == 0.5
    assert plan(bi, 0.0).dropped == []


@torch.no_grad()
def test_block_influence_is_one_minus_mean_cosine(model):
    seqs = _seqs()
    bi = block_influence(model, seqs)
    num_layers = model.config.num_hidden_layers
    # transformers' hidden states: [l] enters block l, [l + 1] leaves it (the last one is
    # after the final norm, so compare the blocks before it).
    sums = torch.zeros(num_layers - 1, dtype=torch.float64)
    count = 0
    for s in seqs:
        hs = model(torch.tensor(s)[None], output_hidden_states=True).hidden_states
        for layer in range(num_layers - 1):
            sums[layer] += F.cosine_similarity(hs[layer][0].double(), hs[layer + 1][0].double(),
                                               dim=-1).sum()
        count += len(s)
    torch.testing.assert_close(bi[:-1], 1 - sums / count)
    assert bool(((bi > 0) & (bi < 2)).all())


@torch.no_grad()
def test_pruned_model_equals_original_without_those_blocks(model):
    dropped = [1, 2]
    pruned = prune(model, dropped)
    assert len(pruned.model.layers) == 2 and pruned.config.num_hidden_layers == 2
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4  # untouched
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    # The original with blocks 1 and 2 replaced by the identity.
    hooks = [model.model.layers[i].register_forward_hook(lambda m, a, o: a[0])
             for i in dropped]
    ids = torch.tensor(_seqs()[2])[None]
    try:
        want = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(pruned(ids).logits, want)
    # Same through the reference forward the eval harness uses, and through a KV cache.
    scorer = ReferenceScorer(pruned)
    ids_list = ids[0].tolist()
    lp = scorer.logprobs([(ids_list[:10], ids_list[10:])])[0]
    logp = F.log_softmax(want[0].double(), dim=-1)
    hand = sum(logp[t - 1, ids_list[t]].item() for t in range(10, len(ids_list)))
    assert lp == pytest.approx(hand, abs=1e-4)
    out = pruned.generate(ids[:, :8], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


@torch.no_grad()
def test_pruned_scorer_accounts_removed_blocks(model):
    p = plan(block_influence(model, _seqs()), 0.25)
    pruned = prune(model, p.dropped)
    scorer = ReferenceScorer(pruned, dense_num_layers=4)
    scorer.logprobs([([1, 2, 3, 4, 5], [6, 7])])
    assert scorer.stats.sparsity == pytest.approx(0.25)
    assert scorer.stats.flop_fraction == pytest.approx(0.75)
