"""Which tokens of a step are routed: plain numpy over the step's request layout.

The engine glue (``runtime.py``) reads the step's query start offsets and sequence lengths
from vLLM's attention metadata and each request's prompt length and target from the runner;
this module decides, with no vLLM or device in sight, which requests are routed this step and
where their prompt tokens sit in the step's flattened token list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TokenPlan:
    """Routed requests of one step and the step's per-token request/position maps."""

    routed_reqs: np.ndarray  # [Rr] batch index of each routed request
    routed_starts: np.ndarray  # [Rr] prompt position of each one's first routed token
    routed_lens: np.ndarray  # [Rr] prompt tokens routed for each
    routed_prompt: np.ndarray  # [Rr] prompt length of each
    routed_idx: np.ndarray  # [Tr] step token index of each routed token
    tok_req: np.ndarray  # [T] batch index of every token of the step
    tok_pos: np.ndarray  # [T] absolute position of every token in its request
    completing: np.ndarray  # [Rc] batch index of requests whose prompt ends in this step
    partial: bool  # some prompt arrived in pieces (chunked prefill or a prefix-cache hit)
    unaligned: int  # window routing: prompt tokens run dense because their window was split
    # [Rr] prompt positions [start, end) whose windows decide the routed tokens: the routed
    # tokens themselves, or, where a step holds part of a window (``split_windows``), every
    # window they touch in full
    decide_starts: np.ndarray
    decide_ends: np.ndarray

    def decided_columns(self) -> np.ndarray | None:
        """Where the routed tokens sit among the tokens of the ``decide_*`` spans (laid out
        back to back); None when the spans are the routed tokens."""
        lens = self.decide_ends - self.decide_starts
        if np.array_equal(lens, self.routed_lens):
            return None
        first = np.cumsum(lens) - lens + (self.routed_starts - self.decide_starts)
        return np.concatenate([np.zeros(0, dtype=np.int64)] + [
            np.arange(f, f + n) for f, n in zip(first, self.routed_lens, strict=True)])


def plan_tokens(query_start: np.ndarray, seq_lens: np.ndarray, num_prompt: np.ndarray,
                targets: np.ndarray, window: int | None = None,
                split_windows: bool = False) -> TokenPlan:
    """The step's routed prompt tokens, for requests whose target is above 0.

    ``exact`` routing (``window`` None): a prompt is routed only when it arrives whole in this
    step (nothing computed before, at least two tokens); pieces run dense. ``window`` routing:
    the prompt tokens of the step that fill whole aligned windows of ``window`` positions, or
    the prompt's last (possibly short) window; tokens of a window split across steps run dense
    (the engine's scheduler aligns chunks and cache hits so this does not happen), unless
    ``split_windows`` (routers whose decisions depend on positions only): then every prompt
    token of the step is routed, decided from the whole windows it belongs to
    (``decide_starts`` / ``decide_ends``).

    ``query_start`` [R+1]: offsets of each request's tokens in the step; ``seq_lens`` [R]:
    tokens of each request after the step; ``num_prompt`` [R]; ``targets`` [R] mean sparsity.
    """
    query_start = np.asarray(query_start, dtype=np.int64)
    q_lens = np.diff(query_start)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    computed = seq_lens - q_lens
    num_prompt = np.asarray(num_prompt, dtype=np.int64)
    prompt_end = np.minimum(seq_lens, num_prompt)
    in_prompt = computed < num_prompt
    partial = bool((in_prompt & ((computed > 0) | (prompt_end < num_prompt))).any())
    completing = np.flatnonzero(in_prompt & (seq_lens >= num_prompt))
    wants = (np.asarray(targets) > 0) & (num_prompt >= 2)
    unaligned = 0
    if window is None:
        ok = wants & (computed == 0) & (q_lens >= 2) & (prompt_end == num_prompt)
        start = np.zeros_like(computed)
        end = np.where(ok, num_prompt, 0)
    elif split_windows:
        ok = wants & in_prompt & (prompt_end > computed)
        start, end = np.where(ok, computed, 0), np.where(ok, prompt_end, 0)
    else:
        start = -(-computed // window) * window  # first window boundary at or after computed
        end = np.where(prompt_end == num_prompt, num_prompt, prompt_end // window * window)
        ok = wants & in_prompt & (end > start)
        start, end = np.where(ok, start, 0), np.where(ok, end, 0)
        unaligned = int(np.where(wants & in_prompt, prompt_end - computed, 0).sum()
                        - (end - start).sum())
    routed_reqs = np.flatnonzero(ok)
    routed_starts = start[routed_reqs]
    routed_lens = (end - start)[routed_reqs]
    offset = query_start[routed_reqs] + routed_starts - computed[routed_reqs]
    routed_idx = np.concatenate(
        [np.zeros(0, dtype=np.int64)]
        + [np.arange(o, o + n) for o, n in zip(offset, routed_lens, strict=True)]
    )
    num_tokens = int(query_start[-1])
    tok_req = np.repeat(np.arange(len(q_lens)), q_lens)
    tok_pos = computed[tok_req] + (np.arange(num_tokens) - query_start[tok_req])
    decide_starts, decide_ends = routed_starts, routed_starts + routed_lens
    if window is not None and split_windows:
        decide_starts = routed_starts // window * window
        decide_ends = np.minimum(-(-decide_ends // window) * window, num_prompt[routed_reqs])
    return TokenPlan(routed_reqs, routed_starts, routed_lens, num_prompt[routed_reqs],
                     routed_idx, tok_req, tok_pos, completing, partial, unaligned,
                     decide_starts, decide_ends)
