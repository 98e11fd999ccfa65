"""Routing statistics, accumulated in the worker and read through ``collective_rpc``.

Counts are kept on the host: the subset attention metadata needs each layer's keep mask on
the host anyway (decided there at plan time for routers that read no hidden state, else
copied from the device once per layer: ``host_copies``), so statistics add no device sync.
Totals are monotonic counters (ready for Prometheus counters); per-request records
(sparsity, FLOP-model speedup) queue up until a reader drains them (histograms). Every
tensor-parallel rank holds the same numbers: read rank 0. Workers hand them out through
``worker.FTPWorkerExtension.ftp_routing_stats``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from ftp_vllm.contract import SPARSITY_KEY
from ftp_vllm.flops import BlockShape

MAX_REQUEST_RECORDS = 10_000


class RoutingStats:
    def __init__(self, num_layers: int, shape: BlockShape):
        self.num_layers = num_layers
        self.shape = shape
        self.record_masks = False
        self.masks: dict[str, np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        self.steps = 0  # forward steps seen (with attention metadata)
        self.prompt_steps = 0  # steps computing prompt tokens (the others are never planned)
        self.routed_steps = 0  # steps with at least one routed prompt
        self.routed_requests = 0
        self.routed_tokens = 0  # prompt tokens that went through the router
        self.kept = np.zeros(self.num_layers, dtype=np.int64)  # per layer
        self.skipped = np.zeros(self.num_layers, dtype=np.int64)  # per layer
        self.dense_flops = 0.0  # FLOP model, routed prompts as if dense
        self.routed_flops = 0.0  # FLOP model, as routed
        self.metadata_builds = 0
        self.host_copies = 0  # keep masks copied from the device (one sync each on a GPU)
        self.unaligned_tokens = 0  # window routing: prompt tokens run dense, window split
        self.prompt_logprobs_dense_requests = 0  # dense: prompt logprobs, no target of its own
        self._logprobs_dense_ids: dict[str, None] = {}  # counted once each (preemption)
        self._open: dict[str | None, dict[str, Any]] = {}  # requests still in prefill
        self._open_masks: dict[str, np.ndarray] = {}
        self.requests: deque[dict[str, Any]] = deque(maxlen=MAX_REQUEST_RECORDS)

    def record_step(self, plan: Any) -> None:
        """Add one step's routed tokens; a request's record is complete (and readable) once
        its prompt's last token has been computed: a chunked prompt is routed over steps."""
        keeps = plan.keeps  # [L, Tr] bool
        shape = self.shape
        per_kept = shape.kept_token_flops(plan.prompt_pos.astype(np.float64))  # [Tr]
        kv = float(shape.kv_flops)
        num_layers = keeps.shape[0]
        lengths = np.asarray(plan.routed_lens)
        starts = np.cumsum(lengths) - lengths
        kept_cost = (keeps * per_kept).sum(0)  # [Tr] summed over layers
        skipped_req = num_layers * lengths - np.add.reduceat(keeps.sum(0), starts)
        routed_req = (np.add.reduceat(kept_cost, starts) + num_layers * kv * lengths
                      + shape.skip_update_flops * skipped_req)
        dense_req = np.add.reduceat(per_kept, starts) * num_layers + num_layers * kv * lengths

        self.routed_steps += 1
        self.routed_tokens += int(lengths.sum())
        k = keeps.sum(1)
        self.kept += k
        self.skipped += keeps.shape[1] - k
        self.dense_flops += float(dense_req.sum())
        self.routed_flops += float(routed_req.sum())
        self.metadata_builds += plan.builds
        kept_layer_req = np.add.reduceat(keeps, starts, axis=1)  # [L, Rr]
        for i, r in enumerate(plan.routed_req):
            rid = plan.req_ids[r] if plan.req_ids is not None else None
            rec = self._open.get(rid)
            if rec is None:
                rec = self._open[rid] = {
                    "request_id": rid, "prompt_tokens": 0,
                    "target_sparsity": float(plan.routed_target[i]),
                    "dense_flops": 0.0, "routed_flops": 0.0,
                    "kept_per_layer": np.zeros(num_layers, dtype=np.int64),
                }
                if len(self._open) > MAX_REQUEST_RECORDS:  # requests that never finished
                    self._open.pop(next(iter(self._open)))
            rec["prompt_tokens"] += int(lengths[i])
            rec["dense_flops"] += float(dense_req[i])
            rec["routed_flops"] += float(routed_req[i])
            rec["kept_per_layer"] += kept_layer_req[:, i]
            if self.record_masks and rid is not None:
                mask = self._open_masks.get(rid)
                if mask is None:
                    n = int(plan.routed_prompt[i])
                    mask = self._open_masks[rid] = np.ones((num_layers, n), dtype=bool)
                s, e = int(starts[i]), int(starts[i] + lengths[i])
                mask[:, plan.prompt_pos[s:e]] = keeps[:, s:e]
        self.complete(plan.completing)

    def complete(self, req_ids: list[str]) -> None:
        """Close the records of requests whose prompt has been computed in full."""
        for rid in req_ids:
            mask = self._open_masks.pop(rid, None)
            if mask is not None:
                self.masks[rid] = mask
            rec = self._open.pop(rid, None)
            if rec is None:
                continue
            kept = rec.pop("kept_per_layer")
            pairs = rec["prompt_tokens"] * self.num_layers
            dense, routed = rec.pop("dense_flops"), rec.pop("routed_flops")
            self.routed_requests += 1
            self.requests.append({
                **rec,
                "token_sparsity": 1.0 - float(kept.sum()) / pairs,
                "flop_speedup": dense / routed,
                "kept_per_layer": kept.tolist(),
                "skipped_per_layer": (rec["prompt_tokens"] - kept).tolist(),
            })

    def count_prompt_logprobs_dense(self, req_id: str, extra_args: Any) -> None:
        """Count a request that asks for prompt log-probabilities while the default target is
        above 0: unless it sets ``ftp_sparsity`` itself it is served dense
        (``contract.request_sparsity``). Once per request id, so a preempted request that
        comes back is not counted again."""
        if (extra_args and SPARSITY_KEY in extra_args) or req_id in self._logprobs_dense_ids:
            return
        self._logprobs_dense_ids[req_id] = None
        if len(self._logprobs_dense_ids) > MAX_REQUEST_RECORDS:
            self._logprobs_dense_ids.pop(next(iter(self._logprobs_dense_ids)))
        self.prompt_logprobs_dense_requests += 1

    def snapshot(self, drain_requests: bool = False) -> dict[str, Any]:
        out = {
            "steps": self.steps,
            "prompt_steps": self.prompt_steps,
            "routed_steps": self.routed_steps,
            "routed_requests": self.routed_requests,
            "routed_tokens": self.routed_tokens,
            "kept_per_layer": self.kept.tolist(),
            "skipped_per_layer": self.skipped.tolist(),
            "token_block_pairs": int(self.kept.sum() + self.skipped.sum()),
            "skipped_pairs": int(self.skipped.sum()),
            "dense_flops": self.dense_flops,
            "routed_flops": self.routed_flops,
            "flop_speedup": self.dense_flops / self.routed_flops if self.routed_flops else 1.0,
            "metadata_builds": self.metadata_builds,
            "host_copies": self.host_copies,
            "unaligned_tokens": self.unaligned_tokens,
            "prompt_logprobs_dense_requests": self.prompt_logprobs_dense_requests,
        }
        if drain_requests:
            out["requests"] = list(self.requests)
            self.requests.clear()
        return out
