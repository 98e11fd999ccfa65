"""The four router factors of FTP, defined exactly in docs/ROUTER.md.

All functions take flattened token batches (a TokenLayout) so the same code serves the
reference forward ([1 request]) and a vLLM step (many requests back to back).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ftp_vllm.routing.layout import TokenLayout

NUM_FACTORS = 4
SCORE_CLAMP = 20.0


def attention_scores(q: Tensor, k: Tensor, layout: TokenLayout, scale: float) -> Tensor:
    """Attention each token receives from its prompt's last token, averaged over heads.

    q: [T, H, D] and k: [T, Hkv, D], after rotary embedding. Cost is linear in T: one query
    per request against that request's keys. Returns [T] float32; each request's scores sum
    to 1.
    """
    num_heads, num_kv = q.shape[1], k.shape[1]
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv} kv heads")
    q_last = q[layout.last_index].float()  # [R, H, D]
    k = k.float().repeat_interleave(num_heads // num_kv, dim=1)  # [T, H, D]
    logits = (q_last[layout.seq_ids] * k).sum(-1) * scale  # [T, H]
    seg = layout.seq_ids.unsqueeze(1).expand_as(logits)
    seg_max = torch.full((layout.num_seqs, num_heads), -torch.inf, device=q.device)
    seg_max = seg_max.scatter_reduce(0, seg, logits, reduce="amax", include_self=True)
    e = torch.exp(logits - seg_max[layout.seq_ids])
    denom = torch.zeros((layout.num_seqs, num_heads), device=q.device).index_add_(
        0, layout.seq_ids, e
    )
    return (e / denom[layout.seq_ids]).mean(dim=1)


def descending_rank(values: Tensor, layout: TokenLayout) -> Tensor:
    """Rank of each value within its request, 0 for the largest; ties go to the earlier token."""
    order = torch.argsort(-values, stable=True)
    order = order[torch.argsort(layout.seq_ids[order], stable=True)]
    rank = torch.empty_like(layout.positions)
    rank[order] = torch.arange(layout.num_tokens, device=values.device)
    return rank - layout.starts[layout.seq_ids]


def router_factors(scores: Tensor, layout: TokenLayout, block_sparsity: Tensor) -> Tensor:
    """[T, 4] float32: relative position, log-normalised score, relative rank, block sparsity."""
    denom = (layout.token_lengths - 1).clamp(min=1).float()
    position = layout.positions.float() / denom
    n = layout.token_lengths.float()
    score = torch.log(scores.float() * n).clamp(-SCORE_CLAMP, SCORE_CLAMP)
    rank = descending_rank(scores, layout).float() / denom
    return torch.stack([position, score, rank, block_sparsity.float()], dim=1)
