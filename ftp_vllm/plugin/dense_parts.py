"""The dense parts of a routed decoder layer, compiled with dynamic token counts.

A routing step cannot run vLLM's compiled model (a data-dependent number of kept tokens per
layer does not trace into its graph), but most of a routed layer is dense work on a known set
of rows: the input norm, q/k/v and RoPE of every token before the routing decision, and
o_proj, the post-attention norm, the MLP and the scatter back for the kept tokens after
attention (for every token in a block that skips none). These pieces are compiled once each
(torch.compile with the backend vLLM uses for ops it compiles outside its graph, token and
kept counts dynamic) and shared by every layer of the model: the layer is an argument, so its
weights are graph inputs, not constants. The routing decision, the gathers and the subset
attention stay eager.

With vLLM's compilation off (``--enforce-eager``) they run eager, as vLLM's own layers then do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def layer_inputs(layer: Any, positions: torch.Tensor, hidden_states: torch.Tensor,
                 residual: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input norm (fused with the residual add), q/k/v and RoPE of every token:
    (q, k, v, residual)."""
    if residual is None:
        residual = hidden_states
        hidden_states = layer.input_layernorm(hidden_states)
    else:
        hidden_states, residual = layer.input_layernorm(hidden_states, residual)
    self_attn = layer.self_attn
    qkv, _ = self_attn.qkv_proj(hidden_states)
    q, k, v = qkv.split([self_attn.q_size, self_attn.kv_size, self_attn.kv_size], dim=-1)
    if getattr(self_attn, "qk_norm", False):
        n = q.shape[0]
        q = self_attn.q_norm(q.view(n, self_attn.num_heads, self_attn.head_dim))
        k = self_attn.k_norm(k.view(n, self_attn.num_kv_heads, self_attn.head_dim))
        q, k = q.view(n, self_attn.q_size), k.view(n, self_attn.kv_size)
    q, k = self_attn.rotary_emb(positions, q, k)
    return q, k, v, residual


def all_outputs(layer: Any, attn_out: torch.Tensor, residual: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """o_proj, post-attention norm and MLP of every row (a block that skips no token)."""
    out, _ = layer.self_attn.o_proj(attn_out)
    h, residual = layer.post_attention_layernorm(out, residual)
    return layer.mlp(h), residual


def kept_outputs(layer: Any, attn_out: torch.Tensor, residual: torch.Tensor,
                 idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o_proj, post-attention norm and MLP of the kept rows `idx`, scattered back: skipped
    rows return (0, residual), so vLLM's next fused add passes them through bit-exactly."""
    out, _ = layer.self_attn.o_proj(attn_out)
    h, res_kept = layer.post_attention_layernorm(out, residual.index_select(0, idx))
    h = layer.mlp(h)
    hidden_out = torch.zeros_like(residual).index_copy_(0, idx, h)
    return hidden_out, residual.index_copy(0, idx, res_kept)


_COMPILED: dict[str, Callable[..., Any]] = {}


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` compiled the way vLLM compiles ops it calls outside its model graph
    (``CustomOp.maybe_compile``), or `fn` itself when vLLM's compilation is off."""
    from vllm.config import get_cached_compilation_config
    from vllm.config.compilation import CompilationMode
    from vllm.model_executor.utils import maybe_disable_graph_partition
    from vllm.platforms import current_platform

    config = get_cached_compilation_config()
    if config.mode == CompilationMode.NONE or config.backend == "eager":
        return fn
    name = fn.__name__
    if name not in _COMPILED:
        backend = current_platform.simple_compile_backend
        _COMPILED[name] = torch.compile(fn, dynamic=True, backend=backend,
                                        options=maybe_disable_graph_partition(backend))
    return _COMPILED[name]
