"""Worker-side routing state: per-step plan, per-request targets, subset attention metadata.

One routed model lives in a worker process; ``RoutingRuntime`` is its shared state. Each
forward step it builds a ``StepPlan`` once (at the first routed layer): which tokens are
prompt tokens to route (``plan.plan_tokens``: whole aligned windows in ``window`` mode, whole
prompts in ``exact`` mode), each one's per-block sparsity targets (from its request's own
target), and a cache of subset attention metadata keyed by keep mask
(``subset.MetadataCache``: layers with equal masks share one build where the backend allows
it). When the router reads no hidden state (the static one) the plan also holds every layer's
route (kept tokens, attention calls, metadata), so a routed layer does no host work of its own.

Two hooks feed it (``vllm_internals.install_hooks``, installed when a routed model is
constructed): the attention builder's ``build`` hands over the step's
``CommonAttentionMetadata`` (``on_build``), and the model runner's ``_prepare_inputs`` the
step's requests: id, prompt length, ``extra_args["ftp_sparsity"]`` (``on_prepare_inputs``).
A step the runner did not prepare (profiling, warm-up, another runner) runs dense. What this
module decides is plain numpy/torch (``subset.py`` for the runs of kept tokens); every vLLM
internal it needs goes through ``vllm_internals``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from vllm.logger import init_logger

from ftp_vllm.contract import request_sparsity
from ftp_vllm.flops import BlockShape
from ftp_vllm.plugin.plan import TokenPlan, plan_tokens
from ftp_vllm.plugin.stats import RoutingStats
from ftp_vllm.plugin.subset import (
    BackendPolicy,
    MetadataCache,
    backend_policy,
    kept_runs,
    split_runs,
)
from ftp_vllm.plugin.vllm_internals import (
    batch_requests,
    forward_context,
    install_hooks,
    new_builder,
    prompt_in_batch,
    subset_metadata,
)
from ftp_vllm.routing.layout import TokenLayout
from ftp_vllm.routing.router import RouterInputs, TokenRouter
from ftp_vllm.routing.schedule import SparsitySchedule

logger = init_logger("vllm.ftp_vllm")  # a child of vLLM's logger: same handlers

_RUNTIME: RoutingRuntime | None = None


def get_runtime() -> RoutingRuntime | None:
    return _RUNTIME


def parse_request_sparsity(extra_args: Any, schedule: SparsitySchedule, default: float,
                           prompt_logprobs: bool = False) -> float:
    """A request's target from ``extra_args['ftp_sparsity']``; ValueError if malformed.

    Absent -> the default (0 for a request asking for prompt log-probabilities); None -> 0
    (dense). The rule is ``ftp_vllm.contract``'s, which the server also applies before
    admitting a request (HTTP 400) and the window scheduler for its cache keys, so they
    cannot disagree.
    """
    return request_sparsity(extra_args, schedule.max_target, default, prompt_logprobs)


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
    common_metadata: Any  # CommonAttentionMetadata of these virtual requests
    key: tuple[bytes, int]  # (keep mask, first run): the metadata cache key


@dataclass
class LayerRoute:
    kept_idx: Tensor  # [K] long, flattened indices of tokens that run the block
    kept_rows: Tensor  # kept_idx padded to the row bucket: the rows its GEMMs run on
    # [S] long, flattened indices of the tokens that skip it, and the rows of their skip
    # update (None: the model has no skip update, so nothing reads them)
    skipped_idx: Tensor | None
    skipped_rows: Tensor | None
    parts: list[AttnPart]  # attention calls, in kept-token order


@dataclass
class StepPlan:
    num_tokens: int
    req_ids: list[str] | None
    routed_idx: Tensor  # [Tr] long: prompt tokens routed this step
    routed_idx_np: np.ndarray
    layout: TokenLayout  # layout decisions are made over (``step_decisions``)
    block_sparsity: Tensor  # [L, T] float64, over that layout's tokens (both on the device
    # for routers decided layer by layer, else on the host)
    routed_req: np.ndarray  # [Rr] batch index of each routed request
    routed_target: np.ndarray  # [Rr] mean sparsity target of each routed request
    routed_lens: np.ndarray  # [Rr] tokens routed for each routed request (back to back)
    routed_prompt: np.ndarray  # [Rr] prompt length of each routed request
    prompt_pos: np.ndarray  # [Tr] prompt position of each routed token
    completing: list[str]  # ids of requests whose prompt ends in this step
    # host arrays over all tokens of the step, for runs of kept tokens
    tok_req: np.ndarray
    tok_pos: np.ndarray
    step_metadata: Any  # the step's CommonAttentionMetadata (all tokens)
    keeps: np.ndarray  # [L, Tr] bool: decided at plan time (host routers), else layer by layer
    meta_cache: MetadataCache  # built backend metadata (reuse per backend policy)
    routes: dict[bytes, LayerRoute] = field(default_factory=dict)  # host-side, by keep mask
    # every layer's route, when ``keeps`` was decided at plan time (no device round trip)
    layer_routes: list[LayerRoute | None] | None = None

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
        window: int | None = None,
        skipped_rows: bool = False,
        row_bucket: int = 1,
    ):
        self.router = router
        self.skipped_rows = skipped_rows  # routes carry their skipped rows (a skip update)
        self.row_bucket = row_bucket  # GEMM rows padded to a multiple of this (dense_parts)
        self.window = window  # window routing over aligned windows; None: exact
        # a window may be computed over several steps when decisions read positions only
        self.split_windows = window is not None and router.position_only
        self.schedule = schedule
        self.default_sparsity = float(default_sparsity)
        self.num_layers = num_layers
        self.vllm_config = vllm_config
        self.tp_size = tp_size
        self.stats = RoutingStats(num_layers, shape)
        self._blocks: dict[float, Tensor] = {}
        self._step_metadata = None
        self._engine_builder = None
        self._req_info: RequestInfo | None = None
        self._req_cache: dict[str, float] = {}
        self.backend_name = backend_name
        self._builder = None
        self._policy: BackendPolicy | None = None
        self._unsynced_build = False  # a build since the device last caught up with the host
        self.policy_override: BackendPolicy | None = None  # tests (worker.ftp_set_subset_policy)
        self._plan: StepPlan | None = None
        self._plan_ctx: Any = None
        self._warned: set[str] = set()
        self._fresh = False  # the runner prepared a new step since the last plan
        self._prompt_step = False  # that step computes prompt tokens

    # ------------------------------------------------------------------ hooks
    def on_build(self, builder: Any, common_metadata: Any) -> None:
        if builder is not self._builder:  # the engine's build for this step, not one of ours
            self._step_metadata = common_metadata
            self._engine_builder = builder

    def on_prepare_inputs(self, runner: Any) -> None:
        self._step_metadata = None  # the builder runs after this, for this step
        self._fresh = True
        # A step without prompt tokens (decode) has nothing to route: its plan is None
        # without reading the batch (about 0.2 ms a step otherwise, 1% of a decode step).
        self._prompt_step = prompt_in_batch(runner)
        if not self._prompt_step:
            return
        batch = batch_requests(runner, known=self._req_cache)
        cache = {}
        sparsity = np.empty(len(batch.req_ids), dtype=np.float64)
        for i, (rid, extra, wants) in enumerate(
                zip(batch.req_ids, batch.extra_args, batch.prompt_logprobs, strict=True)):
            s = self._req_cache.get(rid)
            if s is None:
                try:
                    s = parse_request_sparsity(extra, self.schedule, self.default_sparsity,
                                               wants)
                except ValueError as e:
                    # The server refuses these with HTTP 400; an offline caller gets dense.
                    self._warn_once(f"bad:{rid}", f"request {rid}: {e}; serving it dense")
                    s = 0.0
                if wants and self.default_sparsity > 0:  # dense unless it set its own target
                    self.stats.count_prompt_logprobs_dense(rid, extra)
            cache[rid] = s
            sparsity[i] = s
        self._req_cache = cache
        self._req_info = RequestInfo(batch.req_ids, batch.num_prompt_tokens, sparsity)

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
        ctx = forward_context()
        if ctx is None:
            return None
        if ctx is self._plan_ctx:
            return self._plan
        self._plan_ctx = ctx
        self._plan = None
        fresh, self._fresh = self._fresh, False
        if not fresh or not ctx.attn_metadata or self._step_metadata is None:
            return None  # profiling / warm-up / dummy runs
        self.stats.steps += 1
        if self._prompt_step:
            self.stats.prompt_steps += 1
            self._plan = self._build_plan(num_tokens)
        return self._plan

    def _build_plan(self, num_tokens: int) -> StepPlan | None:
        step = self._step_metadata
        num_reqs = int(step.num_reqs)
        query_start = step.query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
        if int(query_start[-1]) > num_tokens:
            self._warn_once(
                "tokens", f"metadata covers {query_start[-1]} of {num_tokens} tokens")
            return None
        # Tokens past query_start[-1] pad the step to a captured size (CUDA graphs): they
        # belong to no request, run no block and pass through.
        info = self._req_info
        if info is None or len(info.req_ids) != num_reqs:
            self._warn_once("info", "request info does not match the batch; step served dense")
            return None
        seq_lens = step.seq_lens[:num_reqs].cpu().numpy()
        tokens = plan_tokens(query_start, seq_lens, info.num_prompt, info.sparsity, self.window,
                             self.split_windows)
        if tokens.partial and self.window is None:
            self._warn_once(
                "partial",
                "a prompt arrived in pieces (chunked prefill or a prefix-cache hit); exact "
                "routing serves such prompts dense",
            )
        if tokens.unaligned:
            self.stats.unaligned_tokens += tokens.unaligned
            self._warn_once(
                "unaligned",
                f"a routing window of {self.window} tokens was split across steps; its "
                "tokens run dense (the scheduler aligns chunks unless the token budget is "
                "smaller than a window)",
            )
        completing = [info.req_ids[i] for i in tokens.completing]
        if not len(tokens.routed_reqs):
            self.stats.complete(completing)
            return None
        targets = info.sparsity[tokens.routed_reqs]
        blocks = [self.blocks(float(t)) for t in targets]
        if all(not bool((b > 0).any()) for b in blocks):
            self.stats.complete(completing)
            return None
        device = step.query_start_loc.device
        layout, block_sparsity, keeps, decided = step_decisions(
            self.router, tokens, blocks, self.window, device)
        plan = StepPlan(
            num_tokens=num_tokens,
            req_ids=info.req_ids,
            routed_idx=torch.from_numpy(tokens.routed_idx).to(device),
            routed_idx_np=tokens.routed_idx,
            layout=layout,
            block_sparsity=block_sparsity,
            routed_req=tokens.routed_reqs,
            routed_target=targets,
            routed_lens=tokens.routed_lens,
            routed_prompt=tokens.routed_prompt,
            prompt_pos=tokens.tok_pos[tokens.routed_idx],
            completing=completing,
            tok_req=tokens.tok_req,
            tok_pos=tokens.tok_pos,
            step_metadata=step,
            keeps=keeps,
            meta_cache=MetadataCache(self.policy().reusable),
        )
        if decided:
            self._route_all_layers(plan)
        return plan

    def _route_all_layers(self, plan: StepPlan) -> None:
        """Every layer's kept tokens, attention calls and (where the backend lets a build
        outlive the next one) metadata, in one pass at plan time: a routed layer then only
        looks its route up. Done between the layers' GEMMs, the same host work took about
        three times as long (12 against 4 ms of a 256-token step on this CPU)."""
        plan.layer_routes = [self._layer_route(plan, keep) for keep in plan.keeps]
        if plan.meta_cache.reusable:
            for route in plan.layer_routes:
                for part in route.parts if route is not None else ():
                    self.part_metadata(plan, part)

    # ------------------------------------------------------------------ per layer
    def route(
        self, plan: StepPlan, layer: int, q: Tensor, k: Tensor, num_heads: int,
        num_kv_heads: int, head_dim: int, scale: float,
    ) -> LayerRoute | None:
        """Decide the layer's kept tokens; None when every token runs the block."""
        if plan.layer_routes is not None:
            return plan.layer_routes[layer]
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
        self.stats.host_copies += 1
        return self._layer_route(plan, keep_np)

    def _layer_route(self, plan: StepPlan, keep_np: np.ndarray) -> LayerRoute | None:
        if keep_np.all():
            return None
        keep_all = np.ones(len(plan.tok_req), dtype=bool)  # the step's real tokens
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
                _synchronize(plan.step_metadata.query_start_loc.device)
            meta = self._get_builder().build(
                common_prefix_len=0, common_attn_metadata=part.common_metadata)
            self._unsynced_build = True
            return meta

        return plan.meta_cache.get(part.key, build)

    def finish_step(self, plan: StepPlan) -> None:
        self.stats.record_step(plan)

    # ------------------------------------------------------------------ metadata
    def _get_builder(self) -> Any:
        if self._builder is None:
            self._builder = new_builder(self._engine_builder)
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
        device = plan.step_metadata.query_start_loc.device
        kept_t, kept_rows = padded_rows(runs.kept, self.row_bucket, device)
        skipped_t = skipped_rows = None
        if self.skipped_rows:
            skipped_t, skipped_rows = padded_rows(np.flatnonzero(~keep_all), self.row_bucket,
                                                  device)
        parts = []
        for lo, hi in split_runs(runs.num_runs, self.policy().max_requests):
            start = int(runs.run_start[lo])
            end = int(runs.run_start[hi]) if hi < runs.num_runs else len(runs.kept)
            metadata = subset_metadata(
                plan.step_metadata, runs.run_len[lo:hi], runs.run_req[lo:hi],
                runs.run_seq[lo:hi], kept_t[start:end],
            )
            parts.append(AttnPart(start=start, end=end, common_metadata=metadata, key=(key, lo)))
        return LayerRoute(kept_idx=kept_t, kept_rows=kept_rows, skipped_idx=skipped_t,
                          skipped_rows=skipped_rows, parts=parts)


def padded_rows(idx: np.ndarray, bucket: int, device: torch.device | str
                ) -> tuple[Tensor, Tensor]:
    """(`idx`, `idx` padded to a multiple of `bucket` rows by repeating its last index), on
    `device`; the first is a view of the second (``dense_parts.row_bucket``)."""
    pad = -len(idx) % bucket if len(idx) else 0
    if pad:
        idx = np.concatenate([idx, np.full(pad, idx[-1], dtype=idx.dtype)])
    rows = torch.from_numpy(idx).to(device)
    return rows[: len(rows) - pad], rows


def step_decisions(router: TokenRouter, tokens: TokenPlan, blocks: list[Tensor],
                   window: int | None, device: torch.device | str = "cpu",
                   ) -> tuple[TokenLayout, Tensor, np.ndarray, bool]:
    """The step's layout, its [L, T] block targets and [L, Tr] keep masks.

    Layout and targets cover what decides the routed tokens (``plan_tokens``' ``decide_*``
    spans: the routed tokens themselves, or the whole windows a split window belongs to),
    built on the host. Every layer's mask is decided now when the router reads no hidden
    state (static, random, explicit masks: ``TokenRouter.keep_layers``), so no per-layer
    router call and no device round trip, and restricted to the step's tokens; layout and
    targets then stay on the host, where nothing reads them again. Otherwise they go to
    `device` with all-kept placeholders that ``RoutingRuntime.route`` fills layer by layer
    (such routers never split a window, so layout and targets are the routed tokens')."""
    lens = torch.as_tensor(tokens.decide_ends - tokens.decide_starts)
    if window is None:
        layout = TokenLayout.from_lengths(lens)
    else:
        layout = TokenLayout.from_spans(tokens.decide_starts, tokens.decide_ends,
                                        tokens.routed_prompt, window)
    tok = torch.repeat_interleave(torch.arange(len(lens)), lens)
    block_sparsity = torch.stack(blocks)[tok].T.contiguous()  # [L, T]
    if router.needs_scores:
        placeholders = np.ones(tuple(block_sparsity.shape), dtype=bool)
        return _to_device(layout, device), block_sparsity.to(device), placeholders, False
    keeps = router.keep_layers(layout, block_sparsity).numpy()
    cols = tokens.decided_columns()
    return layout, block_sparsity, keeps if cols is None else keeps[:, cols], True


def _to_device(layout: TokenLayout, device: torch.device | str) -> TokenLayout:
    return TokenLayout(**{
        f: (v.to(device) if isinstance(v, Tensor) else v) for f, v in vars(layout).items()})


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def activate(runtime: RoutingRuntime, builder_cls: type) -> None:
    """Make ``runtime`` the process's routing state and feed it from vLLM's hooks."""
    global _RUNTIME
    _RUNTIME = runtime
    install_hooks(builder_cls, runtime.on_build, runtime.on_prepare_inputs)
