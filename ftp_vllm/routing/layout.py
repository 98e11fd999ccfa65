"""Token layout of a flattened prefill batch: requests back to back, as vLLM lays them out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenLayout:
    """Which request each token belongs to and where it sits in that request's prompt.

    Every request's tokens are its whole prompt, in order, starting at position 0: routing
    decisions depend on the whole prompt (docs/ROUTER.md), so a layout never holds a chunk.
    """

    seq_ids: Tensor  # [T] int64: request index of each token
    positions: Tensor  # [T] int64: position of each token within its prompt
    starts: Tensor  # [R] int64: flattened index of each request's first token
    lengths: Tensor  # [R] int64: prompt length of each request

    @classmethod
    def from_lengths(cls, lengths: list[int] | Tensor, device: torch.device | str = "cpu"):
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
        if lengths.ndim != 1 or lengths.numel() == 0 or bool((lengths < 1).any()):
            raise ValueError(f"prompt lengths must be a non-empty list of positive ints: {lengths}")
        starts = torch.cumsum(lengths, 0) - lengths
        seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        positions = torch.arange(int(lengths.sum()), device=device) - starts[seq_ids]
        return cls(seq_ids=seq_ids, positions=positions, starts=starts, lengths=lengths)

    @property
    def num_tokens(self) -> int:
        return self.seq_ids.numel()

    @property
    def num_seqs(self) -> int:
        return self.lengths.numel()

    @property
    def last_index(self) -> Tensor:
        """Flattened index of each request's last prompt token."""
        return self.starts + self.lengths - 1

    @property
    def token_lengths(self) -> Tensor:
        """Prompt length of the request each token belongs to, per token."""
        return self.lengths[self.seq_ids]

    @property
    def protected(self) -> Tensor:
        """Tokens no router may skip: each prompt's first and last token (invariant 4)."""
        return (self.positions == 0) | (self.positions == self.token_lengths - 1)
