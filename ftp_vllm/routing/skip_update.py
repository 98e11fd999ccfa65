"""What a skipped token carries past a block: a low-rank linear estimate of the block's update.

FTP passes a skipped token's hidden state through a block unchanged, so every later block
(and every token attending to its K/V there) sees a state that missed the block's update. Much
of that update is predictable from what the token already has: its input-normed hidden state
x, computed for every token anyway (its q/k/v need it). A skip update adds
``delta_l(x) = (x @ down_l) @ up_l + bias_l`` to a skipped token's hidden state at block l
instead of nothing, fitted on calibration text to the dense block's own update
(``training.skip_fit``). It reads only the token's own state, so decisions and K/V stay
causal (prefix caching and chunked prefill are unaffected), and it costs ``4 * hidden * rank``
FLOPs per skipped token and block (rank 64 on SmolLM2-135M: 2% of what the skip saves).
Stored in bfloat16 (the values are the definition: every engine and dtype reads the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SkipUpdate:
    down: Tensor  # [L, H, r]
    up: Tensor  # [L, r, H]
    bias: Tensor  # [L, H]

    def __post_init__(self) -> None:
        num_layers, hidden, rank = self.down.shape
        if self.up.shape != (num_layers, rank, hidden) or self.bias.shape != (num_layers, hidden):
            raise ValueError(
                f"skip update shapes do not fit together: down {tuple(self.down.shape)}, "
                f"up {tuple(self.up.shape)}, bias {tuple(self.bias.shape)} (want [L, H, r], "
                f"[L, r, H], [L, H])")

    @property
    def num_layers(self) -> int:
        return self.down.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.down.shape[1]

    @property
    def rank(self) -> int:
        return self.down.shape[2]

    def delta(self, layer: int, x: Tensor) -> Tensor:
        """The update of block `layer` for input-normed states x [N, H], in x's dtype."""
        down, up, bias = (t[layer].to(device=x.device, dtype=x.dtype)
                          for t in (self.down, self.up, self.bias))
        return torch.addmm(bias, x @ down, up)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> SkipUpdate:
        return SkipUpdate(*(t.to(device=device, dtype=dtype)
                            for t in (self.down, self.up, self.bias)))

    def state_dict(self) -> dict[str, Tensor]:
        return {name: t.to(torch.bfloat16).contiguous()
                for name, t in (("down", self.down), ("up", self.up), ("bias", self.bias))}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> SkipUpdate:
        missing = {"down", "up", "bias"} - set(state)
        if missing:
            raise ValueError(f"missing tensors {sorted(missing)}")
        return cls(state["down"].float(), state["up"].float(), state["bias"].float())


def rank_of(update: SkipUpdate | None) -> int:
    """The update's rank, 0 for none (``flops.BlockShape.skip_rank``)."""
    return 0 if update is None else update.rank
