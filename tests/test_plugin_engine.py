"""The routed model inside vLLM's CPU engine, proven against the reference forward.

One vanilla engine (vLLM's default compilation mode) and one routed engine (MLP router with
random weights that mix all four factors), both on a tiny random Llama. The routed engine is
started asking for chunked prefill (with a 64-token step budget) and prefix caching, which
the plugin must switch off for this exact-routing artifact (window routing keeps them:
tests/test_window_engine.py). Routed requests set ftp_sparsity: a request asking for prompt
log-probabilities without one is served dense.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from ftp_vllm.artifact import folder_fingerprint  # noqa: E402
from ftp_vllm.plugin import routing_overrides  # noqa: E402
from tests.engine_helpers import (  # noqa: E402
    MAX_NEW,
    check_against_reference,
    engine_kwargs,
    masks_by_request,
    params,
    prompt_logprobs,
    random_prompt,
    run,
    shutdown,
)
from tests.tiny_models import make_artifact  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SPARSITY = 0.3
LENGTHS = (3, 17, 40, 97, 150)  # 97 and 150 exceed the 64-token step budget asked for


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    fp, model = folder_fingerprint(tiny_llama_dir)
    return fp, model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, hf):
    return make_artifact(tmp_path_factory.mktemp("art") / "mlp", hf[0], kind="mlp")


@pytest.fixture(scope="module")
def router(artifact):
    from ftp_vllm.artifact import load_artifact

    return load_artifact(artifact)


@pytest.fixture(scope="module")
def prompts():
    return [random_prompt(n, seed=n) for n in LENGTHS]


@pytest.fixture(scope="module")
def vanilla_outputs(tiny_llama_dir, prompts):
    """Vanilla vLLM in its default mode: tokens and prompt logprobs for each prompt."""
    from vllm import LLM

    llm = LLM(str(tiny_llama_dir), **engine_kwargs())
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params())
    result = [(list(o.outputs[0].token_ids), prompt_logprobs(o)) for o in outs]
    shutdown(llm)
    return result


@pytest.fixture(scope="module")
def llm(tiny_llama_dir, artifact, vanilla_outputs):
    from vllm import LLM

    engine = LLM(
        str(tiny_llama_dir),
        hf_overrides=routing_overrides(artifact, SPARSITY),
        enable_chunked_prefill=True, max_num_batched_tokens=64, enable_prefix_caching=True,
        **engine_kwargs(),
    )
    engine.collective_rpc("ftp_record_masks")
    yield engine
    shutdown(engine)


def test_features_switched_off(llm):
    cfg = llm.llm_engine.vllm_config
    assert cfg.scheduler_config.enable_chunked_prefill is False
    assert cfg.cache_config.enable_prefix_caching is False


def test_sparsity_zero_equals_vanilla(llm, prompts, vanilla_outputs):
    outs, masks = run(llm, prompts, params(sparsity=0.0))
    assert all(m is None for m in masks)  # nothing routed
    for (tokens, lps), out in zip(vanilla_outputs, outs, strict=True):
        assert list(out.outputs[0].token_ids) == tokens
        assert torch.allclose(prompt_logprobs(out), lps, atol=1e-5, rtol=0)


def test_prompt_logprobs_without_a_target_run_dense(llm, prompts, vanilla_outputs):
    """A request asking for prompt log-probabilities without ftp_sparsity is served dense
    (vanilla's output); without prompt log-probabilities it is routed at the default target."""
    outs, masks = run(llm, prompts, params(sparsity=None))
    assert all(m is None for m in masks)
    for (tokens, lps), out in zip(vanilla_outputs, outs, strict=True):
        assert list(out.outputs[0].token_ids) == tokens
        assert torch.allclose(prompt_logprobs(out), lps, atol=1e-5, rtol=0)
    _, default = run(llm, prompts, params(sparsity=None, prompt_logprobs=None))
    _, explicit = run(llm, prompts, params(sparsity=SPARSITY, prompt_logprobs=None))
    for p, a, b in zip(prompts, default, explicit, strict=True):
        assert a is not None and a.shape == (4, len(p)) and torch.equal(a, b)


def test_routed_batch_matches_reference(llm, hf, router, prompts):
    outs, masks = run(llm, prompts, params(sparsity=SPARSITY))
    agree = []
    for prompt, out, mask in zip(prompts, outs, masks, strict=True):
        assert mask is not None and mask.shape == (4, len(prompt))
        assert bool(mask[:, 0].all()) and bool(mask[:, -1].all())  # invariant 4
        agree.append(check_against_reference(hf[1], router, prompt, out, mask, SPARSITY))
    total = sum(m.numel() for m in masks)
    skipped = sum(int((~m).sum()) for m in masks)
    assert skipped / total > 0.1  # routing really skipped work
    weighted = sum(a * m.numel() for a, m in zip(agree, masks, strict=True)) / total
    assert weighted >= 0.99, agree


def test_batch_invariance(llm, prompts):
    batch, batch_masks = run(llm, prompts, params(sparsity=SPARSITY))
    for i in (1, 3):
        alone, alone_masks = run(llm, [prompts[i]], params(sparsity=SPARSITY))
        assert list(alone[0].outputs[0].token_ids) == list(batch[i].outputs[0].token_ids)
        assert torch.equal(alone_masks[0], batch_masks[i])
        assert torch.allclose(
            prompt_logprobs(alone[0]), prompt_logprobs(batch[i]), atol=1e-5, rtol=0
        )


def test_per_request_sparsity(llm, hf, router, prompts):
    targets = [0.0, 0.2, 0.4, 0.3, 0.1]
    outs, masks = run(llm, prompts, [params(sparsity=s) for s in targets])
    skipped = []
    for prompt, out, mask, s in zip(prompts, outs, masks, targets, strict=True):
        if s == 0.0:
            assert mask is None
            continue
        check_against_reference(hf[1], router, prompt, out, mask, s)
        skipped.append((s, 1 - mask.float().mean().item()))
    assert max(skipped)[1] > min(skipped)[1]  # the target reaches the router


def test_shared_prefix_prompts(llm, hf, router):
    prefix = random_prompt(96, seed=7)
    prompts = [prefix + random_prompt(9, seed=8), prefix + random_prompt(21, seed=9)]
    for p in prompts:  # one after the other: a prefix cache would hit on the second
        (out,), (mask,) = run(llm, [p], params(sparsity=SPARSITY))
        check_against_reference(hf[1], router, p, out, mask, SPARSITY)


def test_mixed_prefill_and_decode_steps(llm, hf, router, prompts):
    """A prompt arriving while others decode shares their steps and still matches."""
    engine = llm.llm_engine
    llm.collective_rpc("ftp_pop_masks")
    engine.add_request("a", {"prompt_token_ids": prompts[2]}, params(sparsity=SPARSITY))
    engine.step()  # prefill of a
    engine.step()  # a decodes
    engine.add_request("b", {"prompt_token_ids": prompts[4]}, params(sparsity=SPARSITY))
    engine.add_request("c", {"prompt_token_ids": prompts[1]}, params(sparsity=SPARSITY))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    masks = masks_by_request(llm.collective_rpc("ftp_pop_masks")[0])
    for rid, prompt in (("a", prompts[2]), ("b", prompts[4]), ("c", prompts[1])):
        check_against_reference(hf[1], router, prompt, done[rid], masks[rid], SPARSITY)


def test_routing_stats(llm, prompts):
    llm.collective_rpc("ftp_routing_stats", kwargs={"reset": True})
    run(llm, prompts[:3], params(sparsity=SPARSITY))
    stats = llm.collective_rpc("ftp_routing_stats", kwargs={"drain_requests": True})[0]
    assert stats["routed_requests"] == 3
    assert stats["routed_tokens"] == sum(len(p) for p in prompts[:3])
    assert len(stats["kept_per_layer"]) == 4
    assert stats["skipped_pairs"] > 0
    assert stats["flop_speedup"] > 1.0
    assert len(stats["requests"]) == 3
    for rec in stats["requests"]:
        assert 0.0 <= rec["token_sparsity"] < 1.0 and rec["flop_speedup"] >= 1.0


def test_decode_timing_counts_only_decode_steps(llm, prompts):
    """`ftp-vllm bench prefill` times decode over the engine's steps after every request's
    first token: it counts the tokens after that, and those steps are never planned."""
    from ftp_vllm.bench.prefill import decode_timing

    batch = [{"prompt_token_ids": p} for p in prompts[:3]]
    sampling = params(sparsity=SPARSITY, prompt_logprobs=None)
    llm.collective_rpc("ftp_routing_stats", kwargs={"reset": True})
    tokens, seconds = decode_timing(llm, batch[:1], sampling)
    stats = llm.collective_rpc("ftp_routing_stats")[0]
    assert tokens == MAX_NEW - 1 and seconds > 0
    assert stats["routed_requests"] == 1
    assert stats["steps"] - stats["prompt_steps"] == MAX_NEW - 1
    # prompts whose prefills end in different steps: the clock starts at the last one's
    tokens, seconds = decode_timing(llm, batch, sampling)
    assert MAX_NEW - 1 <= tokens <= 3 * (MAX_NEW - 1) and seconds > 0
    with pytest.raises(RuntimeError, match="no decode step"):
        decode_timing(llm, batch[:1], params(sparsity=SPARSITY, prompt_logprobs=None,
                                             max_tokens=1))


def expected_builds(mask: torch.Tensor, limit: int, reusable: bool) -> int:
    """Metadata builds for one prompt alone: each partial layer asks for keys (mask, first
    run) of groups of `limit` runs; reusable backends build each distinct key once, stateful
    ones every key that differs from the one asked for just before (subset.MetadataCache)."""
    keys = []
    for row in mask.tolist():
        if all(row):
            continue  # vLLM's own path
        runs = sum(1 for i, k in enumerate(row) if k and (i == 0 or not row[i - 1]))
        keys += [(tuple(row), lo) for lo in range(0, runs, limit)]
    if reusable:
        return len(set(keys))
    return sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])


@pytest.mark.parametrize("reusable", [True, False], ids=["stateless", "stateful"])
def test_split_attention_and_cache_policy(llm, hf, router, prompts, reusable):
    """A builder that takes few requests (FlashInfer: max_num_seqs) gets a layer's virtual
    requests in several builds and attention calls, and a stateful one (FlashInfer) is
    re-planned whenever the key changes: results do not change, builds are as designed."""
    stats = "ftp_routing_stats"
    for i in (3, 4):  # 97 and 150 tokens: many runs of kept tokens per layer
        llm.collective_rpc(stats, kwargs={"reset": True})
        (whole,), (mask,) = run(llm, [prompts[i]], params(sparsity=SPARSITY))
        builds_whole = llm.collective_rpc(stats)[0]["metadata_builds"]
        assert llm.collective_rpc("ftp_set_subset_policy", args=(2, reusable)) == [True]
        try:
            llm.collective_rpc(stats, kwargs={"reset": True})
            (split,), (split_mask,) = run(llm, [prompts[i]], params(sparsity=SPARSITY))
            builds_split = llm.collective_rpc(stats)[0]["metadata_builds"]
        finally:
            llm.collective_rpc("ftp_set_subset_policy")
        assert torch.equal(mask, split_mask)
        assert builds_whole == expected_builds(mask, 10**9, True)  # CPU_ATTN: no limit
        assert builds_split == expected_builds(mask, 2, reusable) > 2 * builds_whole
        assert list(whole.outputs[0].token_ids) == list(split.outputs[0].token_ids)
        assert torch.allclose(prompt_logprobs(whole), prompt_logprobs(split), atol=1e-5, rtol=0)
        check_against_reference(hf[1], router, prompts[i], split, split_mask, SPARSITY)
