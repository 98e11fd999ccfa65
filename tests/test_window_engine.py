"""Window routing inside vLLM's CPU engine, with chunked prefill and prefix caching on.

Window routing (docs/ROUTER.md) decides each aligned window of prompt positions from the
window and what precedes it, so a routed prompt's output does not depend on how the engine
splits it into chunks or which prefix it finds cached. The reference forward (the oracle,
whole prompt, cold) must equal the engine run with a small chunk budget, warm prefix caches
and mixed batches; dense requests must equal vanilla vLLM with the same features on.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from ftp_vllm.artifact import folder_fingerprint, load_artifact  # noqa: E402
from ftp_vllm.plugin import routing_overrides  # noqa: E402
from ftp_vllm.reference import routed_forward  # noqa: E402
from tests.engine_helpers import (  # noqa: E402
    LOGPROB_TOL,
    MAX_NEW,
    engine_kwargs,
    params,
    prompt_logprobs,
    random_prompt,
    run,
    shutdown,
)
from tests.tiny_models import make_artifact  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SPARSITY = 0.3
WINDOW = 16
BUDGET = 40  # tokens per step: chunks of prompts longer than this end on window boundaries
LENGTHS = (3, 17, 40, 97, 150)


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    return folder_fingerprint(tiny_llama_dir)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, hf):
    return make_artifact(tmp_path_factory.mktemp("art") / "mlp-window", hf[0], kind="mlp",
                         window=WINDOW)


@pytest.fixture(scope="module")
def prompts():
    return [random_prompt(n, seed=100 + n) for n in LENGTHS]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir, artifact):
    from vllm import LLM

    engine = LLM(str(tiny_llama_dir), hf_overrides=routing_overrides(artifact, SPARSITY),
                 enable_chunked_prefill=True, max_num_batched_tokens=BUDGET,
                 enable_prefix_caching=True, **engine_kwargs())
    engine.collective_rpc("ftp_record_masks")
    yield engine
    shutdown(engine)


def reference(hf_model, art, prompt, sparsity=SPARSITY):
    """(greedy tokens, prompt logprobs, keep [L, n]) of the reference window routing."""
    from ftp_vllm.reference import greedy_generate

    blocks = art.schedule.blocks(sparsity)
    ids = torch.tensor(prompt)
    own = routed_forward(hf_model, ids, None, art.router, blocks, window=art.window)
    lp = torch.log_softmax(own.logits.double(), -1)
    logprobs = lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    gen = greedy_generate(hf_model, ids, MAX_NEW, art.router, blocks, window=art.window)
    return gen.tokens, logprobs, own.keep


def test_chunked_and_warm_runs_equal_the_cold_whole_prompt_reference(llm, hf, artifact, prompts):
    """Chunks of 40 tokens (prompts up to 150), a cold cache, then the same prompts again
    (prefix-cache hits), then prompts sharing a prefix: every run equals the reference."""
    art = load_artifact(artifact)
    refs = [reference(hf[1], art, p) for p in prompts]
    sampling = params(sparsity=SPARSITY, prompt_logprobs=None)
    for attempt in ("cold", "warm"):
        before = routed_tokens(llm)
        outs, masks = run(llm, prompts, sampling)
        computed = routed_tokens(llm) - before
        if attempt == "cold":
            assert computed == sum(map(len, prompts))
        else:  # cache hits, cut back to window boundaries: every prompt recomputes its tail
            assert computed < sum(map(len, prompts)) - 100
        for p, out, mask, (tokens, _lp, keep) in zip(prompts, outs, masks, refs, strict=True):
            assert list(out.outputs[0].token_ids) == tokens, (attempt, len(p))
            if attempt == "cold":
                assert mask is not None and torch.equal(mask, keep), len(p)
    # shared prefixes: 64 tokens of the 150-token prompt + a new tail
    shared = [prompts[-1][:64] + random_prompt(n, seed=7 + n) for n in (20, 45)]
    outs, _ = run(llm, shared, sampling)
    for p, out in zip(shared, outs, strict=True):
        assert list(out.outputs[0].token_ids) == reference(hf[1], art, p)[0], len(p)
    stats = llm.collective_rpc("ftp_routing_stats")[0]
    assert stats["unaligned_tokens"] == 0


def routed_tokens(llm) -> int:
    return llm.collective_rpc("ftp_routing_stats")[0]["routed_tokens"]


def test_routed_and_dense_requests_never_share_cached_blocks(llm):
    """The routing configuration is part of the prefix-cache key: a routed request after a
    dense one of the same prompt computes it all, and a second routed one hits the cache."""
    fresh = [random_prompt(n, seed=500 + n) for n in (64, 130)]
    run(llm, fresh, params(sparsity=0.0, prompt_logprobs=None))
    before = routed_tokens(llm)
    run(llm, fresh, params(sparsity=SPARSITY, prompt_logprobs=None))
    assert routed_tokens(llm) - before == sum(map(len, fresh))
    before = routed_tokens(llm)
    run(llm, fresh, params(sparsity=0.2, prompt_logprobs=None))  # another target: own key
    assert routed_tokens(llm) - before == sum(map(len, fresh))
    before = routed_tokens(llm)
    run(llm, fresh, params(sparsity=SPARSITY, prompt_logprobs=None))
    assert routed_tokens(llm) - before < sum(map(len, fresh)) - 100


def test_prompt_logprobs_equal_the_reference_when_asked_with_a_target(llm, hf, artifact,
                                                                      prompts):
    art = load_artifact(artifact)
    outs, masks = run(llm, prompts, params(sparsity=SPARSITY))
    for p, out, mask in zip(prompts, outs, masks, strict=True):
        _tokens, want, keep = reference(hf[1], art, p)
        assert torch.equal(mask, keep)
        got = prompt_logprobs(out)
        assert torch.allclose(got, want, atol=LOGPROB_TOL), (got - want).abs().max()


def test_prompt_logprobs_without_a_target_are_dense(llm, tiny_llama_dir, prompts):
    """A request asking for prompt log-probabilities and no ftp_sparsity is served dense."""
    outs, masks = run(llm, prompts, params(sparsity=None))
    assert all(m is None for m in masks)
    routed_default, _ = run(llm, prompts, params(sparsity=None, prompt_logprobs=None))
    assert all(o.outputs for o in routed_default)


def test_batch_composition_does_not_change_outputs(llm, prompts):
    """Alone, or in a batch whose other requests change the chunk boundaries."""
    sampling = params(sparsity=SPARSITY, prompt_logprobs=None)
    together, _ = run(llm, prompts, sampling)
    for i, p in enumerate(prompts):
        alone, _ = run(llm, [random_prompt(23, seed=i), p], sampling)
        assert alone[1].outputs[0].token_ids == together[i].outputs[0].token_ids


def test_dense_requests_equal_vanilla_with_the_same_features(llm, tiny_llama_dir, prompts):
    from vllm import LLM

    vanilla = LLM(str(tiny_llama_dir), enable_chunked_prefill=True,
                  max_num_batched_tokens=BUDGET, enable_prefix_caching=True,
                  enforce_eager=True, **engine_kwargs())
    want = vanilla.generate([{"prompt_token_ids": p} for p in prompts], params())
    shutdown(vanilla)
    got, masks = run(llm, prompts, params(sparsity=0.0))
    assert all(m is None for m in masks)
    for w, g in zip(want, got, strict=True):
        assert w.outputs[0].token_ids == g.outputs[0].token_ids
        assert torch.equal(prompt_logprobs(w), prompt_logprobs(g))
