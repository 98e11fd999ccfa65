"""FTP's three router-training losses (FTP.md): guide, sparsity, distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def guide_loss(router_logits: Tensor, static_keep: Tensor) -> Tensor:
    """Cross-entropy pulling the router's [T, 2] logits toward the static router's decisions."""
    return F.cross_entropy(router_logits, static_keep.long())


def sparsity_loss(skip_prob: list[Tensor], targets: list[Tensor]) -> Tensor:
    """Sum over blocks of max(target_l - actual_l, 0): one-sided, skipping more is not punished.

    skip_prob[l]: [T] probability each routable token skips block l; targets[l]: [T] the
    block target of each token's request (the mean over tokens is the block's target).
    """
    total = skip_prob[0].new_zeros(())
    for p, t in zip(skip_prob, targets, strict=True):
        total = total + torch.clamp(t.to(p.dtype).mean() - p.mean(), min=0.0)
    return total


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(teacher || student) of next-token distributions, mean over tokens."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), dim=-1),
        F.log_softmax(teacher_logits.float(), dim=-1),
        log_target=True,
        reduction="batchmean",
    )


def guide_weight(step: int, total_steps: int, decay_fraction: float = 0.5) -> float:
    """Guide-loss weight: 1 at the start, decaying linearly to 0 over the first part of training."""
    horizon = max(1, int(total_steps * decay_fraction))
    return max(0.0, 1.0 - step / horizon)
