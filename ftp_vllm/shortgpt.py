"""ShortGPT baseline: drop whole decoder blocks by Block Influence (Men et al., 2024).

Block Influence of block l is 1 - the mean, over calibration tokens, of the cosine similarity
between the hidden state entering the block and the one leaving it:

    BI_l = 1 - mean_t cos(h_{l,t}, h_{l+1,t})

A block that barely turns its input has low influence. At a matched sparsity S the baseline
removes the k = floor(S * L + 0.5) blocks of lowest influence and runs the smaller model
dense; its token sparsity is k / L (every prompt token skips those k blocks) and its prefill
FLOPs are (L - k) / L of the dense model's (removed blocks pay no K/V either).

Influence is measured on calibration text (LAMBADA `tune` passages), never on evaluation items.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ShortGPTPlan:
    block_influence: list[float]  # [L]
    dropped: list[int]  # ascending block indices
    num_layers: int

    @property
    def k(self) -> int:
        return len(self.dropped)

    @property
    def sparsity(self) -> float:
        return self.k / self.num_layers

    def to_dict(self) -> dict:
        return {
            "block_influence": [round(b, 6) for b in self.block_influence],
            "dropped": self.dropped,
            "k": self.k,
            "num_layers": self.num_layers,
            "sparsity": self.sparsity,
        }


def num_blocks_to_drop(sparsity: float, num_layers: int) -> int:
    """k = floor(S * L + 0.5): the block count closest to the target sparsity."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    return min(int(math.floor(sparsity * num_layers + 0.5)), num_layers - 1)


def _hidden(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def block_influence(model: nn.Module, sequences: Sequence[Sequence[int]]) -> Tensor:
    """[L] float64 Block Influence of each decoder block over the tokens of `sequences`
    (token-weighted mean over all tokens of all sequences), from a dense forward."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    hooks = []

    def hook(i):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            cos = F.cosine_similarity(h_in.double(), _hidden(output).double(), dim=-1)
            sums[i] += cos.sum().item()

        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for seq in sequences:
            ids = torch.as_tensor(list(seq), dtype=torch.long, device=device)[None]
            model(input_ids=ids, use_cache=False)
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    if count == 0:
        raise ValueError("block influence needs at least one calibration token")
    return 1.0 - sums / count


def plan(influence: Tensor | Sequence[float], sparsity: float) -> ShortGPTPlan:
    """Drop the k lowest-influence blocks (ties: the later block goes first, as later blocks
    are the usual redundant ones; a stable sort on (BI, -index))."""
    bi = [float(b) for b in influence]
    k = num_blocks_to_drop(sparsity, len(bi))
    order = sorted(range(len(bi)), key=lambda i: (bi[i], -i))
    return ShortGPTPlan(block_influence=bi, dropped=sorted(order[:k]), num_layers=len(bi))


def prune(model: nn.Module, dropped: Sequence[int]) -> nn.Module:
    """A copy of `model` without the decoder blocks in `dropped` (config updated, attention
    layer indices renumbered so caches line up). The original is left untouched."""
    num_layers = len(model.model.layers)
    drop = set(dropped)
    if any(not 0 <= i < num_layers for i in drop):
        raise ValueError(f"blocks {sorted(drop)} outside 0..{num_layers - 1}")
    if len(drop) >= num_layers:
        raise ValueError("cannot drop every block")
    kept = [i for i in range(num_layers) if i not in drop]
    pruned = copy.deepcopy(model)
    pruned.model.layers = nn.ModuleList([pruned.model.layers[i] for i in kept])
    cfg = pruned.config
    cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    for new, layer in enumerate(pruned.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new
    return pruned
