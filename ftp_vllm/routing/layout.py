"""Token layout of a flattened prefill batch: requests back to back, as vLLM lays them out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenLayout:
    """Which routing unit each token belongs to and where it sits in it.

    A unit is a whole prompt (``exact`` routing: decisions depend on the whole prompt) or one
    aligned window of a prompt (``window`` routing, ``windowed``: decisions depend on the
    window and what precedes it). ``offsets`` and ``prompt_lengths`` place each unit in its
    prompt, so the always-kept first and last prompt tokens are found in either kind.
    """

    seq_ids: Tensor  # [T] int64: unit index of each token
    positions: Tensor  # [T] int64: position of each token within its unit
    starts: Tensor  # [R] int64: flattened index of each unit's first token
    lengths: Tensor  # [R] int64: tokens of each unit
    offsets: Tensor | None = None  # [R] int64: prompt position of each unit's first token
    prompt_lengths: Tensor | None = None  # [R] int64: length of each unit's prompt
    windowed: bool = False  # units are aligned windows: routers select top-k per unit

    @classmethod
    def from_lengths(cls, lengths: list[int] | Tensor, device: torch.device | str = "cpu"):
        """Whole prompts of these lengths, back to back."""
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
        if lengths.ndim != 1 or lengths.numel() == 0 or bool((lengths < 1).any()):
            raise ValueError(f"prompt lengths must be a non-empty list of positive ints: {lengths}")
        return cls._build(lengths, torch.zeros_like(lengths), lengths, windowed=False)

    @classmethod
    def from_spans(cls, starts: list[int] | Tensor, ends: list[int] | Tensor,
                   prompt_lengths: list[int] | Tensor, window: int,
                   device: torch.device | str = "cpu") -> TokenLayout:
        """Prompt tokens [start, end) of each prompt (a chunk, or what follows a prefix-cache
        hit), cut into windows aligned to multiples of ``window`` prompt positions."""
        if window < 1:
            raise ValueError(f"window must be a positive number of tokens, got {window}")
        starts = torch.as_tensor(starts, dtype=torch.long, device=device)
        ends = torch.as_tensor(ends, dtype=torch.long, device=device)
        prompt_lengths = torch.as_tensor(prompt_lengths, dtype=torch.long, device=device)
        if bool(((starts < 0) | (ends <= starts) | (ends > prompt_lengths)).any()):
            raise ValueError(f"spans [{starts.tolist()}, {ends.tolist()}) must be non-empty "
                             f"and lie in prompts of {prompt_lengths.tolist()} tokens")
        span = ends - starts
        seq = torch.repeat_interleave(torch.arange(len(span), device=device), span)
        first = torch.cumsum(span, 0) - span
        pos = starts[seq] + torch.arange(int(span.sum()), device=device) - first[seq]
        win = pos // window
        new = torch.ones_like(pos, dtype=torch.bool)
        new[1:] = (seq[1:] != seq[:-1]) | (win[1:] != win[:-1])
        unit_first = new.nonzero().squeeze(1)
        lengths = torch.diff(unit_first, append=unit_first.new_tensor([pos.numel()]))
        return cls._build(lengths, pos[unit_first], prompt_lengths[seq[unit_first]],
                          windowed=True)

    @classmethod
    def _build(cls, lengths: Tensor, offsets: Tensor, prompt_lengths: Tensor,
               windowed: bool) -> TokenLayout:
        device = lengths.device
        starts = torch.cumsum(lengths, 0) - lengths
        seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        positions = torch.arange(int(lengths.sum()), device=device) - starts[seq_ids]
        return cls(seq_ids=seq_ids, positions=positions, starts=starts, lengths=lengths,
                   offsets=offsets, prompt_lengths=prompt_lengths, windowed=windowed)

    @classmethod
    def windows(cls, lengths: list[int] | Tensor, window: int,
                device: torch.device | str = "cpu") -> TokenLayout:
        """Whole prompts of these lengths, cut into aligned windows."""
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
        return cls.from_spans(torch.zeros_like(lengths), lengths, lengths, window, device)

    @property
    def num_tokens(self) -> int:
        return self.seq_ids.numel()

    @property
    def num_seqs(self) -> int:
        return self.lengths.numel()

    @property
    def last_index(self) -> Tensor:
        """Flattened index of each unit's last token (whose query scores the unit)."""
        return self.starts + self.lengths - 1

    @property
    def token_lengths(self) -> Tensor:
        """Length of the unit each token belongs to, per token."""
        return self.lengths[self.seq_ids]

    @property
    def prompt_positions(self) -> Tensor:
        """[T] position of each token in its prompt."""
        return self.offsets[self.seq_ids] + self.positions

    @property
    def protected(self) -> Tensor:
        """Tokens no router may skip: each prompt's first and last token (invariant 4)."""
        p = self.prompt_positions
        return (p == 0) | (p == self.prompt_lengths[self.seq_ids] - 1)
