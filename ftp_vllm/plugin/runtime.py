"""Worker-side routing state: per-step plan, per-request targets, subset attention metadata.

One routed model lives in a worker process; ``RoutingRuntime`` is its shared state. Each
forward step it builds a ``StepPlan`` once (at the first routed layer): which tokens are
prompt tokens to route (whole prompts: chunked prefill and prefix caching are off for routed
models), each one's per-block sparsity targets (from its request's own target), and a cache
of subset attention metadata keyed by keep mask (``subset.MetadataCache``: layers with equal
masks share one build where the backend allows it).

Two small hooks feed it, both installed only when a routed model is constructed:
- the attention backend's metadata builder ``build`` is wrapped to keep the step's
  ``CommonAttentionMetadata`` (backend-generic: every builder receives one);
- the model runner's ``_prepare_inputs`` is wrapped to read, per request of the batch, its
  id, prompt length and ``SamplingParams.extra_args["ftp_sparsity"]``. A step the runner
  did not prepare (profiling, warm-up, another runner) runs dense.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from vllm.logger import init_logger

from ftp_vllm.contract import request_sparsity
from ftp_vllm.flops import BlockShape
from ftp_vllm.plugin.stats import RoutingStats
from ftp_vllm.plugin.subset import (
    BackendPolicy,
    KeptRuns,
    MetadataCache,
    backend_policy,
    kept_runs,
    split_runs,
)
from ftp_vllm.routing.layout import TokenLayout
from ftp_vllm.routing.router import RouterInputs, TokenRouter
from ftp_vllm.routing.schedule import SparsitySchedule

logger = init_logger("vllm.ftp_vllm")  # a child of vLLM's logger: same handlers

_RUNTIME: RoutingRuntime | None = None


def get_runtime() -> RoutingRuntime | None:
    return _RUNTIME


def parse_request_sparsity(extra_args: Any, schedule: SparsitySchedule, default: float) -> float:
    """A request's target from ``extra_args['ftp_sparsity']``; ValueError if malformed.

    Absent -> the default; None -> 0 (dense). The rule is ``ftp_vllm.contract``'s, which the
    server also applies before admitting a request (HTTP 400), so the two cannot disagree.
    """
    return request_sparsity(extra_args, schedule.max_target, default)


@dataclass
class RequestInfo:
    """The runner's view of the step's requests, in batch order."""

    req_ids: list[str]
    num_prompt: np.ndarray  # [R] int
    sparsity: np.ndarray  # [R] float64


@dataclass
class AttnPart:
    """One attention call of a routed layer: kept tokens [start, end) of the layer's kept
    list, as at most the backend's limit of virtual requests."""

    start: int
    end: int
    cm: Any  # CommonAttentionMetadata of these virtual requests
    key: tuple[bytes, int]  # (keep mask, first run): the metadata cache key


@dataclass
class LayerRoute:
    kept_idx: Tensor  # [K] long, flattened indices of tokens that run the block
    parts: list[AttnPart]  # attention calls, in kept-token order


@dataclass
class StepPlan:
    num_tokens: int
    req_ids: list[str] | None
    routed_idx: Tensor  # [Tr] long: prompt tokens routed this step
    routed_idx_np: np.ndarray
    layout: TokenLayout  # layout of the routed tokens
    block_sparsity: Tensor  # [L, Tr] float64
    routed_req: np.ndarray  # [Rr] batch index of each routed request
    routed_target: np.ndarray  # [Rr] mean sparsity target of each routed request
    # host arrays over all tokens of the step, for runs of kept tokens
    tok_req: np.ndarray
    tok_pos: np.ndarray
    cm: Any
    keeps: np.ndarray  # [L, Tr] bool, filled layer by layer
    meta_cache: MetadataCache  # built backend metadata (reuse per backend policy)
    routes: dict[bytes, LayerRoute] = field(default_factory=dict)  # host-side, by keep mask

    @property
    def builds(self) -> int:
        return self.meta_cache.builds


class RoutingRuntime:
    def __init__(
        self,
        router: TokenRouter,
        schedule: SparsitySchedule,
        default_sparsity: float,
        num_layers: int,
        shape: BlockShape,
        vllm_config: Any,
        tp_size: int,
        backend_name: str = "",
    ):
        self.router = router
        self.schedule = schedule
        self.default_sparsity = float(default_sparsity)
        self.num_layers = num_layers
        self.vllm_config = vllm_config
        self.tp_size = tp_size
        self.stats = RoutingStats(num_layers, shape)
        self._blocks: dict[float, Tensor] = {}
        self._cm = None
        self._cm_builder = None
        self._req_info: RequestInfo | None = None
        self._req_cache: dict[str, float] = {}
        self.backend_name = backend_name
        self._builder = None
        self._policy: BackendPolicy | None = None
        self._unsynced_build = False  # a build since the device last caught up with the host
        self.policy_override: BackendPolicy | None = None  # tests (testing.set_subset_policy)
        self._plan: StepPlan | None = None
        self._plan_ctx: Any = None
        self._warned: set[str] = set()
        self._fresh = False  # the runner prepared a new step since the last plan

    # ------------------------------------------------------------------ hooks
    def on_build(self, builder: Any, cm: Any) -> None:
        self._cm = cm
        self._cm_builder = builder

    def on_prepare_inputs(self, runner: Any) -> None:
        batch = runner.input_batch
        n = batch.num_reqs
        req_ids = list(batch.req_ids[:n])
        cache = {}
        sparsity = np.empty(n, dtype=np.float64)
        for i, rid in enumerate(req_ids):
            s = self._req_cache.get(rid)
            if s is None:
                state = runner.requests.get(rid)
                params = getattr(state, "sampling_params", None)
                extra = getattr(params, "extra_args", None)
                try:
                    s = parse_request_sparsity(extra, self.schedule, self.default_sparsity)
                except ValueError as e:
                    # The server refuses these with HTTP 400; an offline caller gets dense.
                    self._warn_once(f"bad:{rid}", f"request {rid}: {e}; serving it dense")
                    s = 0.0
            cache[rid] = s
            sparsity[i] = s
        self._req_cache = cache
        self._req_info = RequestInfo(req_ids, batch.num_prompt_tokens[:n].copy(), sparsity)
        self._cm = None  # the builder runs after this, for this step
        self._fresh = True

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("FTP routing: %s", msg)

    # ------------------------------------------------------------------ plan
    def blocks(self, sparsity: float) -> Tensor:
        b = self._blocks.get(sparsity)
        if b is None:
            b = self._blocks[sparsity] = self.schedule.blocks(sparsity)
        return b

    def plan(self, num_tokens: int) -> StepPlan | None:
        """The step's plan, built at the first routed layer; None: run the step dense."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        ctx = get_forward_context()
        if ctx is self._plan_ctx:
            return self._plan
        self._plan_ctx = ctx
        self._plan = None
        fresh, self._fresh = self._fresh, False
        if not fresh or not ctx.attn_metadata or self._cm is None:
            return None  # profiling / warm-up / dummy runs
        self._plan = self._build_plan(num_tokens)
        self.stats.steps += 1
        return self._plan

    def _build_plan(self, num_tokens: int) -> StepPlan | None:
        cm = self._cm
        num_reqs = int(cm.num_reqs)
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
        if int(qsl[-1]) != num_tokens:
            self._warn_once("tokens", f"metadata covers {qsl[-1]} of {num_tokens} tokens")
            return None
        q_lens = np.diff(qsl)
        seq_lens = cm.seq_lens[:num_reqs].cpu().numpy().astype(np.int64)
        computed = seq_lens - q_lens
        info = self._req_info
        if info is None or len(info.req_ids) != num_reqs:
            self._warn_once("info", "request info does not match the batch; step served dense")
            return None
        num_prompt = info.num_prompt.astype(np.int64)
        targets = info.sparsity
        req_ids = info.req_ids
        prefill = (computed == 0) & (num_prompt >= 2) & (q_lens >= 2)
        partial = (computed > 0) & (computed < num_prompt)
        if partial.any():
            self._warn_once(
                "partial",
                "a prompt arrived in pieces (chunked prefill or a prefix-cache hit); such "
                "prompts are served dense",
            )
        routed = prefill & (targets > 0)
        if not routed.any():
            return None
        rr = np.flatnonzero(routed)
        rlen = np.minimum(num_prompt[rr], q_lens[rr])
        blocks = [self.blocks(float(targets[r])) for r in rr]
        if all(not bool((b > 0).any()) for b in blocks):
            return None
        routed_idx_np = np.concatenate(
            [np.arange(qsl[r], qsl[r] + n) for r, n in zip(rr, rlen, strict=True)]
        )
        device = cm.query_start_loc.device
        layout = TokenLayout.from_lengths(torch.as_tensor(rlen), device=device)
        bs = torch.stack(blocks).to(device)[layout.seq_ids].T.contiguous()  # [L, Tr]
        tok_req = np.repeat(np.arange(num_reqs), q_lens)
        tok_pos = computed[tok_req] + (np.arange(num_tokens) - qsl[tok_req])
        return StepPlan(
            num_tokens=num_tokens,
            req_ids=req_ids,
            routed_idx=torch.from_numpy(routed_idx_np).to(device),
            routed_idx_np=routed_idx_np,
            layout=layout,
            block_sparsity=bs,
            routed_req=rr,
            routed_target=targets[rr],
            tok_req=tok_req,
            tok_pos=tok_pos,
            cm=cm,
            keeps=np.ones((self.num_layers, len(routed_idx_np)), dtype=bool),
            meta_cache=MetadataCache(self.policy().reusable),
        )

    # ------------------------------------------------------------------ per layer
    def route(
        self, plan: StepPlan, layer: int, q: Tensor, k: Tensor, num_heads: int,
        num_kv_heads: int, head_dim: int, scale: float,
    ) -> LayerRoute | None:
        """Decide the layer's kept tokens; None when every token runs the block."""
        scores = None
        if self.router.needs_scores:
            from ftp_vllm.routing.factors import attention_scores

            idx = plan.routed_idx
            qr = q.view(-1, num_heads, head_dim).index_select(0, idx)
            kr = k.view(-1, num_kv_heads, head_dim).index_select(0, idx)
            scores = attention_scores(qr, kr, plan.layout, scale)
            if self.tp_size > 1:
                from vllm.distributed import tensor_model_parallel_all_reduce

                # mean over all heads = sum over ranks of (local mean * local heads) / total
                scores = tensor_model_parallel_all_reduce(scores * num_heads) / (
                    num_heads * self.tp_size
                )
        keep = self.router.keep(
            RouterInputs(
                layer=layer, layout=plan.layout,
                block_sparsity=plan.block_sparsity[layer], scores=scores,
            )
        )
        if keep.device.type != "cpu":
            self._unsynced_build = False  # .cpu() below waits for the device's queued calls
        keep_np = keep.cpu().numpy()
        plan.keeps[layer] = keep_np
        if keep_np.all():
            return None
        keep_all = np.ones(plan.num_tokens, dtype=bool)
        keep_all[plan.routed_idx_np] = keep_np
        key = np.packbits(keep_all).tobytes()
        route = plan.routes.get(key)
        if route is None:
            route = plan.routes[key] = self._subset_route(plan, keep_all, key)
        return route

    def part_metadata(self, plan: StepPlan, part: AttnPart) -> Any:
        """The backend metadata of one attention call; fetch it right before the call (a
        stateful backend's metadata is valid only until the builder's next build)."""

        def build() -> Any:
            if self._unsynced_build and not plan.meta_cache.reusable:
                # A stateful builder's plan may still be on its way to the device (FlashInfer
                # plans into a page-locked host buffer copied asynchronously); wait for the
                # calls already queued before planning over it. route() fetching a keep mask
                # from the device is such a wait, so with device-side routers this only runs
                # for a layer split into several calls.
                _synchronize(plan.cm.query_start_loc.device)
            meta = self._get_builder().build(common_prefix_len=0, common_attn_metadata=part.cm)
            self._unsynced_build = True
            return meta

        return plan.meta_cache.get(part.key, build)

    def finish_step(self, plan: StepPlan) -> None:
        self.stats.record_step(plan)

    # ------------------------------------------------------------------ metadata
    def _get_builder(self) -> Any:
        if self._builder is None:
            b = self._cm_builder
            # A builder of our own: backends keep persistent buffers and (FlashInfer)
            # planned wrappers in theirs, which the engine's own layers still use this step.
            own = type(b)(b.kv_cache_spec, b.layer_names, b.vllm_config, b.device)
            if hasattr(b, "_get_workspace_buffer") and hasattr(own, "set_workspace_buffer"):
                # FlashInfer: share the engine builder's float workspace (scratch that lives
                # within one kernel run; vLLM's V2 runner shares it across builders too)
                # instead of allocating hundreds of MiB more after the KV cache was sized.
                own.set_workspace_buffer(b._get_workspace_buffer())
            self._builder = own
        return self._builder

    def policy(self) -> BackendPolicy:
        """Request limit and metadata reuse for this backend (``subset.backend_policy``)."""
        if self.policy_override is not None:
            return self.policy_override
        if self._policy is None:
            max_num_seqs = int(self.vllm_config.scheduler_config.max_num_seqs)
            self._policy = backend_policy(self.backend_name, self._get_builder(), max_num_seqs)
            logger.info(
                "FTP routing: %s subset attention: %s",
                self.backend_name or "unknown backend", self._policy.describe(),
            )
        return self._policy

    def _subset_route(self, plan: StepPlan, keep_all: np.ndarray, key: bytes) -> LayerRoute:
        """The kept tokens and their attention calls: virtual requests (``kept_runs``) in
        groups of at most the backend's limit (``split_runs``)."""
        runs = kept_runs(keep_all, plan.tok_req, plan.tok_pos)
        device = plan.cm.query_start_loc.device
        kept_t = torch.from_numpy(runs.kept).to(device)
        parts = []
        for lo, hi in split_runs(runs.num_runs, self.policy().max_requests):
            start = int(runs.run_start[lo])
            end = int(runs.run_start[hi]) if hi < runs.num_runs else len(runs.kept)
            cm = self._subset_common_metadata(plan.cm, runs, lo, hi, kept_t[start:end])
            parts.append(AttnPart(start=start, end=end, cm=cm, key=(key, lo)))
        return LayerRoute(kept_idx=kept_t, parts=parts)

    @staticmethod
    def _subset_common_metadata(
        cm: Any, runs: KeptRuns, lo: int, hi: int, kept_t: Tensor
    ) -> Any:
        """``CommonAttentionMetadata`` of virtual requests [lo, hi): each run of kept tokens
        is a request whose query is the run and whose keys are its parent's positions up to
        the run's last token (the parent's block-table row). Every field a vLLM 0.32 builder
        reads is set from the runs or the step's metadata (list in ``subset.py``); fields for
        features routed engines do not have (DCP, encoder, multimodal, R-SWA, fast prefill)
        stay None."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        run_len = runs.run_len[lo:hi]
        run_req = runs.run_req[lo:hi]
        qsl = np.zeros(hi - lo + 1, dtype=np.int32)
        np.cumsum(run_len, out=qsl[1:])
        device = cm.query_start_loc.device
        run_req_t = torch.from_numpy(run_req).to(device)
        qsl_cpu = torch.from_numpy(qsl)
        seq_cpu = torch.from_numpy(runs.run_seq[lo:hi].astype(np.int32))
        return CommonAttentionMetadata(
            query_start_loc=qsl_cpu.to(device),
            query_start_loc_cpu=qsl_cpu,
            seq_lens=seq_cpu.to(device),
            num_reqs=hi - lo,
            num_actual_tokens=int(qsl[-1]),
            max_query_len=int(run_len.max()),
            max_seq_len=int(seq_cpu.max()),
            block_table_tensor=cm.block_table_tensor.index_select(0, run_req_t),
            slot_mapping=cm.slot_mapping.index_select(0, kept_t),
            causal=True,
            seq_lens_cpu_upper_bound=seq_cpu,  # exact: no speculative tokens in prefill runs
            is_prefilling=None
            if cm.is_prefilling is None
            else cm.is_prefilling.index_select(0, run_req_t.to(cm.is_prefilling.device)),
            positions=None if cm.positions is None else cm.positions.index_select(0, kept_t),
            req_idx=None if cm.req_idx is None else np.asarray(cm.req_idx)[run_req],
        )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


# ---------------------------------------------------------------------- install
def install(runtime: RoutingRuntime, builder_cls: type) -> None:
    """Make `runtime` the process's routing state and wrap the two hooks (idempotent)."""
    global _RUNTIME
    _RUNTIME = runtime
    if not getattr(builder_cls.build, "_ftp_wrapped", False):
        original_build = builder_cls.build

        @functools.wraps(original_build)
        def build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
            rt = _RUNTIME
            if rt is not None and self is not rt._builder:
                rt.on_build(self, common_attn_metadata)
            return original_build(self, common_prefix_len, common_attn_metadata, *args, **kwargs)

        build._ftp_wrapped = True  # type: ignore[attr-defined]
        builder_cls.build = build
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:  # pragma: no cover
        logger.warning("FTP routing: no GPUModelRunner; per-request sparsity unavailable")
        return
    if not getattr(GPUModelRunner._prepare_inputs, "_ftp_wrapped", False):
        original_prepare = GPUModelRunner._prepare_inputs

        @functools.wraps(original_prepare)
        def _prepare_inputs(self, *args, **kwargs):
            out = original_prepare(self, *args, **kwargs)
            rt = _RUNTIME
            if rt is not None:
                rt.on_prepare_inputs(self)
            return out

        _prepare_inputs._ftp_wrapped = True  # type: ignore[attr-defined]
        GPUModelRunner._prepare_inputs = _prepare_inputs
