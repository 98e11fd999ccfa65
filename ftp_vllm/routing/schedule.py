"""Per-block sparsity schedules: which fraction of prompt tokens each block skips."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


class SparsitySchedule:
    """Per-block targets for a few mean sparsities; any mean in between is interpolated.

    A request asking for mean sparsity S gets the blend of the two searched schedules around
    S (0 below the lowest is the all-zero schedule). Means above the highest are refused:
    the router was never tuned there.
    """

    def __init__(self, per_target: Mapping[float, list[float] | Tensor], num_layers: int):
        if not per_target:
            raise ValueError("a schedule needs at least one target sparsity")
        self.num_layers = num_layers
        self.targets = sorted(float(t) for t in per_target)
        rows = {}
        for target, blocks in per_target.items():
            blocks = torch.as_tensor(blocks, dtype=torch.float64)
            if blocks.shape != (num_layers,):
                raise ValueError(
                    f"schedule for {target} has {tuple(blocks.shape)} entries, "
                    f"the model has {num_layers} blocks"
                )
            if not 0 <= float(target) < 1:
                raise ValueError(f"schedule for {target}: a mean sparsity must lie in [0, 1)")
            if bool(((blocks < 0) | (blocks > 1)).any()):
                raise ValueError(f"schedule for {target}: block sparsities must lie in [0, 1]")
            rows[float(target)] = blocks
        self.rows = rows

    @classmethod
    def uniform(cls, targets: list[float], num_layers: int) -> SparsitySchedule:
        return cls({t: [t] * num_layers for t in targets}, num_layers)

    @property
    def max_target(self) -> float:
        return self.targets[-1]

    def validate(self, sparsity: float) -> float:
        """The sparsity as a float, or ValueError saying what is allowed."""
        try:
            sparsity = float(sparsity)
        except (TypeError, ValueError):
            raise ValueError(f"sparsity must be a number, got {sparsity!r}") from None
        if not 0.0 <= sparsity <= self.max_target + 1e-9:
            raise ValueError(
                f"sparsity {sparsity} is outside [0, {self.max_target}], "
                "the range this router artifact was tuned for"
            )
        return sparsity

    def blocks(self, sparsity: float) -> Tensor:
        """[num_layers] float64 per-block targets for a mean sparsity."""
        sparsity = self.validate(sparsity)
        if sparsity == 0.0:
            return torch.zeros(self.num_layers, dtype=torch.float64)
        lo_t, lo = 0.0, torch.zeros(self.num_layers, dtype=torch.float64)
        for t in self.targets:
            if abs(t - sparsity) < 1e-9:
                return self.rows[t].clone()
            if t > sparsity:
                w = (sparsity - lo_t) / (t - lo_t)
                return (1 - w) * lo + w * self.rows[t]
            lo_t, lo = t, self.rows[t]
        return lo.clone()

    def to_dict(self) -> dict[str, list[float]]:
        return {f"{t:g}": [round(float(x), 6) for x in self.rows[t]] for t in self.targets}
