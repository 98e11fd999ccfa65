"""Every place the plugin touches vLLM 0.32 below its public API, in one module.

Routed prefill needs four things vLLM has no extension point for: the step's attention
metadata (``CommonAttentionMetadata``) and each request's ``SamplingParams`` inside the worker,
attention over a subset of a layer's tokens, and a Qwen2 model built with another decoder
layer. Each is done here, and nowhere else:

- hooks: the attention builder's ``build`` and the model runner's ``_prepare_inputs`` are
  wrapped (``install_hooks``) to hand the step's metadata and requests to the routing state;
- reads of the runner's batch (``batch_requests``) and of the forward context
  (``forward_context``);
- subset attention (``write_kv``, ``subset_metadata``, ``attend``, ``new_builder``): what
  ``Attention.forward`` does for all tokens, done for the kept ones;
- copied code (``init_qwen2_for_causal_lm``), marked with its origin.

``COPIED`` lists the vLLM functions whose code is copied or re-implemented here or in
``ftp_vllm.server.app``, with the SHA-256 of their source in vLLM 0.32.0;
``tests/test_vllm_internals.py`` fails when the installed vLLM's originals differ, so an
upgrade shows exactly what to re-read. docs/ARCHITECTURE.md explains why vLLM's own extension
points (endpoint plugins, a builder subclass) are not used for these.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

VLLM_VERSION = "0.32.0"


@dataclass(frozen=True)
class Copied:
    """A vLLM function this project copies or re-implements (``where`` is our copy)."""

    module: str
    qualname: str
    sha256: str  # of ``inspect.getsource`` in vLLM 0.32.0
    where: str

    def source(self) -> str:
        import importlib

        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return inspect.getsource(obj)

    def current_sha256(self) -> str:
        return hashlib.sha256(self.source().encode()).hexdigest()


COPIED = (
    Copied("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM.__init__",
           "27ae2e99eb41c8fb1784756e4d6d15b4edcb13c76f4cc769bd71d47eadf6a9b2",
           "vllm_internals.init_qwen2_for_causal_lm"),
    Copied("vllm.model_executor.models.llama", "LlamaForCausalLM.forward",
           "82218fc877d4400a05fe525ec78cf40b29b5badd6b2e634c22cfb676cb3fbbd3",
           "models.RoutedModelMixin.forward (same body and frame size, not called)"),
    Copied("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM.forward",
           "70089418c2682d850bc30b9fa451eff55a742b0c79dd1daa589c54d1c7ce9aba",
           "models.RoutedModelMixin.forward (same body and frame size, not called)"),
    Copied("vllm.model_executor.layers.attention.attention", "Attention.forward",
           "6c39e4564720ca28efd6a66a7f095e429d7de2d656f9b89eeb6f2a463ec160db",
           "vllm_internals.write_kv / attend (for the kept tokens)"),
    Copied("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs",
           "c31a77c123a09a04971543d691b8ecce045820a05578494fc58eea2d3c665662",
           "vllm_internals.install_hooks (wrapped, reads input_batch)"),
    Copied("vllm.entrypoints.launchers.api_server.entry", "run_server",
           "cdd5eabbed79a4cd2df09c2e3912a4971c666cd1346b42b0a5370fea8aeba12d",
           "ftp_vllm.server.app.run_server"),
    Copied("vllm.entrypoints.launchers.api_server.entry", "build_and_serve",
           "5b8b058238d9df87c07ffda0f51fa82273ad4226140c9d0de6f991a7ac8eab3d",
           "ftp_vllm.server.app.build_and_serve"),
)


# ------------------------------------------------------------------------------ hooks
def install_hooks(
    builder_cls: type,
    on_build: Callable[[Any, Any], None],
    on_prepare_inputs: Callable[[Any], None],
) -> None:
    """Wrap ``builder_cls.build`` (sees each step's ``CommonAttentionMetadata``) and
    ``GPUModelRunner._prepare_inputs`` (the step's requests are in the runner's batch right
    after it). Idempotent per class: a second routed model in the process replaces the
    callbacks, not the wrappers."""
    _CALLBACKS["build"] = on_build
    _CALLBACKS["prepare"] = on_prepare_inputs
    if not getattr(builder_cls.build, "_ftp_wrapped", False):
        original_build = builder_cls.build

        @functools.wraps(original_build)
        def build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
            _CALLBACKS["build"](self, common_attn_metadata)
            return original_build(self, common_prefix_len, common_attn_metadata, *args, **kwargs)

        build._ftp_wrapped = True  # type: ignore[attr-defined]
        builder_cls.build = build

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not getattr(GPUModelRunner._prepare_inputs, "_ftp_wrapped", False):
        original_prepare = GPUModelRunner._prepare_inputs

        @functools.wraps(original_prepare)
        def _prepare_inputs(self, *args, **kwargs):
            out = original_prepare(self, *args, **kwargs)
            _CALLBACKS["prepare"](self)
            return out

        _prepare_inputs._ftp_wrapped = True  # type: ignore[attr-defined]
        GPUModelRunner._prepare_inputs = _prepare_inputs


_CALLBACKS: dict[str, Callable[..., None]] = {
    "build": lambda builder, metadata: None,
    "prepare": lambda runner: None,
}


@dataclass
class BatchRequests:
    """The runner's batch after ``_prepare_inputs``, in batch order."""

    req_ids: list[str]
    num_prompt_tokens: np.ndarray  # [R] int
    extra_args: list[dict[str, Any] | None]  # each request's SamplingParams.extra_args
    prompt_logprobs: list[bool]  # each request asks for prompt log-probabilities


def batch_requests(runner: Any, known: Container[str] = ()) -> BatchRequests:
    """Read the step's requests from the runner (``extra_args`` only for ids not in
    ``known``: the caller caches what it parsed)."""
    batch = runner.input_batch
    n = batch.num_reqs
    req_ids = list(batch.req_ids[:n])
    extra: list[dict[str, Any] | None] = []
    wants: list[bool] = []
    for rid in req_ids:
        if rid in known:
            extra.append(None)
            wants.append(False)
            continue
        params = getattr(runner.requests.get(rid), "sampling_params", None)
        extra.append(getattr(params, "extra_args", None))
        wants.append(getattr(params, "prompt_logprobs", None) is not None)
    return BatchRequests(req_ids, batch.num_prompt_tokens[:n].copy(), extra, wants)


def prompt_in_batch(runner: Any) -> bool:
    """Whether the step computes prompt tokens of any request (vLLM's own ``is_prefilling``
    test: tokens computed before the step fall short of the prompt)."""
    batch = runner.input_batch
    n = batch.num_reqs
    return bool((batch.num_computed_tokens_cpu[:n] < batch.num_prompt_tokens[:n]).any())


def skip_compiled() -> None:
    """Run this step's model forward eager: vLLM's compile decorator checks the forward
    context's ``skip_compiled`` (set for encoder steps of encoder-decoder models) on every
    call of the compiled module."""
    forward_context().skip_compiled = True


def forward_context() -> Any | None:
    """The current step's forward context (None outside a model forward)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return get_forward_context() if is_forward_context_available() else None


# ------------------------------------------------------------------- subset attention
def new_builder(engine_builder: Any) -> Any:
    """A metadata builder of our own, of the engine's builder's class: backends keep
    persistent buffers and (FlashInfer) planned wrappers in theirs, which the engine's own
    layers still use in the same step."""
    b = engine_builder
    own = type(b)(b.kv_cache_spec, b.layer_names, b.vllm_config, b.device)
    if hasattr(b, "_get_workspace_buffer") and hasattr(own, "set_workspace_buffer"):
        # FlashInfer: share the engine builder's float workspace (scratch that lives within
        # one kernel run; vLLM's V2 runner shares it across builders too) instead of
        # allocating hundreds of MiB more after the KV cache was sized.
        own.set_workspace_buffer(b._get_workspace_buffer())
    return own


def subset_metadata(
    step: Any, run_len: np.ndarray, run_req: np.ndarray, run_seq: np.ndarray, kept: Tensor
) -> Any:
    """``CommonAttentionMetadata`` of virtual requests: run i is a request whose query is its
    ``run_len[i]`` kept tokens and whose keys are the first ``run_seq[i]`` positions of its
    parent request ``run_req[i]`` (the parent's block-table row); ``kept`` are the runs'
    token indices in the step. Every field a vLLM 0.32 builder reads is set from the runs or
    the step's metadata (the list is in ``subset.py``); fields of features routed engines do
    not have (DCP, encoder, multimodal, R-SWA, fast prefill) stay None."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    query_start = np.zeros(len(run_len) + 1, dtype=np.int32)
    np.cumsum(run_len, out=query_start[1:])
    device = step.query_start_loc.device
    parent = torch.from_numpy(run_req).to(device)
    query_start_cpu = torch.from_numpy(query_start)
    seq_lens_cpu = torch.from_numpy(run_seq.astype(np.int32))
    return CommonAttentionMetadata(
        query_start_loc=query_start_cpu.to(device),
        query_start_loc_cpu=query_start_cpu,
        seq_lens=seq_lens_cpu.to(device),
        num_reqs=len(run_len),
        num_actual_tokens=int(query_start[-1]),
        max_query_len=int(run_len.max()),
        max_seq_len=int(seq_lens_cpu.max()),
        block_table_tensor=step.block_table_tensor.index_select(0, parent),
        slot_mapping=step.slot_mapping.index_select(0, kept),
        causal=True,
        seq_lens_cpu_upper_bound=seq_lens_cpu,  # exact: no speculative tokens in prefill runs
        is_prefilling=None
        if step.is_prefilling is None
        else step.is_prefilling.index_select(0, parent.to(step.is_prefilling.device)),
        positions=None if step.positions is None else step.positions.index_select(0, kept),
        req_idx=None if step.req_idx is None else np.asarray(step.req_idx)[run_req],
    )


def write_kv(attn: nn.Module, key: Tensor, value: Tensor) -> None:
    """K/V of every token of the step into the paged cache (what ``Attention.forward`` does
    before attention when the backend writes K/V apart from its forward)."""
    from vllm.model_executor.layers.attention.attention import unified_kv_cache_update

    unified_kv_cache_update(key, value, attn.layer_name)


def attend(attn: nn.Module, query: Tensor, key: Tensor, value: Tensor, metadata: Any,
           out: Tensor) -> None:
    """The backend's attention for some queries with metadata of our own (``Attention.forward``
    minus its K/V write and its query quantization, which routed engines refuse)."""
    attn.impl.forward(attn, query, key, value, attn.kv_cache, metadata, output=out)


def writes_kv_in_forward(backend: Any) -> bool:
    """Backends whose forward writes K/V cannot be split into a write and a subset call."""
    return bool(getattr(backend, "forward_includes_kv_cache_update", False))


# ------------------------------------------------------------------------- copied code
def init_qwen2_for_causal_lm(model: nn.Module, vllm_config: Any, prefix: str,
                             decoder_layer_type: type) -> None:
    """Copied from vllm 0.32.0 model_executor/models/qwen2.py:Qwen2ForCausalLM.__init__,
    with ``decoder_layer_type`` passed to ``Qwen2Model`` (that ``__init__`` takes no layer
    type, unlike Llama's)."""
    from vllm.distributed import get_pp_group
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.models.qwen2 import Qwen2Model
    from vllm.model_executor.models.utils import PPMissingLayer, maybe_prefix

    nn.Module.__init__(model)
    config = vllm_config.model_config.hf_config.get_text_config()
    quant_config = vllm_config.quant_config
    model.config = config
    model.quant_config = quant_config
    model.model = Qwen2Model(
        vllm_config=vllm_config,
        prefix=maybe_prefix(prefix, "model"),
        decoder_layer_type=decoder_layer_type,
    )
    if get_pp_group().is_last_rank:
        model.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, quant_config=quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            model.lm_head = model.lm_head.tie_weights(model.model.embed_tokens)
    else:
        model.lm_head = PPMissingLayer()
    model.logits_processor = LogitsProcessor(config.vocab_size)
    model.make_empty_intermediate_tensors = model.model.make_empty_intermediate_tensors
