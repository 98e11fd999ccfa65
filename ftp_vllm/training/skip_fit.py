"""Fit a skip update (``routing.skip_update``) to the dense model's own block updates.

For every block l, over the tokens of calibration text run dense: x = the block's input-normed
hidden state, d = the block's output minus its input. A ridge regression d ~ x W + b, then
reduced-rank regression: W is projected onto the r directions of its fitted values with the
most variance (the best rank-r predictor under the same ridge), W_r = W V V^T with V [H, r],
stored as down = W V, up = V^T, and b refit for the means. Only sufficient statistics are
accumulated (H x H per block), so the text's length costs time, not memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ftp_vllm.routing.skip_update import SkipUpdate


class _Moments:
    """Running sums of x, d, x x^T and x d^T over tokens, in float64."""

    def __init__(self, hidden: int):
        self.n = 0
        self.sx = torch.zeros(hidden, dtype=torch.float64)
        self.sd = torch.zeros(hidden, dtype=torch.float64)
        self.sxx = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.sxd = torch.zeros(hidden, hidden, dtype=torch.float64)

    def add(self, x: Tensor, d: Tensor) -> None:
        x, d = x.double().cpu(), d.double().cpu()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sd += d.sum(0)
        self.sxx += x.T @ x
        self.sxd += x.T @ d


@torch.no_grad()
def block_moments(model: torch.nn.Module, sequences: Sequence[Tensor],
                  progress: Callable[[int], None] | None = None) -> list[_Moments]:
    """Per-block moments of (input-normed state, block update) over the sequences' tokens,
    from the dense model; each sequence's first token is left out (its attention-sink state
    is unlike any other token's, and the router never skips it)."""
    inner = model.model
    stats = [_Moments(model.config.hidden_size) for _ in inner.layers]
    captured: dict[int, Tensor] = {}
    hooks = []
    for i, layer in enumerate(inner.layers):
        hooks.append(layer.input_layernorm.register_forward_hook(
            lambda _m, _inp, out, i=i: captured.__setitem__(i, out)))
        hooks.append(layer.register_forward_hook(
            lambda _m, inp, out, i=i: stats[i].add(
                captured.pop(i)[0, 1:], (_hidden(out) - _hidden(inp))[0, 1:])))
    try:
        device = next(model.parameters()).device
        for n, ids in enumerate(sequences, 1):
            model(ids.reshape(1, -1).to(device), use_cache=False)
            if progress is not None:
                progress(n)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _hidden(value: object) -> Tensor:
    """A decoder layer's hidden states, from its positional inputs or its output."""
    while isinstance(value, tuple | list):
        value = value[0]
    return value


def fit_skip_update(moments: Sequence[_Moments], rank: int, ridge: float = 1e-2) -> SkipUpdate:
    """Reduced-rank ridge regression of each block's update on its input-normed state.

    The ridge acts on the second moments of [x, 1], the constant included: the bias is
    shrunk like any weight. The inputs are RMS-normed, so one `ridge` suits every block. A
    few directions of x are nearly constant over tokens (the model's outlier features), and
    along them a free bias and the weights trade off without changing the fit to dense text;
    shrinking both kept skipped tokens' states, which drift away from dense ones, closer to
    what the blocks would have made of them (first-token KL on tune-split chat prompts at
    0.3, measured ad hoc: about half of what an unpenalized bias gave).
    """
    hidden = moments[0].sx.numel()
    if not 1 <= rank <= hidden:
        raise ValueError(f"rank must lie in [1, {hidden}] (the hidden size), got {rank}")
    down, up, bias = [], [], []
    eye = torch.eye(hidden + 1, dtype=torch.float64)
    for m in moments:
        if m.n < 2:
            raise ValueError("a skip update needs calibration tokens (got fewer than 2)")
        mx, md = m.sx / m.n, m.sd / m.n
        second = torch.empty(hidden + 1, hidden + 1, dtype=torch.float64)  # E[[x,1][x,1]^T]
        second[:hidden, :hidden] = m.sxx / m.n
        second[:hidden, hidden] = second[hidden, :hidden] = mx
        second[hidden, hidden] = 1.0
        cross = torch.cat([m.sxd / m.n, md[None]])  # E[[x,1] d^T]
        w = torch.linalg.solve(second + ridge * eye, cross)[:hidden]  # [H, H], bias dropped
        cxx = m.sxx / m.n - torch.outer(mx, mx)
        _, vecs = torch.linalg.eigh(w.T @ cxx @ w)  # covariance of the fitted updates
        v = vecs[:, -rank:]  # its top-r directions
        d = w @ v
        down.append(d)
        up.append(v.T)
        bias.append(md - mx @ d @ v.T)  # refit: the mean update is met exactly
    # rounded as stored (``SkipUpdate.state_dict``): the update in memory is the one saved
    return SkipUpdate(*(torch.stack(t).to(torch.bfloat16).float() for t in (down, up, bias)))
