"""The routed layers' compiled dense parts keep only shape guards: each layer's own weights
must still reach the compiled code (they are graph inputs, not constants), and a second model
of another size in the same process must get its own compiled copy, not the first one's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


class _Layer(nn.Module):
    def __init__(self, dim: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)


def _mlp_rows(layer: _Layer, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    h = layer.down(torch.nn.functional.silu(layer.up(x.index_select(0, idx))))
    return torch.zeros_like(x).index_copy_(0, idx, h)


@pytest.fixture
def compiling_vllm_config():
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.config.compilation import CompilationMode
    from vllm.config.vllm import get_cached_compilation_config

    config = VllmConfig(compilation_config=CompilationConfig(
        mode=CompilationMode.VLLM_COMPILE, backend="inductor"))
    get_cached_compilation_config.cache_clear()
    with set_current_vllm_config(config):
        yield
    get_cached_compilation_config.cache_clear()


def test_each_layer_and_each_model_gets_its_own_weights_and_shapes(compiling_vllm_config):
    from ftp_vllm.plugin.dense_parts import _compiled

    first = _compiled(_mlp_rows)
    second = _compiled(_mlp_rows)  # another model in the same process
    assert first is not _mlp_rows and second is not first
    with torch.inference_mode():
        small = [_Layer(8, seed) for seed in (0, 1, 2)]
        for n, kept in ((12, [0, 3, 4, 11]), (20, [1, 2, 5, 6, 7, 19]), (5, [4])):
            x = torch.randn(n, 8)
            idx = torch.tensor(kept)
            outs = [first(layer, x, idx) for layer in small]
            for layer, out in zip(small, outs, strict=True):
                torch.testing.assert_close(out, _mlp_rows(layer, x, idx))
            assert not torch.equal(outs[0], outs[1])  # not one layer's weights for all
        wide = _Layer(16, 3)
        x = torch.randn(10, 16)
        idx = torch.tensor([0, 2, 9])
        torch.testing.assert_close(second(wide, x, idx), _mlp_rows(wide, x, idx))
