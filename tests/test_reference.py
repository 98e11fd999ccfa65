"""The reference routed forward (the oracle) on tiny random Llama and Qwen2 models."""

import pytest
import torch

from ftp_vllm.reference import greedy_generate, routed_forward, token_sparsity
from ftp_vllm.routing.router import DenseRouter, MaskRouter, MLPRouter, StaticRouter
from tests.tiny_models import tiny_model

ARCHS = ["llama", "qwen2"]
HALF = torch.full((4,), 0.5)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


def _ids(n, seed=0):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_dense_equals_transformers(model):
    ids = _ids(23)
    ours = routed_forward(model, ids, router=DenseRouter()).logits
    theirs = model(ids[None]).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_flattened_sequences_equal_one_by_one(model):
    seqs = [_ids(n, seed=n) for n in (9, 1, 17)]
    sched = torch.tensor([0.2, 0.4, 0.5, 0.3])
    flat = routed_forward(model, torch.cat(seqs), [9, 1, 17], StaticRouter(), sched)
    start = 0
    for s in seqs:
        one = routed_forward(model, s, router=StaticRouter(), block_sparsity=sched)
        torch.testing.assert_close(flat.logits[start : start + len(s)], one.logits)
        assert torch.equal(flat.keep[:, start : start + len(s)], one.keep)
        start += len(s)


def _block_io(model, ids, masks):
    """Hidden states entering each block, and the K of each block, captured by hooks."""
    ins, ks, hooks = [], [], []
    for layer in model.model.layers:
        norm, k_proj = layer.input_layernorm, layer.self_attn.k_proj
        hooks.append(norm.register_forward_hook(lambda m, a, o: ins.append(a[0].clone())))
        hooks.append(k_proj.register_forward_hook(lambda m, a, o: ks.append(o.clone())))
    try:
        out = routed_forward(model, ids, router=MaskRouter(masks), block_sparsity=HALF)
    finally:
        for h in hooks:
            h.remove()
    return out, ins, ks


@torch.no_grad()
def test_skipped_token_passes_block_unchanged_and_keeps_kv(model):
    n = 12
    ids = _ids(n)
    masks = torch.ones(4, n, dtype=torch.bool)
    masks[1, 3] = masks[1, 5] = masks[2, 3] = False
    out, ins, ks = _block_io(model, ids, masks)
    assert out.keep.tolist() == masks.tolist()
    # Token 3 skips blocks 1 and 2: its hidden state enters block 3 exactly as it entered 1.
    assert torch.equal(ins[3][3], ins[1][3])
    assert torch.equal(ins[2][5], ins[1][5])
    assert not torch.equal(ins[2][4], ins[1][4])
    # Its K/V at a skipped block exist and come from the hidden state it carries in.
    layer = model.model.layers[2]
    k_expected = layer.self_attn.k_proj(layer.input_layernorm(ins[2][3]))
    torch.testing.assert_close(ks[2][3], k_expected)
    # And later tokens attend to them: changing the skipped token's K changes a later output.
    dense = routed_forward(model, ids, router=DenseRouter())
    assert not torch.allclose(dense.logits[6], out.logits[6])


@torch.no_grad()
def test_first_and_last_token_never_skipped(model):
    ids = _ids(10)
    masks = torch.zeros(4, 10, dtype=torch.bool)
    out = routed_forward(model, ids, router=MaskRouter(masks), block_sparsity=HALF)
    assert out.keep[:, 0].all() and out.keep[:, -1].all() and not out.keep[:, 1:-1].any()
    router = MLPRouter()
    with torch.no_grad():
        router.net[-1].bias.copy_(torch.tensor([50.0, -50.0]))
    out = routed_forward(model, ids, router=router, block_sparsity=torch.full((4,), 0.5))
    assert out.keep[:, 0].all() and out.keep[:, -1].all()
    assert token_sparsity(out.keep) == pytest.approx(8 / 10)


@torch.no_grad()
def test_zero_sparsity_is_dense(model):
    ids = _ids(15)
    dense = routed_forward(model, ids, router=DenseRouter()).logits
    for r in (StaticRouter(), MLPRouter()):
        out = routed_forward(model, ids, router=r, block_sparsity=torch.zeros(4))
        assert torch.equal(out.logits, dense) and out.keep.all()


@torch.no_grad()
def test_greedy_generation_routes_prompt_only(model):
    prompt = _ids(14)
    sched = torch.tensor([0.3, 0.5, 0.5, 0.3])
    res = greedy_generate(model, prompt, 6, StaticRouter(), sched)
    assert len(res.tokens) == 6 and res.keep.shape == (4, 14)
    assert 0 < res.sparsity < 1
    # Same tokens as one routed forward over prompt + generated with the prompt routed only.
    full = torch.cat([prompt, torch.tensor(res.tokens[:-1])])
    out = routed_forward(model, full, [len(full)], StaticRouter(), sched, routed_lengths=[14])
    assert out.logits[13:].argmax(-1).tolist() == res.tokens
    assert torch.equal(out.keep, res.keep)
    # Dense generation is transformers' greedy generation.
    dense = greedy_generate(model, prompt, 6)
    hf = model.generate(prompt[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert hf[0, 14:].tolist() == dense.tokens


@torch.no_grad()
def test_logits_at_selects_positions(model):
    ids = _ids(16)
    sched = torch.full((4,), 0.4)
    full = routed_forward(model, ids, router=StaticRouter(), block_sparsity=sched)
    at = torch.tensor([3, 15])
    part = routed_forward(model, ids, router=StaticRouter(), block_sparsity=sched, logits_at=at)
    torch.testing.assert_close(part.logits, full.logits[at])
    assert torch.equal(part.keep, full.keep)
