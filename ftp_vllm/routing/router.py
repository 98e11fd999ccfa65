"""Token routers: each turns one block's routing inputs into a keep mask over prompt tokens.

One interface for every decision source (learned MLP, static, random, explicit masks, dense)
so the reference forward and the vLLM layers never special-case where decisions come from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ftp_vllm.routing.factors import NUM_FACTORS, router_factors
from ftp_vllm.routing.layout import TokenLayout


@dataclass(frozen=True)
class RouterInputs:
    """What a router sees at one block."""

    layer: int
    layout: TokenLayout
    block_sparsity: Tensor  # [T] float: this block's sparsity target for each token's request
    scores: Tensor | None = None  # [T] attention scores (factors.attention_scores)


class TokenRouter:
    """Base class: `keep` applies the rules every router obeys. On whole prompts (``exact``
    routing) `_keep` is the router's own decision; on windows (``window`` routing) a router
    that `ranks` keeps the tokens its `score` ranks highest, skipping each window's count
    (`window_skip_counts`)."""

    needs_scores = False  # reads attention scores: decided layer by layer, on the device
    ranks = True  # False: the router decides outright (dense, explicit masks)
    shareable = True  # same layout and block targets -> same mask, whatever the block
    # Decisions are a function of token positions, the prompt's length and the targets only
    # (no token content, no draw): a window's tokens may then be computed over several
    # steps, each deciding its share from the whole window's positions.
    position_only = False

    def keep(self, inputs: RouterInputs) -> Tensor:
        """[T] bool keep mask. Tokens of requests whose block target is 0 are all kept, and
        each prompt's first and last token are always kept (docs/ROUTER.md)."""
        if inputs.layout.windowed and self.ranks:
            keep = window_top(self.score(inputs), inputs)
        else:
            keep = self._keep(inputs)
        return _always_kept(keep, inputs.layout, inputs.block_sparsity)

    def _keep(self, inputs: RouterInputs) -> Tensor:
        raise NotImplementedError

    def score(self, inputs: RouterInputs) -> Tensor:
        """[T] how much each token is worth computing (higher is kept first)."""
        raise NotImplementedError

    def keep_layers(self, layout: TokenLayout, block_sparsity: Tensor) -> Tensor:
        """[L, T] keep masks of every block at once, for routers that read no attention
        scores (the engine decides a step's blocks when it plans the step): ``keep`` layer by
        layer, once per distinct target row when the router is `shareable`."""
        if self.needs_scores:
            raise ValueError(f"{type(self).__name__} decides layer by layer: it reads "
                             "attention scores")
        decided: dict[bytes, Tensor] = {}
        rows = []
        for layer, row in enumerate(block_sparsity):
            key = row.cpu().numpy().tobytes() if self.shareable else None
            keep = decided.get(key) if key is not None else None
            if keep is None:
                keep = self.keep(RouterInputs(layer=layer, layout=layout, block_sparsity=row))
                if key is not None:
                    decided[key] = keep
            rows.append(keep)
        return torch.stack(rows)


def window_skip_counts(inputs: RouterInputs) -> Tensor:
    """[R] tokens each window skips: round(s * end) - round(s * start) for a window over
    prompt positions [start, end) at block target s, so a prompt's windows together skip
    round(s * n) tokens whatever its length (at most the window's tokens that may skip)."""
    return _skip_counts(inputs.layout, inputs.block_sparsity)


def _skip_counts(layout: TokenLayout, block_sparsity: Tensor) -> Tensor:
    """``window_skip_counts`` for one target row [T] ([R]) or one per block [L, T] ([L, R])."""
    s = block_sparsity.double()[..., layout.starts]
    start = layout.offsets.double()
    end = start + layout.lengths.double()
    count = torch.floor(s * end + 0.5) - torch.floor(s * start + 0.5)
    free = layout.lengths - torch.zeros_like(layout.lengths).index_add_(
        0, layout.seq_ids, layout.protected.long())
    return torch.minimum(count.long(), free)


def window_top(score: Tensor, inputs: RouterInputs) -> Tensor:
    """Keep mask that skips each window's count of its lowest-scored tokens (ties: the
    earlier token skips first); protected tokens are never among them."""
    return _window_rank(score, inputs.layout) >= window_skip_counts(inputs)[inputs.layout.seq_ids]


def _window_rank(score: Tensor, layout: TokenLayout) -> Tensor:
    """[T] each token's rank within its window by ascending score, protected tokens last."""
    score = torch.where(layout.protected, torch.full_like(score, torch.inf), score.float())
    return _segment_rank_ascending(score, layout)


def _static_skip(layout: TokenLayout, block_sparsity: Tensor) -> Tensor:
    """Tokens a whole prompt skips at its target: round(s * n), at most n - 2 ([T] or [L, T])."""
    n = layout.token_lengths
    skip = torch.floor(block_sparsity.double() * n + 0.5).long()
    return torch.minimum(skip, (n - 2).clamp(min=0))


def _always_kept(keep: Tensor, layout: TokenLayout, block_sparsity: Tensor) -> Tensor:
    """The rules every router obeys: protected tokens and requests at target 0 are kept."""
    return keep | layout.protected | (block_sparsity <= 0)


class DenseRouter(TokenRouter):
    """Keeps every token: routing off."""

    ranks = False
    position_only = True

    def _keep(self, inputs: RouterInputs) -> Tensor:
        return torch.ones_like(inputs.layout.positions, dtype=torch.bool)


class StaticRouter(TokenRouter):
    """FTP's training-free router: keep x0, then x_{n-1}, x_{n-2}, ... until the budget is met.

    With block target s, a prompt of n tokens skips round(s * n) tokens (at most n - 2):
    positions 1 .. m, the oldest tokens after the first.
    """

    position_only = True

    def _keep(self, inputs: RouterInputs) -> Tensor:
        return inputs.layout.positions > _static_skip(inputs.layout, inputs.block_sparsity)

    def score(self, inputs: RouterInputs) -> Tensor:
        return inputs.layout.positions.float()

    def keep_layers(self, layout: TokenLayout, block_sparsity: Tensor) -> Tensor:
        """All blocks in one pass: the static score ignores the block, so a window ranks its
        tokens once and each block only sets how many of the lowest-ranked skip (equal to
        ``keep`` block by block, tested)."""
        if layout.windowed:
            rank = _window_rank(layout.positions.float(), layout)
            keep = rank >= _skip_counts(layout, block_sparsity)[:, layout.seq_ids]
        else:
            keep = layout.positions > _static_skip(layout, block_sparsity)
        return _always_kept(keep, layout, block_sparsity)


class RandomRouter(TokenRouter):
    """Baseline: skips the static router's number of tokens, chosen uniformly at random."""

    shareable = False  # each block draws anew

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def _keep(self, inputs: RouterInputs) -> Tensor:
        layout = inputs.layout
        skip = _static_skip(layout, inputs.block_sparsity)
        noise = torch.rand(layout.num_tokens, generator=self.generator).to(skip.device)
        noise = torch.where(layout.protected, torch.full_like(noise, 2.0), noise)
        rank = _segment_rank_ascending(noise, layout)
        return rank >= skip

    def score(self, inputs: RouterInputs) -> Tensor:
        return torch.rand(inputs.layout.num_tokens, generator=self.generator).to(
            inputs.layout.positions.device)


def _segment_rank_ascending(values: Tensor, layout: TokenLayout) -> Tensor:
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(layout.seq_ids[order], stable=True)]
    rank = torch.empty_like(layout.positions)
    rank[order] = torch.arange(layout.num_tokens, device=values.device)
    return rank - layout.starts[layout.seq_ids]


class MaskRouter(TokenRouter):
    """Explicit decisions: masks[layer] is the keep mask of that block (tests, replays)."""

    ranks = False
    shareable = False  # one mask per block

    def __init__(self, masks: Tensor):
        self.masks = masks.bool()

    def _keep(self, inputs: RouterInputs) -> Tensor:
        mask = self.masks[inputs.layer]
        if mask.shape != inputs.layout.positions.shape:
            raise ValueError(
                f"mask for layer {inputs.layer} has shape {tuple(mask.shape)}, "
                f"the batch has {inputs.layout.num_tokens} prompt tokens"
            )
        return mask.to(inputs.layout.positions.device)


class MLPRouter(nn.Module, TokenRouter):
    """FTP's learned router: one MLP shared by all blocks over the four factors.

    Output 1 is 'compute', 0 is 'skip'; the decision is their argmax.
    """

    needs_scores = True

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(NUM_FACTORS, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def logits(self, inputs: RouterInputs) -> Tensor:
        """[T, 2] skip/compute logits (differentiable: training uses these)."""
        if inputs.scores is None:
            raise ValueError("the MLP router needs attention scores")
        factors = router_factors(inputs.scores, inputs.layout, inputs.block_sparsity)
        return self.net(factors.to(self.net[0].weight.dtype))

    @torch.no_grad()
    def _keep(self, inputs: RouterInputs) -> Tensor:
        logits = self.logits(inputs)
        return logits[:, 1] > logits[:, 0]

    @torch.no_grad()
    def score(self, inputs: RouterInputs) -> Tensor:
        logits = self.logits(inputs).float()
        return logits[:, 1] - logits[:, 0]
