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
    routed_lens: np.ndarray  # [Rr] prompt tokens routed for each
    routed_idx: np.ndarray  # [Tr] step token index of each routed token
    tok_req: np.ndarray  # [T] batch index of every token of the step
    tok_pos: np.ndarray  # [T] absolute position of every token in its request
    partial: bool  # some prompt arrived in pieces (chunked prefill or a prefix-cache hit)


def plan_tokens(query_start: np.ndarray, seq_lens: np.ndarray, num_prompt: np.ndarray,
                targets: np.ndarray) -> TokenPlan:
    """Route a request's prompt when it arrives whole in this step (nothing computed before,
    at least two prompt tokens) and its target is above 0; everything else runs dense.

    ``query_start`` [R+1]: offsets of each request's tokens in the step; ``seq_lens`` [R]:
    tokens of each request after the step; ``num_prompt`` [R]; ``targets`` [R] mean sparsity.
    """
    query_start = np.asarray(query_start, dtype=np.int64)
    q_lens = np.diff(query_start)
    computed = np.asarray(seq_lens, dtype=np.int64) - q_lens
    num_prompt = np.asarray(num_prompt, dtype=np.int64)
    prefill = (computed == 0) & (num_prompt >= 2) & (q_lens >= 2)
    partial = bool(((computed > 0) & (computed < num_prompt)).any())
    routed_reqs = np.flatnonzero(prefill & (np.asarray(targets) > 0))
    routed_lens = np.minimum(num_prompt[routed_reqs], q_lens[routed_reqs])
    routed_idx = np.concatenate(
        [np.zeros(0, dtype=np.int64)]
        + [np.arange(query_start[r], query_start[r] + n)
           for r, n in zip(routed_reqs, routed_lens, strict=True)]
    )
    num_tokens = int(query_start[-1])
    tok_req = np.repeat(np.arange(len(q_lens)), q_lens)
    tok_pos = computed[tok_req] + (np.arange(num_tokens) - query_start[tok_req])
    return TokenPlan(routed_reqs, routed_lens, routed_idx, tok_req, tok_pos, partial)
