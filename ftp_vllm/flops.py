"""FLOP model of a routed prefill: what a skipped token saves, and the dense/routed ratio.

A kept token pays for its q/k/v projections, attention over its causal context, o_proj and
the MLP. A skipped token still pays for its k/v projections (KV consistency) and, with a skip
update of rank r (``routing.skip_update``), its two rank-r matrix products; nothing else.
Norms, rotary embeddings and the router are ignored (well under 1% of the model's work).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class BlockShape:
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    skip_rank: int = 0  # rank of the skip update (0: none)

    @classmethod
    def from_config(cls, cfg, skip_rank: int = 0) -> BlockShape:
        heads = cfg.num_attention_heads
        return cls(
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            skip_rank=skip_rank,
        )

    @property
    def skip_update_flops(self) -> int:
        """Per skipped token: the skip update's hidden -> rank -> hidden products."""
        return 4 * self.hidden * self.skip_rank

    @property
    def kv_flops(self) -> int:
        return 2 * self.hidden * 2 * self.num_kv_heads * self.head_dim

    @property
    def kept_fixed_flops(self) -> int:
        """Per kept token, everything but attention over the context and the K/V projection."""
        q = 2 * self.hidden * self.num_heads * self.head_dim
        o = 2 * self.num_heads * self.head_dim * self.hidden
        mlp = 3 * 2 * self.hidden * self.intermediate
        return q + o + mlp

    def kept_token_flops(self, positions):
        """FLOPs of one kept token at each of `positions` (numpy or torch float64 array):
        the fixed part plus QK^T and PV over its causal context (position + 1 keys)."""
        return self.kept_fixed_flops + 4.0 * (positions + 1) * self.num_heads * self.head_dim


def prefill_flops(shape: BlockShape, keep: Tensor, positions: Tensor) -> float:
    """FLOPs of routed prefill for keep [L, T] (bool) and each token's position [T]."""
    num_layers, num_tokens = keep.shape
    per_kept = shape.kept_token_flops(positions.double())  # [T]
    skipped = keep.numel() - int(keep.sum())
    return float(num_layers * num_tokens * shape.kv_flops + (keep.double() * per_kept).sum()
                 + skipped * shape.skip_update_flops)
