"""Window routing (docs/ROUTER.md): decisions per aligned window of prompt positions.

The point of the design is causality: a window's decisions depend only on the window and what
precedes it, so a chunk or a prefix-cache hit that ends on a window boundary sees the same
decisions as the whole prompt. These tests check the layout, the per-window top-k, the
length-invariant skip count, and causality through the reference forward on a tiny model;
then (slow, CPU engine) that a prefix-cache hit gives what a cold run gives.
"""

from __future__ import annotations

import pytest
import torch

from ftp_vllm.reference import greedy_generate, routed_forward, token_sparsity
from ftp_vllm.routing.layout import TokenLayout
from ftp_vllm.routing.router import (
    DenseRouter,
    MaskRouter,
    RandomRouter,
    RouterInputs,
    StaticRouter,
    TokenRouter,
    window_skip_counts,
)
from tests.tiny_models import scored_mlp_router, tiny_model

W = 8  # window of the tiny-model tests


# ---------------------------------------------------------------- layout


def test_windows_cut_whole_prompts_at_multiples_of_the_window():
    lay = TokenLayout.windows([19, 3, 8], W)
    assert lay.windowed
    assert lay.lengths.tolist() == [8, 8, 3, 3, 8]
    assert lay.offsets.tolist() == [0, 8, 16, 0, 0]
    assert lay.prompt_lengths.tolist() == [19, 19, 19, 3, 8]
    assert lay.starts.tolist() == [0, 8, 16, 19, 22]
    assert lay.last_index.tolist() == [7, 15, 18, 21, 29]
    assert lay.positions[:19].tolist() == list(range(8)) * 2 + [0, 1, 2]
    assert lay.prompt_positions.tolist() == list(range(19)) + [0, 1, 2] + list(range(8))
    # protected: each prompt's first and last token, never a window's own edges
    assert lay.protected.nonzero().squeeze(1).tolist() == [0, 18, 19, 21, 22, 29]


def test_spans_starting_mid_window_begin_with_a_short_unit():
    lay = TokenLayout.from_spans([5, 0], [30, 9], [40, 9], W)
    assert lay.lengths.tolist() == [3, 8, 8, 6, 8, 1]
    assert lay.offsets.tolist() == [5, 8, 16, 24, 0, 8]
    assert lay.prompt_lengths.tolist() == [40] * 4 + [9, 9]
    assert lay.seq_ids.tolist() == [0] * 3 + [1] * 8 + [2] * 8 + [3] * 6 + [4] * 8 + [5]
    assert lay.prompt_positions.tolist() == list(range(5, 30)) + list(range(9))
    # the 40-token prompt's first and last token are not in its span: nothing protected
    assert lay.protected.nonzero().squeeze(1).tolist() == [25, 33]


def test_a_span_ending_a_prompt_protects_only_its_last_token():
    lay = TokenLayout.from_spans([16], [21], [21], W)
    assert lay.lengths.tolist() == [5] and lay.offsets.tolist() == [16]
    assert lay.protected.tolist() == [False] * 4 + [True]


def test_two_prompts_in_the_same_window_index_are_separate_units():
    lay = TokenLayout.from_spans([3, 0], [5, 4], [5, 4], W)
    assert lay.lengths.tolist() == [2, 4] and lay.offsets.tolist() == [3, 0]
    assert lay.protected.tolist() == [False, True, True, False, False, True]


def test_exact_layout_is_one_unit_per_prompt():
    lay = TokenLayout.from_lengths([19, 3])
    assert not lay.windowed
    assert lay.lengths.tolist() == [19, 3] and lay.offsets.tolist() == [0, 0]
    assert lay.prompt_lengths.tolist() == [19, 3]
    assert lay.protected.nonzero().squeeze(1).tolist() == [0, 18, 19, 21]


@pytest.mark.parametrize("window", [0, -1])
def test_bad_window_is_refused(window):
    with pytest.raises(ValueError, match="window must be a positive number"):
        TokenLayout.from_spans([0], [4], [4], window)
    with pytest.raises(ValueError, match="window must be a positive number"):
        TokenLayout.windows([4], window)


@pytest.mark.parametrize(
    "starts, ends, prompts",
    [([-1], [3], [4]), ([2], [2], [4]), ([3], [2], [4]), ([0], [5], [4]), ([0, 1], [2, 1], [3, 3])],
)
def test_bad_spans_are_refused(starts, ends, prompts):
    with pytest.raises(ValueError, match="spans .* must be non-empty and lie in prompts"):
        TokenLayout.from_spans(starts, ends, prompts, W)


# ---------------------------------------------------------------- router


class ScoreRouter(TokenRouter):
    """Ranks by a fixed score per prompt position (the test decides what the router wants)."""

    def __init__(self, by_position: torch.Tensor):
        self.by_position = by_position

    def score(self, inputs: RouterInputs) -> torch.Tensor:
        return self.by_position[inputs.layout.prompt_positions]


def _inputs(layout: TokenLayout, s) -> RouterInputs:
    bs = torch.as_tensor(s, dtype=torch.float64)
    bs = bs.expand(layout.num_tokens) if bs.ndim == 0 else bs
    return RouterInputs(layer=0, layout=layout, block_sparsity=bs)


def test_window_skip_count_is_the_rounded_difference_of_prompt_positions():
    lay = TokenLayout.windows([19], W)
    counts = window_skip_counts(_inputs(lay, 0.3))
    # round(0.3 * 8) - 0, round(0.3 * 16) - round(0.3 * 8), round(0.3 * 19) - round(0.3 * 16)
    assert counts.tolist() == [2, 3, 1]
    assert int(counts.sum()) == round(0.3 * 19)


def test_window_skip_counts_do_not_depend_on_how_a_prompt_is_split():
    whole = window_skip_counts(_inputs(TokenLayout.windows([300], 16), 0.37))
    parts = window_skip_counts(_inputs(
        TokenLayout.from_spans([0, 64, 160], [64, 160, 300], [300] * 3, 16), 0.37))
    assert torch.equal(whole, parts)


def test_window_skip_count_never_exceeds_the_tokens_that_may_skip():
    # 2-token prompt: both protected; 3-token prompt at 0.9: one may skip
    lay = TokenLayout.windows([2, 3], W)
    assert window_skip_counts(_inputs(lay, 0.9)).tolist() == [0, 1]
    keep = StaticRouter().keep(_inputs(lay, 0.9))
    assert keep.tolist() == [True, True, True, False, True]


def test_window_top_skips_the_lowest_scores_of_each_window():
    score = torch.tensor([0.0, 5, 1, 7, 2, 9, 3, 4] + [8.0, 0, 6, 6, 6, 9, 9, 9] + [0.0, 1, 2])
    keep = ScoreRouter(score).keep(_inputs(TokenLayout.windows([19], W), 0.3))
    skipped = (~keep).nonzero().squeeze(1).tolist()
    # window 0 skips 2: the lowest unprotected (position 0 is protected) are 2 (1.0), 4 (2.0)
    # window 1 skips 3: 9 (0), then ties at 6: the earlier tokens 10, 11
    # window 2 skips 1: 16 (0); the prompt's last token 18 is protected
    assert skipped == [2, 4, 9, 10, 11, 16]


def test_windowed_decisions_ignore_the_rest_of_the_prompt():
    """A chunk's windows decide as the whole prompt's windows do, for equal scores."""
    score = torch.rand(64, generator=torch.Generator().manual_seed(0))
    router = ScoreRouter(score)
    whole = router.keep(_inputs(TokenLayout.windows([64], W), 0.4))
    chunk = router.keep(_inputs(TokenLayout.from_spans([16], [40], [64], W), 0.4))
    assert torch.equal(chunk, whole[16:40])
    assert not whole.all()


def test_zero_target_keeps_every_window_and_non_ranking_routers_decide_outright():
    lay = TokenLayout.windows([12, 10], W)
    bs = torch.tensor([0.0] * 12 + [0.5] * 10, dtype=torch.float64)
    keep = StaticRouter().keep(_inputs(lay, bs))
    assert keep[:12].all() and not keep[12:].all()
    assert DenseRouter().keep(_inputs(lay, 0.5)).all()
    masks = torch.zeros(1, 22, dtype=torch.bool)
    keep = MaskRouter(masks).keep(_inputs(lay, 0.5))
    assert keep.nonzero().squeeze(1).tolist() == [0, 11, 12, 21]  # protected only


@pytest.mark.parametrize("windowed", [True, False])
@pytest.mark.parametrize("router_cls", [StaticRouter, RandomRouter])
def test_all_blocks_at_once_equal_block_by_block(windowed, router_cls):
    # What the engine decides at plan time (keep_layers) must be what the reference decides
    # block by block (keep): spans starting mid-window, several prompts, per-token targets
    # with zeros and repeats, targets that round to a tie.
    starts, ends, prompts = [0, 5, 0], [19, 23, 2], [19, 40, 2]
    if windowed:
        lay = TokenLayout.from_spans(torch.tensor(starts), torch.tensor(ends),
                                     torch.tensor(prompts), W)
    else:
        lay = TokenLayout.from_lengths([19, 18, 2])
    gen = torch.Generator().manual_seed(3)
    per_req = torch.rand(12, 3, generator=gen) * 0.9
    per_req[2] = 0.0
    per_req[5] = per_req[4]
    per_req[7] = torch.tensor([0.25, 0.5, 0.75])
    tok_req = torch.repeat_interleave(torch.arange(3), torch.tensor([19, 18, 2]))
    bs = per_req[:, tok_req]  # [L, T]
    at_once = router_cls().keep_layers(lay, bs)
    fresh = router_cls()  # a random router draws the same sequence again
    one_by_one = torch.stack([
        fresh.keep(RouterInputs(layer=i, layout=lay, block_sparsity=bs[i]))
        for i in range(len(bs))])
    assert at_once.dtype == torch.bool and at_once.shape == bs.shape
    assert torch.equal(at_once, one_by_one)
    assert (~at_once).any()  # something skipped: the comparison is not all-kept vs all-kept


def test_routers_that_read_scores_do_not_decide_all_blocks_at_once():
    lay = TokenLayout.windows([19], W)
    with pytest.raises(ValueError, match="attention scores"):
        scored_mlp_router().keep_layers(lay, torch.full((2, 19), 0.3))


@pytest.mark.parametrize("s", [0.22, 0.3, 0.4])
def test_realized_sparsity_is_the_target_at_every_length(s):
    """Issue 10, item 4: within 0.02 of the target on prompts of 64 to 2048 tokens."""
    lengths = [64, 256, 1024, 2048]
    lay = TokenLayout.windows(lengths, 128)
    for router in (RandomRouter(seed=0), StaticRouter()):
        keep = router.keep(_inputs(lay, s))
        start = 0
        for n in lengths:
            realized = 1.0 - keep[start:start + n].float().mean().item()
            assert abs(realized - s) <= 0.02, (type(router).__name__, n, realized)
            assert int((~keep[start:start + n]).sum()) == round(s * n)
            start += n


# ---------------------------------------------------------------- reference forward


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def router():
    return scored_mlp_router()


BLOCKS = torch.tensor([0.2, 0.35, 0.4, 0.3], dtype=torch.float64)


def _ids(n, seed=0):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("n_prompt", [29, 43, 57])
def test_a_prompt_decides_its_windows_as_any_longer_prompt_does(model, router, n_prompt):
    """P and P+Q: every complete window of P is decided alike, and its tokens' logits agree
    (the only difference is float summation order over different lengths)."""
    ids = _ids(61)
    short = routed_forward(model, ids[:n_prompt], None, router, BLOCKS, window=W)
    long = routed_forward(model, ids, None, router, BLOCKS, window=W)
    c = n_prompt // W * W  # complete windows; P's last token lies after them
    assert torch.equal(short.keep[:, :c], long.keep[:, :c])
    torch.testing.assert_close(short.logits[:c], long.logits[:c], rtol=0, atol=1e-5)
    assert 0.2 < token_sparsity(long.keep) < 0.45  # the router does skip
    assert not long.keep[:, 1:c].all()


@torch.no_grad()
def test_exact_routing_decides_a_prefix_differently_in_a_longer_prompt(model, router):
    """Why exact routing needs whole prompts: its decisions over P change when Q follows."""
    ids = _ids(61)
    short = routed_forward(model, ids[:29], None, router, BLOCKS)
    long = routed_forward(model, ids, None, router, BLOCKS)
    assert not torch.equal(short.keep[:, :24], long.keep[:, :24])
    assert not torch.allclose(short.logits[:24], long.logits[:24], atol=1e-3)


@torch.no_grad()
def test_window_holding_the_prompts_last_token_is_decided_for_that_prompt(model, router):
    """The one exception to causality: a prompt's last token is always kept, so a window
    holding it is decided differently when the prompt goes on (32 = 4 windows of 8)."""
    ids = _ids(61)
    short = routed_forward(model, ids[:32], None, router, BLOCKS, window=W)
    long = routed_forward(model, ids, None, router, BLOCKS, window=W)
    assert torch.equal(short.keep[:, :24], long.keep[:, :24])
    assert short.keep[:, 31].all() and not long.keep[:, 31].all()


@torch.no_grad()
def test_flattened_prompts_with_own_targets_equal_one_by_one(model, router):
    seqs = [_ids(n, seed=n) for n in (21, 2, 40)]
    targets = torch.stack([BLOCKS, BLOCKS * 0.5, BLOCKS.flip(0)])  # [R, L]
    flat = routed_forward(model, torch.cat(seqs), [21, 2, 40], router, targets, window=W)
    start = 0
    for s, t in zip(seqs, targets, strict=True):
        one = routed_forward(model, s, None, router, t, window=W)
        assert torch.equal(flat.keep[:, start:start + len(s)], one.keep)
        torch.testing.assert_close(flat.logits[start:start + len(s)], one.logits,
                                   rtol=0, atol=1e-5)
        start += len(s)
    assert flat.layout.windowed and flat.layout.lengths.tolist() == [8, 8, 5, 2, 8, 8, 8, 8, 8]


@torch.no_grad()
def test_greedy_generation_routes_the_prompt_in_windows(model, router):
    prompt = _ids(27)
    res = greedy_generate(model, prompt, 4, router, BLOCKS, window=W)
    own = routed_forward(model, prompt, None, router, BLOCKS, window=W)
    assert torch.equal(res.keep, own.keep)
    exact = routed_forward(model, prompt, None, router, BLOCKS)
    assert not torch.equal(res.keep, exact.keep)
    full = torch.cat([prompt, torch.tensor(res.tokens[:-1])])
    out = routed_forward(model, full, None, router, BLOCKS, routed_lengths=[27], window=W)
    assert out.logits[26:].argmax(-1).tolist() == res.tokens


# ---------------------------------------------------------------- engine: warm == cold



@pytest.fixture(scope="module")
def window_llm(tmp_path_factory, tiny_llama_dir):
    pytest.importorskip("vllm")
    from vllm import LLM

    from ftp_vllm.artifact import folder_fingerprint, load_artifact
    from ftp_vllm.plugin import routing_overrides
    from tests.engine_helpers import engine_kwargs, shutdown
    from tests.tiny_models import make_artifact

    fp, hf = folder_fingerprint(tiny_llama_dir)
    path = make_artifact(tmp_path_factory.mktemp("art") / "mlp-window", fp, kind="mlp",
                         window=16)
    llm = LLM(str(tiny_llama_dir), hf_overrides=routing_overrides(path, 0.3),
              enable_chunked_prefill=True, enable_prefix_caching=True, **engine_kwargs())
    yield llm, hf, load_artifact(path)
    shutdown(llm)


def _first_logprobs(llm, prompt, warm_with=None, max_tokens=1):
    """Top-5 log-probabilities of the first generated token: from a cold cache, or after
    `warm_with` ran (its prompt and generated tokens cached)."""
    from vllm import SamplingParams

    def sampling(n, logprobs=None):
        return SamplingParams(max_tokens=n, temperature=0.0, logprobs=logprobs,
                              detokenize=False, extra_args={"ftp_sparsity": 0.3},
                              ignore_eos=True)

    llm.reset_prefix_cache()
    if warm_with is not None:
        llm.generate([{"prompt_token_ids": warm_with}], sampling(max_tokens), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": prompt}], sampling(1, 5), use_tqdm=False)[0]
    assert (out.num_cached_tokens > 0) == (warm_with is not None)  # a hit only when warm
    return {k: v.logprob for k, v in out.outputs[0].logprobs[0].items()}


def _hit_unit(llm, window=16):
    import math

    return math.lcm(window, int(llm.llm_engine.vllm_config.cache_config.block_size))


@pytest.mark.slow
@pytest.mark.vllm
def test_a_hit_of_interior_windows_equals_a_cold_run(window_llm):
    """P's length is no multiple of the hit unit: the hit stops at a window boundary before
    P's last token, so the cached blocks hold only interior windows: bit-exact."""
    from tests.engine_helpers import random_prompt

    llm, _, _ = window_llm
    prompt = random_prompt(_hit_unit(llm) + 8, seed=3)
    longer = prompt + random_prompt(40, seed=4)
    assert _first_logprobs(llm, longer, warm_with=prompt) == _first_logprobs(llm, longer)


@pytest.mark.slow
@pytest.mark.vllm
def test_a_hit_ending_on_a_cached_prompts_last_window_equals_a_cold_run(window_llm):
    """P fills two whole hit units; P+Q could reuse all of P, including the window where P's
    last token was protected (picked so that cold P+Q decides that window otherwise): the
    scheduler keys the block holding P's last window to P's end, so P+Q reuses only the
    first unit and computes the rest as its own windows."""
    from tests.engine_helpers import random_prompt

    llm, hf, art = window_llm
    blocks = art.schedule.blocks(0.3)
    n = 2 * _hit_unit(llm)
    for seed in range(20):
        prompt = random_prompt(n, seed=seed)
        longer = prompt + random_prompt(40, seed=100 + seed)
        with torch.no_grad():
            alone = routed_forward(hf, torch.tensor(prompt), None, art.router, blocks,
                                   window=art.window).keep
            within = routed_forward(hf, torch.tensor(longer), None, art.router, blocks,
                                    window=art.window).keep[:, :n]
        if not torch.equal(alone, within):
            break
    else:
        pytest.fail("no prompt among 20 whose last window is decided otherwise")
    assert _first_logprobs(llm, longer, warm_with=prompt) == _first_logprobs(llm, longer)


@pytest.mark.slow
@pytest.mark.vllm
def test_a_second_chat_turn_equals_a_cold_run(window_llm):
    """Turn 2 resends turn 1's prompt and reply: the cached block holding the end of the
    prompt and the start of the reply (computed as decode, dense) must not be reused."""
    from vllm import SamplingParams

    from tests.engine_helpers import random_prompt

    llm, _, _ = window_llm
    n = 2 * _hit_unit(llm)
    prompt = random_prompt(n - 28, seed=5)
    gen = SamplingParams(max_tokens=60, temperature=0.0, detokenize=False,
                         extra_args={"ftp_sparsity": 0.3}, ignore_eos=True)
    reply = llm.generate([{"prompt_token_ids": prompt}], gen, use_tqdm=False)[0]
    turn2 = prompt + list(reply.outputs[0].token_ids) + random_prompt(30, seed=6)
    assert _first_logprobs(llm, turn2, warm_with=prompt, max_tokens=60) == \
        _first_logprobs(llm, turn2)
