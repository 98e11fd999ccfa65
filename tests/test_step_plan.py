"""Subset attention bookkeeping (no engine): virtual requests, build limits, metadata reuse."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ftp_vllm.plugin.runtime import padded_rows
from ftp_vllm.plugin.subset import (
    MetadataCache,
    backend_policy,
    kept_runs,
    split_runs,
)


def step(lengths, computed=None):
    """tok_req, tok_pos of a step whose requests have these query lengths."""
    computed = computed or [0] * len(lengths)
    tok_req = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tok_pos = np.array(computed)[tok_req] + np.arange(sum(lengths)) - starts[tok_req]
    return tok_req, tok_pos


def test_runs_break_at_skips_and_at_request_boundaries():
    tok_req, tok_pos = step([5, 3], computed=[0, 10])  # request 1 decodes past 10 tokens
    keep = np.array([1, 1, 0, 1, 1, 1, 1, 1], dtype=bool)
    runs = kept_runs(keep, tok_req, tok_pos)
    assert runs.kept.tolist() == [0, 1, 3, 4, 5, 6, 7]
    assert runs.run_len.tolist() == [2, 2, 3]  # tokens 3-4 | 5-7 split by the request edge
    assert runs.run_req.tolist() == [0, 0, 1]
    assert runs.run_seq.tolist() == [2, 5, 13]  # keys up to each run's last position


def test_no_kept_token_makes_no_run():
    """A step of middle chunks at a block that skips all it may keeps nothing there."""
    tok_req, tok_pos = step([5, 3], computed=[20, 40])
    runs = kept_runs(np.zeros(8, dtype=bool), tok_req, tok_pos)
    assert runs.num_runs == 0 and runs.kept.size == 0
    assert split_runs(runs.num_runs, None) == []  # no attention call, no metadata build


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 600])
def test_padded_rows_round_up_to_the_bucket_and_keep_the_real_rows(n):
    """A routed layer's GEMMs see a multiple of the row bucket (one oneDNN primitive per
    bucket, not per kept count): the real rows first, then repeats of the last one."""
    idx = np.sort(np.random.default_rng(n).choice(2 * n + 1, size=n, replace=False))
    real, rows = padded_rows(idx, 16, "cpu")
    assert real.tolist() == idx.tolist()
    assert rows.numel() % 16 == 0 and rows.numel() - n < 16
    if n:
        assert rows[n:].tolist() == [idx[-1]] * (rows.numel() - n)
    else:
        assert rows.numel() == 0
    assert real.data_ptr() == rows.data_ptr()  # a view: one host copy per route
    _, unpadded = padded_rows(idx, 1, "cpu")
    assert unpadded.numel() == n


def test_split_runs_bounds_every_group():
    assert split_runs(7, None) == [(0, 7)]
    assert split_runs(7, 7) == [(0, 7)]
    assert split_runs(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert split_runs(0, 3) == []
    with pytest.raises(ValueError, match="at least one"):
        split_runs(5, 0)


def test_split_groups_cover_the_kept_tokens_in_order():
    rng = np.random.default_rng(0)
    tok_req, tok_pos = step([40, 1, 57, 30])
    keep = rng.random(len(tok_req)) < 0.6
    runs = kept_runs(keep, tok_req, tok_pos)
    assert runs.num_runs > 10  # scattered: many virtual requests
    covered = []
    for lo, hi in split_runs(runs.num_runs, 4):
        assert hi - lo <= 4
        start = runs.run_start[lo]
        end = runs.run_start[hi] if hi < runs.num_runs else len(runs.kept)
        assert end - start == runs.run_len[lo:hi].sum()
        covered.extend(runs.kept[start:end].tolist())
    assert covered == runs.kept.tolist()


class Builds:
    def __init__(self):
        self.made = []

    def __call__(self, key):
        def build():
            self.made.append(key)
            return {"plan": key, "n": len(self.made)}

        return build


@pytest.mark.parametrize("reusable", [True, False])
def test_cache_reuses_equal_consecutive_masks(reusable):
    cache, builds = MetadataCache(reusable), Builds()
    first = cache.get("A", builds("A"))
    assert cache.get("A", builds("A")) is first
    assert builds.made == ["A"] and cache.builds == 1


def test_stateful_backend_rebuilds_a_b_a():
    """FlashInfer re-plans its one wrapper per build: A's metadata is stale after B."""
    cache, builds = MetadataCache(reusable=False), Builds()
    a1 = cache.get("A", builds("A"))
    cache.get("B", builds("B"))
    a2 = cache.get("A", builds("A"))
    assert builds.made == ["A", "B", "A"] and a2 is not a1 and cache.builds == 3


def test_stateless_backend_reuses_a_b_a():
    cache, builds = MetadataCache(reusable=True), Builds()
    a1 = cache.get("A", builds("A"))
    cache.get("B", builds("B"))
    assert cache.get("A", builds("A")) is a1
    assert builds.made == ["A", "B"] and cache.builds == 2


def test_split_parts_of_one_mask_rebuild_on_a_stateful_backend():
    """Two layers with mask A split in two parts: (A,0) (A,1) (A,0) (A,1) -> 4 builds."""
    cache, builds = MetadataCache(reusable=False), Builds()
    for _ in range(2):
        for part in (("A", 0), ("A", 1)):
            assert cache.get(part, builds(part))["plan"] == part
    assert cache.builds == 4


def buf(n):
    return torch.zeros(n, dtype=torch.int32)


def test_backend_policies_follow_the_builders():
    # Attribute names as in vLLM 0.32's builders (vllm/v1/attention/backends/).
    fi = backend_policy("FLASHINFER", SimpleNamespace(max_num_reqs=128), 256)
    assert fi.max_requests == 128 and not fi.reusable
    assert backend_policy("CPU_ATTN", SimpleNamespace(), 16).max_requests is None
    assert backend_policy("CPU_ATTN", SimpleNamespace(), 16).reusable
    eager_fa = SimpleNamespace(scheduler_metadata=None, _dcp_context_kv_lens=None)
    assert backend_policy("FLASH_ATTN", eager_fa, 16).max_requests is None
    assert backend_policy("FLASH_ATTN", eager_fa, 16).reusable
    graph_fa = SimpleNamespace(scheduler_metadata=buf(1 + 4 * 64))  # full CUDA graphs + FA3
    pol = backend_policy("FLASH_ATTN", graph_fa, 16)
    assert pol.max_requests == 64 and not pol.reusable
    triton = SimpleNamespace(persistent_rswa_prefix_lens=None)
    assert backend_policy("TRITON_ATTN", triton, 16).max_requests is None
    assert backend_policy("TRITON_ATTN", triton, 16).reusable
    rswa = backend_policy("TRITON_ATTN", SimpleNamespace(persistent_rswa_prefix_lens=buf(8)), 8)
    assert rswa.max_requests == 8 and not rswa.reusable
    other = backend_policy("SOMETHING_NEW", SimpleNamespace(), 32)
    assert other.max_requests == 32 and not other.reusable


def test_plan_tokens_routes_whole_prompts_with_a_target():
    """Three requests in one step: a whole 5-token prompt at 0.3 (routed), a decode token
    (dense), a whole prompt asking for 0 (dense)."""
    from ftp_vllm.plugin.plan import plan_tokens

    query_start = np.array([0, 5, 6, 10])
    seq_lens = np.array([5, 9, 4])  # request 1 had 8 tokens before this step
    plan = plan_tokens(query_start, seq_lens, num_prompt=np.array([5, 3, 4]),
                       targets=np.array([0.3, 0.3, 0.0]))
    assert plan.routed_reqs.tolist() == [0] and plan.routed_lens.tolist() == [5]
    assert plan.routed_starts.tolist() == [0] and plan.routed_prompt.tolist() == [5]
    assert plan.routed_idx.tolist() == [0, 1, 2, 3, 4]
    assert plan.tok_req.tolist() == [0, 0, 0, 0, 0, 1, 2, 2, 2, 2]
    assert plan.tok_pos.tolist() == [0, 1, 2, 3, 4, 8, 0, 1, 2, 3]
    assert plan.completing.tolist() == [0, 2]  # prompts ending here, routed or not
    assert not plan.partial and plan.unaligned == 0


def test_plan_tokens_leaves_prompts_that_arrive_in_pieces_dense():
    from ftp_vllm.plugin.plan import plan_tokens

    # a 10-token prompt whose first 6 tokens were computed earlier (a chunk or a cache hit)
    plan = plan_tokens(np.array([0, 4]), np.array([10]), np.array([10]), np.array([0.4]))
    assert plan.partial and len(plan.routed_reqs) == 0 and len(plan.routed_idx) == 0
    assert plan.tok_pos.tolist() == [6, 7, 8, 9]
    assert plan.completing.tolist() == [0] and plan.unaligned == 0
    # its first chunk (6 of 10 tokens) runs dense as well, and completes nothing
    plan = plan_tokens(np.array([0, 6]), np.array([6]), np.array([10]), np.array([0.4]))
    assert plan.partial and len(plan.routed_reqs) == 0 and len(plan.completing) == 0
    # one-token prompts are never routed (the first and last token always run)
    plan = plan_tokens(np.array([0, 1]), np.array([1]), np.array([1]), np.array([0.4]))
    assert len(plan.routed_reqs) == 0


def test_stats_records_carry_per_layer_counts_that_add_up():
    """Each routed request's record has its kept/skipped pairs per layer (the server keeps
    the self-benchmark's own requests out of its per-layer counters with them)."""
    from ftp_vllm.flops import BlockShape
    from ftp_vllm.plugin.stats import RoutingStats
    from ftp_vllm.routing.layout import TokenLayout

    rng = np.random.default_rng(0)
    keeps = rng.random((3, 9)) < 0.7  # 3 layers, requests of 4 and 5 routed tokens
    plan = SimpleNamespace(
        keeps=keeps, layout=TokenLayout.from_lengths(torch.tensor([4, 5])),
        routed_req=np.array([0, 2]), routed_target=np.array([0.3, 0.4]),
        routed_lens=np.array([4, 5]), routed_prompt=np.array([4, 5]),
        prompt_pos=np.concatenate([np.arange(4), np.arange(5)]), completing=["a", "dense", "b"],
        req_ids=["a", "dense", "b"], builds=1,
    )
    stats = RoutingStats(3, BlockShape(hidden=64, intermediate=128, num_heads=4,
                                       num_kv_heads=2, head_dim=16))
    stats.record_step(plan)
    snap = stats.snapshot(drain_requests=True)
    a, b = snap["requests"]
    assert (a["request_id"], b["request_id"]) == ("a", "b")
    assert a["kept_per_layer"] == keeps[:, :4].sum(1).tolist()
    assert b["skipped_per_layer"] == (5 - keeps[:, 4:].sum(1)).tolist()
    for layer in range(3):
        assert a["kept_per_layer"][layer] + b["kept_per_layer"][layer] == \
            snap["kept_per_layer"][layer]
    assert a["token_sparsity"] == pytest.approx(1 - keeps[:, :4].mean())


WINDOW = 8


def window_plan(query_start, seq_lens, num_prompt, targets, window=WINDOW):
    from ftp_vllm.plugin.plan import plan_tokens

    return plan_tokens(np.array(query_start), np.array(seq_lens), np.array(num_prompt),
                       np.array(targets), window)


def test_window_plan_routes_whole_windows_of_a_chunk_and_counts_the_split_one():
    """A 20-token prompt's first chunk of 12 ends inside window [8, 16): tokens 8-11 run
    dense and are counted; window [0, 8) is routed."""
    plan = window_plan([0, 12], [12], [20], [0.3])
    assert plan.routed_reqs.tolist() == [0]
    assert (plan.routed_starts.tolist(), plan.routed_lens.tolist()) == ([0], [8])
    assert plan.routed_prompt.tolist() == [20] and plan.routed_idx.tolist() == list(range(8))
    assert plan.unaligned == 4 and plan.partial and len(plan.completing) == 0


def test_window_plan_routes_chunks_on_window_boundaries():
    """Two requests: chunk [8, 16) of a 20-token prompt, and the last, short window [16, 20)
    of another 20-token prompt, which completes it."""
    plan = window_plan([0, 8, 12], [16, 20], [20, 20], [0.3, 0.2])
    assert plan.routed_reqs.tolist() == [0, 1]
    assert plan.routed_starts.tolist() == [8, 16] and plan.routed_lens.tolist() == [8, 4]
    assert plan.routed_prompt.tolist() == [20, 20]
    assert plan.routed_idx.tolist() == list(range(12))
    assert plan.tok_pos.tolist() == list(range(8, 16)) + list(range(16, 20))
    assert plan.completing.tolist() == [1] and plan.unaligned == 0 and plan.partial


def test_window_plan_routes_what_follows_a_prefix_cache_hit():
    # 16 tokens of a 30-token prompt came from the cache (a window boundary): [16, 30) routed
    # (request 0 decodes one token); request 1 routes [16, 30) at step offsets 1..14
    plan = window_plan([0, 1, 15], [20, 30], [18, 30], [0.3, 0.3])
    assert plan.routed_reqs.tolist() == [1]
    assert plan.routed_starts.tolist() == [16] and plan.routed_lens.tolist() == [14]
    assert plan.routed_idx.tolist() == list(range(1, 15))
    assert plan.tok_pos.tolist() == [19] + list(range(16, 30))
    assert plan.completing.tolist() == [1] and plan.unaligned == 0


def test_window_plan_skips_to_the_next_boundary_after_a_hit_inside_a_window():
    # 13 tokens known (a hit that ends mid-window): 13-15 dense, [16, 30) routed
    plan = window_plan([0, 17], [30], [30], [0.3])
    assert plan.routed_starts.tolist() == [16] and plan.routed_lens.tolist() == [14]
    assert plan.routed_idx.tolist() == list(range(3, 17))
    assert plan.unaligned == 3


def test_window_plan_never_routes_decode_or_generated_tokens():
    # request 0: one decode token; request 1: a resumed request recomputing its 20-token
    # prompt and 5 generated tokens: only the prompt is routed
    plan = window_plan([0, 1, 26], [31, 25], [20, 20], [0.3, 0.3])
    assert plan.routed_reqs.tolist() == [1]
    assert plan.routed_starts.tolist() == [0] and plan.routed_lens.tolist() == [20]
    assert plan.routed_idx.tolist() == list(range(1, 21))
    assert plan.completing.tolist() == [1] and plan.unaligned == 0


def test_window_plan_leaves_dense_requests_and_tiny_prompts_alone():
    # target 0 (split window: not counted, it is dense anyway), a 1-token prompt
    plan = window_plan([0, 12, 13], [12, 1], [20, 1], [0.0, 0.3])
    assert len(plan.routed_reqs) == 0 and len(plan.routed_idx) == 0
    assert plan.unaligned == 0 and plan.completing.tolist() == [1]


def test_window_plan_chunk_inside_one_window_is_all_dense():
    plan = window_plan([0, 5], [12], [20], [0.3])  # tokens 7..11 straddle a boundary
    assert len(plan.routed_reqs) == 0 and plan.unaligned == 5


def test_exact_plan_routes_whole_prompts_only_whatever_the_alignment():
    from ftp_vllm.plugin.plan import plan_tokens

    chunk = plan_tokens(np.array([0, 16]), np.array([16]), np.array([20]), np.array([0.3]))
    hit = plan_tokens(np.array([0, 4]), np.array([20]), np.array([20]), np.array([0.3]))
    whole = plan_tokens(np.array([0, 20]), np.array([20]), np.array([20]), np.array([0.3]))
    assert len(chunk.routed_reqs) == 0 and len(hit.routed_reqs) == 0
    assert chunk.partial and hit.partial and chunk.unaligned == hit.unaligned == 0
    assert whole.routed_lens.tolist() == [20] and whole.routed_starts.tolist() == [0]
    assert not whole.partial


def test_stats_join_a_chunked_prompts_steps_into_one_record():
    """A 20-token prompt routed in two steps ([0, 8), then [8, 20)): one record, closed when
    its prompt completes; the recorded mask puts each step's decisions at their positions."""
    from ftp_vllm.flops import BlockShape
    from ftp_vllm.plugin.stats import RoutingStats

    rng = np.random.default_rng(1)
    keeps = rng.random((2, 20)) < 0.6
    stats = RoutingStats(2, BlockShape(hidden=64, intermediate=128, num_heads=4,
                                       num_kv_heads=2, head_dim=16))
    stats.record_masks = True

    def plan(start, end, completing):
        return SimpleNamespace(
            keeps=keeps[:, start:end], routed_req=np.array([0]), routed_target=np.array([0.3]),
            routed_lens=np.array([end - start]), routed_prompt=np.array([20]),
            prompt_pos=np.arange(start, end), completing=completing, req_ids=["a"], builds=1,
        )

    stats.record_step(plan(0, 8, []))
    assert stats.snapshot(drain_requests=True)["requests"] == [] and "a" not in stats.masks
    stats.record_step(plan(8, 20, ["a"]))
    (rec,) = stats.snapshot(drain_requests=True)["requests"]
    assert rec["prompt_tokens"] == 20 and rec["kept_per_layer"] == keeps.sum(1).tolist()
    assert rec["token_sparsity"] == pytest.approx(1 - keeps.mean())
    assert np.array_equal(stats.masks["a"], keeps)


def test_split_windows_route_every_prompt_token_decided_by_whole_windows():
    """Position-only routers: a chunk [5, 13) of a 20-token prompt is routed in full, decided
    by the windows [0, 8) and [8, 16) it touches; the last chunk [13, 20) by [8, 20)."""
    from ftp_vllm.plugin.plan import plan_tokens

    mid = plan_tokens(np.array([0, 8]), np.array([13]), np.array([20]), np.array([0.3]),
                      WINDOW, split_windows=True)
    assert (mid.routed_starts.tolist(), mid.routed_lens.tolist()) == ([5], [8])
    assert (mid.decide_starts.tolist(), mid.decide_ends.tolist()) == ([0], [16])
    assert mid.unaligned == 0 and mid.routed_idx.tolist() == list(range(8))
    last = plan_tokens(np.array([0, 7]), np.array([20]), np.array([20]), np.array([0.3]),
                       WINDOW, split_windows=True)
    assert (last.decide_starts.tolist(), last.decide_ends.tolist()) == ([8], [20])
    assert last.completing.tolist() == [0]


@pytest.mark.parametrize("bounds", [(0, 5, 13, 20), (0, 1, 2, 19, 20), (0, 8, 16, 20),
                                    (0, 20), (3, 11, 20)])
def test_split_window_decisions_equal_the_whole_prompt_decisions(bounds):
    """The static router's keep masks for chunks that end anywhere (the first bound > 0: a
    prefix-cache hit) equal the whole prompt's masks over the same tokens, at every block;
    two requests share each step so their columns must not mix."""
    import torch

    from ftp_vllm.plugin.plan import plan_tokens
    from ftp_vllm.plugin.runtime import step_decisions
    from ftp_vllm.routing.layout import TokenLayout
    from ftp_vllm.routing.router import StaticRouter

    router, n = StaticRouter(), bounds[-1]
    blocks = [torch.tensor([0.1, 0.3, 0.45, 0.6], dtype=torch.float64),
              torch.tensor([0.2, 0.2, 0.5, 0.05], dtype=torch.float64)]
    whole = [router.keep_layers(TokenLayout.windows([n], WINDOW),
                                b[:, None].expand(-1, n).contiguous()).numpy() for b in blocks]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        q = b - a  # two requests, same prompt length, same chunk: ids 0 and 1
        tokens = plan_tokens(np.array([0, q, 2 * q]), np.array([b, b]), np.array([n, n]),
                             np.array([0.3, 0.3]), WINDOW, split_windows=True)
        _layout, _targets, keeps, decided = step_decisions(router, tokens, blocks, WINDOW)
        assert decided and keeps.shape == (4, 2 * q)
        assert np.array_equal(keeps[:, :q], whole[0][:, a:b]), (a, b)
        assert np.array_equal(keeps[:, q:], whole[1][:, a:b]), (a, b)
