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

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def first_layer_inputs(layer: Any, positions: torch.Tensor, hidden_states: torch.Tensor
                       ) -> tuple[torch.Tensor, ...]:
    """The first layer's inputs: its residual is the embedding itself."""
    return _qkv(layer, positions, layer.input_layernorm(hidden_states), hidden_states)


def layer_inputs(layer: Any, positions: torch.Tensor, hidden_states: torch.Tensor,
                 residual: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Input norm (fused with the residual add), q/k/v and RoPE of every token:
    (q, k, v, residual, normed hidden states)."""
    hidden_states, residual = layer.input_layernorm(hidden_states, residual)
    return _qkv(layer, positions, hidden_states, residual)


def _qkv(layer: Any, positions: torch.Tensor, normed: torch.Tensor, residual: torch.Tensor
         ) -> tuple[torch.Tensor, ...]:
    self_attn = layer.self_attn
    qkv, _ = self_attn.qkv_proj(normed)
    q, k, v = qkv.split([self_attn.q_size, self_attn.kv_size, self_attn.kv_size], dim=-1)
    if getattr(self_attn, "qk_norm", False):
        n = q.shape[0]
        q = self_attn.q_norm(q.view(n, self_attn.num_heads, self_attn.head_dim))
        k = self_attn.k_norm(k.view(n, self_attn.num_kv_heads, self_attn.head_dim))
        q, k = q.view(n, self_attn.q_size), k.view(n, self_attn.kv_size)
    q, k = self_attn.rotary_emb(positions, q, k)
    return q, k, v, residual, normed


def all_outputs(layer: Any, attn_out: torch.Tensor, residual: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """o_proj, post-attention norm and MLP of every row (a block that skips no token)."""
    out, _ = layer.self_attn.o_proj(attn_out)
    h, residual = layer.post_attention_layernorm(out, residual)
    return layer.mlp(h), residual


def kept_outputs(layer: Any, attn_out: torch.Tensor, residual: torch.Tensor,
                 rows: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o_proj, post-attention norm and MLP of `rows` (the kept rows `idx`, padded to the
    row bucket), the kept ones scattered back: skipped rows return (0, residual), so vLLM's
    next fused add passes them through bit-exactly."""
    out, _ = layer.self_attn.o_proj(attn_out)
    h, res_kept = layer.post_attention_layernorm(out, residual.index_select(0, rows))
    h = layer.mlp(h)
    n = idx.shape[0]
    hidden_out = torch.zeros_like(residual).index_copy_(0, idx, h[:n])
    return hidden_out, residual.index_copy(0, idx, res_kept[:n])


# Rows per GEMM bucket on the CPU (``row_bucket``).
CPU_ROW_BUCKET = 16


def row_bucket(device_type: str) -> int:
    """The multiple a routed layer pads its GEMM row counts to (kept rows for o_proj, norm and
    MLP; skipped rows for the skip update); padding rows repeat the last real row and are
    never scattered back.

    On the CPU, vLLM's linears (oneDNN ``onednn_mm``) and torch's matmuls build a oneDNN
    primitive for every new row count M and JIT-compile its kernels the first time an M is
    seen (on a 2-core AVX-512 CPU: a layer's o_proj, gate_up and down at about 600 rows 13.3
    against 8.9 ms, a rank-32 product of the skip update's form 1.9 against 0.13 ms;
    docs/PERFORMANCE.md). Plain vLLM's layers all see a step's token count; a routed layer
    sees its own kept count, new in almost every served step, so without buckets every routed
    layer compiled kernels every step (about 100 ms of a 600-token step). With buckets of 16
    a layer sees at most 128 row counts per 2048 tokens, and pays at most 15 padding rows a
    GEMM. GPUs' GEMM libraries compile nothing per M."""
    return CPU_ROW_BUCKET if device_type == "cpu" else 1


@dataclass(frozen=True)
class DenseParts:
    """One model's dense parts, shared by its routed layers."""

    first_inputs: Callable[..., Any]
    inputs: Callable[..., Any]
    kept_outputs: Callable[..., Any]
    all_outputs: Callable[..., Any]


def dense_parts(compile: bool) -> DenseParts:
    """The dense parts, each compiled for this model when `compile` (and vLLM compiles)."""
    fns = (first_layer_inputs, layer_inputs, kept_outputs, all_outputs)
    if compile:
        fns = tuple(_compiled(fn) for fn in fns)
    return DenseParts(*fns)


def _shape_guards(entries: list[Any]) -> list[bool]:
    """Keep only the guards on symbolic sizes; drop the rest, as vLLM does for its model
    graph: checking every weight of the layer argument took
    about 0.1 ms a call on this CPU, 9 of a 256-token step's 200 ms. What the dropped guards
    checked holds by construction: one model per compiled copy, the same weight shapes and
    dtypes in every layer, and the first layer's residual-less form a function of its own."""
    return [entry.guard_type == "SHAPE_ENV" for entry in entries]


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` compiled the way vLLM compiles ops it calls outside its model graph
    (``CustomOp.maybe_compile``), or `fn` itself when vLLM's compilation is off.

    Each call compiles a fresh copy of `fn`'s code: Dynamo keeps compiled entries on the code
    object, and with the guards dropped a second model in the process (another size) must not
    find the first one's."""
    from vllm.config import get_cached_compilation_config
    from vllm.config.compilation import CompilationMode
    from vllm.model_executor.utils import maybe_disable_graph_partition
    from vllm.platforms import current_platform

    config = get_cached_compilation_config()
    if config.mode == CompilationMode.NONE or config.backend == "eager":
        return fn
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)
    backend = current_platform.simple_compile_backend
    options = {**maybe_disable_graph_partition(backend), "guard_filter_fn": _shape_guards}
    compiled = torch.compile(copy, dynamic=True, backend=backend, options=options)

    def call(layer: Any, *args: torch.Tensor) -> Any:
        # Dynamo specializes sizes 0 and 1, and the guard on that is one of those dropped: a
        # graph compiled for one row would then serve every later call (an engine crash, seen
        # with a step of one kept token). Those sizes run eager.
        if min(a.shape[0] for a in args) < 2:
            return fn(layer, *args)
        return compiled(layer, *args)

    return call
