"""Routed Llama and Qwen2 models for vLLM: vLLM's own classes with a routed decoder layer.

A routed layer, on a step with prompts to route:
  input norm + q/k/v + RoPE for every token -> K/V of every token written to the paged cache
  -> router decisions for prompt tokens (shared routing code, factors from q/k of this layer)
  -> attention with the kept tokens' queries over all keys (subset metadata from the
     backend's own builder; one call per group of virtual requests the backend accepts)
  -> o_proj, post-attention norm and MLP for kept tokens only
  -> scatter back: skipped rows return (0, residual), so vLLM's next fused add passes their
     hidden state through bit-exactly; with the artifact's skip update they return
     (delta(normed input), residual) instead (``routing.skip_update``).
Steps without prompts to route (decode, sparsity 0, profiling) run vLLM's own layer code,
compiled as vLLM compiles it (torch.compile; CUDA graphs on a GPU): the model's forward asks
the routing runtime first and leaves vLLM's graph (the forward context's ``skip_compiled``)
only when the step routes, since a data-dependent number of kept tokens per layer does not
trace; the routed layers then run their dense parts compiled (``plugin.dense_parts``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer, extract_layer_index

from ftp_vllm.artifact import model_fingerprint
from ftp_vllm.flops import BlockShape
from ftp_vllm.plugin.dense_parts import DenseParts, dense_parts, row_bucket
from ftp_vllm.plugin.runtime import RoutingRuntime, activate, get_runtime
from ftp_vllm.plugin.settings import routing_settings
from ftp_vllm.plugin.vllm_internals import (
    attend,
    init_qwen2_for_causal_lm,
    skip_compiled,
    write_kv,
    writes_kv_in_forward,
)
from ftp_vllm.routing.skip_update import SkipUpdate, rank_of

FINAL_NORM = "model.norm.weight"


class RoutedLayerMixin:
    """Routed forward for Llama-style decoder layers (input_layernorm, self_attn with fused
    qkv_proj/rotary_emb/attn/o_proj, post_attention_layernorm, mlp)."""

    ftp_layer: int
    ftp_last: bool
    ftp_parts: DenseParts  # set by the model (one compiled copy per model)
    ftp_skip_update: SkipUpdate | None = None  # set by the model, in its device and dtype

    def _ftp_init(self, prefix: str, num_layers: int) -> None:
        self.ftp_layer = extract_layer_index(prefix)
        self.ftp_last = self.ftp_layer == num_layers - 1

    def forward(self, positions, hidden_states, residual, **kwargs):
        if torch.compiler.is_compiling():  # the traced (dense) graph: vLLM's own layer
            return super().forward(positions, hidden_states, residual, **kwargs)
        runtime = get_runtime()
        plan = runtime.plan(hidden_states.shape[0]) if runtime is not None else None
        if plan is None:
            return super().forward(positions, hidden_states, residual, **kwargs)
        try:
            return self._routed_forward(runtime, plan, positions, hidden_states, residual)
        finally:
            if self.ftp_last:
                runtime.finish_step(plan)

    def _routed_forward(self, runtime, plan, positions, hidden_states, residual):
        parts = self.ftp_parts
        if residual is None:
            q, k, v, residual, normed = parts.first_inputs(self, positions, hidden_states)
        else:
            q, k, v, residual, normed = parts.inputs(self, positions, hidden_states, residual)
        self_attn = self.self_attn
        attn = self_attn.attn
        route = runtime.route(
            plan, self.ftp_layer, q, k, attn.num_heads, attn.num_kv_heads, attn.head_size,
            self_attn.scaling,
        )
        if route is None:  # every token runs this block
            return parts.all_outputs(self, attn(q, k, v), residual)

        num_tokens = q.shape[0]
        key = k.view(num_tokens, attn.num_kv_heads, attn.head_size)
        value = v.view(num_tokens, attn.num_kv_heads, attn.head_size_v)
        write_kv(attn, key, value)  # K/V of every token
        idx = route.kept_idx
        num_kept = idx.numel()
        if num_kept == 0:  # nothing of this step runs the block: every row passes through
            return self._ftp_skipped(torch.zeros_like(residual), normed, route), residual
        rows = route.kept_rows  # idx padded to the row bucket (dense_parts.row_bucket)
        query = q.view(num_tokens, attn.num_heads, attn.head_size).index_select(0, idx)
        attn_out = torch.empty(
            (rows.numel(), attn.num_heads, attn.head_size_v), dtype=q.dtype, device=q.device
        )
        attn_out[num_kept:].zero_()  # padding rows: never attended, never scattered back
        kept_key = key.index_select(0, idx)
        kept_value = value.index_select(0, idx)
        for part in route.parts:  # one call per group of virtual requests the backend takes
            a, b = part.start, part.end
            attend(attn, query[a:b], kept_key[a:b], kept_value[a:b],
                   runtime.part_metadata(plan, part), out=attn_out[a:b])
        hidden_out, residual = parts.kept_outputs(self, attn_out.view(rows.numel(), -1),
                                                  residual, rows, idx)
        return self._ftp_skipped(hidden_out, normed, route), residual

    def _ftp_skipped(self, hidden_out, normed, route):
        """The skipped rows' output: the skip update of their normed input (zero without)."""
        update = self.ftp_skip_update
        idx = route.skipped_idx
        if update is None or idx.numel() == 0:
            return hidden_out
        delta = update.delta(self.ftp_layer, normed.index_select(0, route.skipped_rows))
        return hidden_out.index_copy_(0, idx, delta[: idx.numel()])


class FTPLlamaDecoderLayer(RoutedLayerMixin, LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config, **kwargs)
        cfg = config or vllm_config.model_config.hf_config
        self._ftp_init(prefix, cfg.num_hidden_layers)


class FTPQwen2DecoderLayer(RoutedLayerMixin, Qwen2DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__(
            config=config, cache_config=cache_config, quant_config=quant_config, prefix=prefix
        )
        self._ftp_init(prefix, config.num_hidden_layers)


class RoutedModelMixin:
    """Artifact loading, fingerprint check and runtime set-up shared by the routed models."""

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        """A step that routes leaves vLLM's compiled graph (which would run it dense) for the
        routed layers; every other step takes vLLM's compiled path.

        This replaces vLLM's ``LlamaForCausalLM.forward`` / ``Qwen2ForCausalLM.forward``
        instead of calling it (``vllm_internals.COPIED``), with a frame of the same size, so
        a decode step runs at exactly plain vLLM's Python stack depth. CPython 3.11 frees a
        16 KiB stack chunk whenever the call that opened it returns (cpython gh-142183); one
        more frame here moved 60 of a decode step's calls across a chunk boundary (89
        mmap/munmap pairs a step in the served worker against plain vLLM's 30, decode about 5%
        slower). ``tests/test_vllm_internals.py`` checks the frame sizes."""
        runtime = get_runtime()
        if runtime is not None and runtime.plan(positions.shape[-1]) is not None:
            skip_compiled()
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def _ftp_setup(self, vllm_config: VllmConfig) -> None:
        hf_config = vllm_config.model_config.hf_config
        self.ftp_settings = settings = routing_settings(hf_config)
        cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        layers = [m for m in self.model.layers if not isinstance(m, PPMissingLayer)]
        backend = layers[0].self_attn.attn.attn_backend
        if writes_kv_in_forward(backend):
            raise NotImplementedError(
                f"FTP routing needs an attention backend that writes K/V apart from its "
                f"forward; {backend.get_name()} does not"
            )
        device = next(self.parameters()).device
        router = settings.artifact.router
        if isinstance(router, nn.Module):
            router.to(device)
        # The routed layers' dense parts, compiled as vLLM compiles ops outside its graph (one
        # per model). Routers that read attention scores keep them eager: compiled, they moved
        # exact-mode (MLP router) bf16 outputs off the oracle on one CPU (a prompt logprob 0.70
        # away; eager and plain vLLM: 0.11) and made greedy tokens depend on the batch.
        parts = dense_parts(compile=not router.needs_scores)
        skip_update = settings.artifact.skip_update
        if skip_update is not None:
            skip_update = skip_update.to(device, vllm_config.model_config.dtype)
        for layer in layers:
            layer.ftp_parts = parts
            layer.ftp_skip_update = skip_update
        runtime = RoutingRuntime(
            router=router,
            schedule=settings.artifact.schedule,
            default_sparsity=settings.sparsity,
            num_layers=cfg.num_hidden_layers,
            shape=BlockShape.from_config(cfg, skip_rank=rank_of(skip_update)),
            vllm_config=vllm_config,
            tp_size=get_tensor_model_parallel_world_size(),
            backend_name=backend.get_name(),
            window=settings.artifact.window,
            skipped_rows=skip_update is not None,
            row_bucket=row_bucket(device.type),
        )
        activate(runtime, backend.get_builder_cls())

    def _ftp_watch_norm(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass weights through, keeping the checkpoint's final norm for the fingerprint."""
        for name, tensor in weights:
            if name == FINAL_NORM:
                self._ftp_norm = tensor.detach().clone()
            yield name, tensor

    def _ftp_check_artifact(self) -> None:
        """After weights load: the artifact must belong to these exact weights."""
        norm = getattr(self, "_ftp_norm", None)
        if norm is None:
            norm = self.model.norm.weight
        fp = model_fingerprint(self.config, norm)
        self.ftp_settings.artifact.check_model(fp, where=self.ftp_settings.artifact_path)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(self._ftp_watch_norm(weights))
        self._ftp_check_artifact()
        return loaded


class FTPLlamaForCausalLM(RoutedModelMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs):
        kwargs.setdefault("layer_type", FTPLlamaDecoderLayer)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._ftp_setup(vllm_config)


class FTPQwen2ForCausalLM(RoutedModelMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        # Qwen2ForCausalLM.__init__ takes no decoder layer type: a marked copy that does.
        init_qwen2_for_causal_lm(self, vllm_config, prefix, FTPQwen2DecoderLayer)
        self._ftp_setup(vllm_config)
