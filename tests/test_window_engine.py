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
    BF16_ATOL,
    LOGPROB_TOL,
    MAX_NEW,
    check_tokens_or_tie,
    engine_kwargs,
    first_token_kl,
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
    # with a skip update (``routing.skip_update``), as the served default has
    return make_artifact(tmp_path_factory.mktemp("art") / "mlp-window", hf[0], kind="mlp",
                         window=WINDOW, skip_rank=8)


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
    own = routed_forward(hf_model, ids, None, art.router, blocks, window=art.window,
                         skip_update=art.skip_update)
    lp = torch.log_softmax(own.logits.double(), -1)
    logprobs = lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    gen = greedy_generate(hf_model, ids, MAX_NEW, art.router, blocks, window=art.window,
                          skip_update=art.skip_update)
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

    # vanilla at its defaults (compiled): steps with nothing to route run vLLM's compiled model
    vanilla = LLM(str(tiny_llama_dir), enable_chunked_prefill=True,
                  max_num_batched_tokens=BUDGET, enable_prefix_caching=True,
                  **engine_kwargs())
    want = vanilla.generate([{"prompt_token_ids": p} for p in prompts], params())
    shutdown(vanilla)
    got, masks = run(llm, prompts, params(sparsity=0.0))
    assert all(m is None for m in masks)
    for w, g in zip(want, got, strict=True):
        assert w.outputs[0].token_ids == g.outputs[0].token_ids
        assert torch.equal(prompt_logprobs(w), prompt_logprobs(g))


def test_static_router_chunks_end_anywhere_and_equal_the_reference(tiny_llama_dir, hf, prompts,
                                                                  tmp_path):
    """The static router reads positions only, so the scheduler no longer cuts chunks back to
    window boundaries: with a 37-token budget (windows of 16) chunks end inside windows, and
    cold, warm and batched runs still equal the cold whole-prompt reference, masks included;
    nothing runs dense for being split. Every layer's route is made when the step is planned
    (the router reads no hidden state), with either kind of backend metadata policy."""
    from vllm import LLM

    from ftp_vllm.routing.schedule import SparsitySchedule
    from ftp_vllm.training.schedule_search import last_block_pin, pin_blocks

    # The schedule `ftp-vllm schedule` makes for a static router: the last block skips all
    # it may (target 1), the others share the rest: [0.2, 0.2, 0.2, 1] at 0.4.
    path = make_artifact(tmp_path / "static-window", hf[0], kind="static", targets=(0.4,),
                         window=WINDOW)
    art = load_artifact(path)
    layers = art.num_layers
    art.schedule = SparsitySchedule(
        {0.4: pin_blocks(art.schedule.rows[0.4], 0.4, 0.9, last_block_pin(layers))}, layers)
    art.save(path)
    art = load_artifact(path)
    assert art.schedule.blocks(0.4)[-1] == 1.0
    engine = LLM(str(tiny_llama_dir), hf_overrides=routing_overrides(path, 0.4),
                 enable_chunked_prefill=True, max_num_batched_tokens=37,
                 enable_prefix_caching=True, **engine_kwargs())
    engine.collective_rpc("ftp_record_masks")
    try:
        sampling = params(sparsity=0.4, prompt_logprobs=None)
        refs = [reference(hf[1], art, p, 0.4) for p in prompts]
        for attempt in ("cold", "warm"):
            outs, masks = run(engine, prompts, sampling)
            for p, out, mask, (tokens, _lp, keep) in zip(prompts, outs, masks, refs,
                                                         strict=True):
                assert list(out.outputs[0].token_ids) == tokens, (attempt, len(p))
                if attempt == "cold":
                    assert mask is not None and torch.equal(mask, keep), len(p)
        # A 38-token prompt alone: its second step routes one token, and the pinned last block
        # keeps one token in several steps. Sizes Dynamo specializes (1 row) once poisoned the
        # compiled dense parts and crashed the engine's next routed step.
        short = random_prompt(38, seed=4)
        outs, masks = run(engine, [short], sampling)
        tokens, _lp, keep = reference(hf[1], art, short, 0.4)
        assert list(outs[0].outputs[0].token_ids) == tokens
        assert torch.equal(masks[0], keep)
        # one 148-token prompt alone: 4 chunks of 37 (window-aligned chunks would take 5)
        lone = random_prompt(148, seed=5)
        before = engine.collective_rpc("ftp_routing_stats")[0]
        outs, masks = run(engine, [lone], sampling)
        after = engine.collective_rpc("ftp_routing_stats")[0]
        assert after["routed_steps"] - before["routed_steps"] == 4
        # the decode steps after it take vLLM's path without a plan
        assert after["prompt_steps"] - before["prompt_steps"] == 4
        assert after["steps"] - before["steps"] == 4 + MAX_NEW - 1
        tokens, _lp, keep = reference(hf[1], art, lone, 0.4)
        assert list(outs[0].outputs[0].token_ids) == tokens
        assert torch.equal(masks[0], keep)
        assert engine.collective_rpc("ftp_routing_stats")[0]["unaligned_tokens"] == 0
        # The same plan-time routes through a backend that takes 2 virtual requests per build
        # and keeps only its latest build (FlashInfer's kind): several attention calls per
        # layer, metadata built at the layer, results unchanged.
        assert engine.collective_rpc("ftp_set_subset_policy", args=(2, False)) == [True]
        try:
            engine.collective_rpc("ftp_routing_stats", kwargs={"reset": True})
            other = random_prompt(148, seed=6)
            outs, masks = run(engine, [other], sampling)
            stats = engine.collective_rpc("ftp_routing_stats")[0]
        finally:
            engine.collective_rpc("ftp_set_subset_policy")
        tokens, _lp, keep = reference(hf[1], art, other, 0.4)
        assert list(outs[0].outputs[0].token_ids) == tokens
        assert torch.equal(masks[0], keep)
        assert stats["metadata_builds"] > stats["routed_steps"] * 2
    finally:
        shutdown(engine)


# ------------------------------------------------------------ SmolLM2, the served default
TURN_TOKENS = 24
# First-token KL that bf16 rounding explains. On a 2-core AVX2-only CPU (no AVX512-BF16, no
# AMX) warm against cold measured up to 0.0016 here, and bf16 against float32 on chat prompts
# of 99-304 tokens up to 0.0014 for plain vLLM and 0.0021 for the routed engine; one routed
# block skipping its share moved it by 0.01 to 3.9 in issue 10's block-sensitivity runs.
NOISE_KL = {"bfloat16": 5e-3, "float32": 1e-5}
ANSWER_TOKENS = 200  # the first answer fills the KV block holding the first prompt's tail


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_multi_turn_warm_vs_cold(dtype):
    """The second turn of a chat reuses the first turn's cached windows, but not the blocks
    from the first prompt's last window on (decided by its last token; the answer ran dense):
    served warm it equals the same turn computed cold (after reset_prefix_cache) up to float
    rounding. A warm turn multiplies fewer rows per matmul than a cold one, and on CPUs whose
    bf16 matmuls round by shape (AVX2 only: no AVX512-BF16, no AMX) bf16 greedy tokens can
    part at a bf16 tie; float32 tokens are equal. The first-token distributions stay within
    NOISE_KL of each other."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from ftp_vllm.artifact import DEFAULT_ARTIFACT, load_artifact
    from ftp_vllm.eval.heldout import heldout_passages
    from tests.tiny_models import prepared_default_model

    model_dir = prepared_default_model()
    art = load_artifact(DEFAULT_ARTIFACT)
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = LLM(str(model_dir), hf_overrides=routing_overrides(DEFAULT_ARTIFACT, SPARSITY),
              dtype=dtype, max_model_len=2048, seed=0)
    cfg = llm.llm_engine.vllm_config
    assert cfg.cache_config.enable_prefix_caching and cfg.scheduler_config.enable_chunked_prefill
    greedy = SamplingParams(max_tokens=TURN_TOKENS, temperature=0.0, logprobs=20)
    answer = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, ignore_eos=True)
    passages = heldout_passages()
    kls, reused = [], 0
    for i in range(4):
        messages = [{"role": "user", "content": passages[2 * i] + "\n\nSummarize this."}]
        turn1 = conversation_ids(tok, messages)
        out1 = llm.generate([{"prompt_token_ids": turn1}], answer)[0].outputs[0]
        messages += [{"role": "assistant", "content": out1.text},
                     {"role": "user", "content": passages[2 * i + 1][:400] + "\n\nAnd this?"}]
        turn2 = conversation_ids(tok, messages)
        before = routed_tokens(llm)
        warm = llm.generate([{"prompt_token_ids": turn2}], greedy)[0].outputs[0]
        computed = routed_tokens(llm) - before
        hit = len(turn2) - computed
        # reuse stops before the first prompt's last window
        assert hit <= (len(turn1) - 1) // art.window * art.window, (hit, len(turn1))
        reused += hit > 0
        llm.reset_prefix_cache()
        cold = llm.generate([{"prompt_token_ids": turn2}], greedy)[0].outputs[0]
        kls.append(first_token_kl(warm.logprobs[0], cold.logprobs[0]))
        if dtype == "float32":
            assert warm.token_ids == cold.token_ids
        else:
            check_tokens_or_tie(warm, cold, BF16_ATOL)
        print(f"turn 2 of {len(turn2)} tokens, {len(turn2) - computed} reused (turn 1 prompt "
              f"{len(turn1)}): KL(cold || warm) {kls[-1]:.4f}, first token equal "
              f"{warm.token_ids[0] == cold.token_ids[0]}")
    shutdown(llm)
    assert reused >= 3, reused
    assert max(kls) <= NOISE_KL[dtype], kls
