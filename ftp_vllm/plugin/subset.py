"""Subset attention for a routed layer: virtual requests, per-build limits, metadata reuse.

A routed layer runs attention for its kept queries only. Each run of consecutive kept tokens
of one request becomes a *virtual request* (its query = the run, its keys = the request's
positions up to the run's last token; kernels align queries bottom-right, so causality
holds). This module holds the backend-independent parts, with no vLLM import:

- ``kept_runs``: the virtual requests of a keep mask;
- ``split_runs``: groups of at most ``limit`` virtual requests, one backend build and one
  attention call each, because some builders size persistent buffers by a request count
  (``backend_policy`` says which, from reading vLLM 0.32's builders);
- ``MetadataCache``: when a built metadata object may be reused by a later layer.

What each vLLM 0.32 builder reads from ``CommonAttentionMetadata`` and keeps between builds
(``vllm/v1/attention/backends/``), and what follows for the routed layer:

- FLASHINFER (``FlashInferMetadataBuilder.build``): num_reqs, num_actual_tokens, causal,
  max_query_len and query_start_loc_cpu (decode/prefill split: a leading run of length 1 is a
  "decode" for its decode wrapper, the rest go through the prefill wrapper, both correct for a
  bottom-right-aligned query), max_seq_len, seq_lens, seq_lens_cpu_upper_bound (exact here,
  used instead of a device sync), block_table_tensor, query_start_loc, slot_mapping; DCP
  fields only with context parallelism (refused at start-up). Persistent buffers
  ``paged_kv_indptr`` [max_num_seqs + 1], ``paged_kv_last_page_len`` [max_num_seqs] and
  ``paged_kv_indices`` [max_num_seqs * pages per max_model_len]: at most ``max_num_seqs``
  virtual requests per build. Stateful: every build re-plans the builder's one prefill
  wrapper (and one decode wrapper) and the metadata only points at the wrapper, so a metadata
  object is valid only until the builder's next build.
- FLASH_ATTN (``FlashAttentionMetadataBuilder.build``): num_reqs, num_actual_tokens,
  max_query_len, max_seq_len, query_start_loc, seq_lens, block_table_tensor, slot_mapping,
  causal (bool, or an int32 tensor), mm_req_doc_ranges and rswa_prefix_lens (None for text
  Llama/Qwen2), query_start_loc_cpu and seq_lens_cpu_upper_bound (DCP only). Persistent
  buffers only with full CUDA graphs + FA3 AOT scheduling (``scheduler_metadata``, sized by
  max(max_num_seqs, largest capture size)) or DCP (``_dcp_context_kv_lens``, max_num_seqs):
  then both the request limit and statefulness apply. Routing steps run outside CUDA graphs,
  so normally neither does.
- TRITON_ATTN (``TritonAttentionMetadataBuilder.build``): num_reqs, num_actual_tokens,
  max_query_len, max_seq_len, query_start_loc, seq_lens, block_table_tensor, slot_mapping,
  causal, mm_req_doc_ranges, rswa_prefix_lens. Its softmax scratch buffers are shared by every
  metadata object but only live inside one kernel launch (used by the 3D decode kernel, only
  when num_seqs <= their row count), so no request limit and reuse is safe; R-SWA models
  (not Llama/Qwen2) copy into a persistent [max_num_seqs] buffer.
- CPU_ATTN (``CPUAttentionMetadataBuilder.build``): num_reqs, num_actual_tokens,
  max_query_len, max_seq_len, query_start_loc, seq_lens, block_table_tensor, slot_mapping,
  causal; the scheduler metadata is a fresh tensor per build. No limit, reuse is safe.
- Any other backend: at most ``max_num_seqs`` virtual requests (what the engine's own
  builds never exceed) and no reuse beyond the last build.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class KeptRuns:
    """The virtual requests of one keep mask, over the step's flattened tokens."""

    kept: np.ndarray  # [K] int64 flattened indices of kept tokens
    run_start: np.ndarray  # [V] first index into `kept` of each run
    run_len: np.ndarray  # [V] tokens per run
    run_req: np.ndarray  # [V] batch index of each run's request
    run_seq: np.ndarray  # [V] keys each run attends to: its last position + 1

    @property
    def num_runs(self) -> int:
        return len(self.run_len)


def kept_runs(keep_all: np.ndarray, tok_req: np.ndarray, tok_pos: np.ndarray) -> KeptRuns:
    """One virtual request per run of consecutive kept tokens of one request (none when no
    token is kept: a step of middle chunks at a block that skips all it may)."""
    kept = np.flatnonzero(keep_all)
    if len(kept) == 0:
        return KeptRuns(kept, kept, kept, kept, kept)
    req = tok_req[kept]
    new_run = np.ones(len(kept), dtype=bool)
    new_run[1:] = (np.diff(kept) != 1) | (np.diff(req) != 0)
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], len(kept)) - 1
    return KeptRuns(
        kept=kept,
        run_start=starts,
        run_len=ends - starts + 1,
        run_req=req[starts],
        run_seq=tok_pos[kept[ends]] + 1,
    )


def split_runs(num_runs: int, limit: int | None) -> list[tuple[int, int]]:
    """[lo, hi) ranges of consecutive runs, at most `limit` runs each (None: one range).

    Each range becomes one build and one attention call. Every query of a virtual request
    attends to its own keys only, so splitting the batch of virtual requests changes no
    result; merging runs instead would compute the skipped tokens between them.
    """
    if num_runs <= 0:
        return []
    if limit is None or num_runs <= limit:
        return [(0, num_runs)]
    if limit < 1:
        raise ValueError(f"a build must take at least one virtual request, got limit {limit}")
    return [(lo, min(lo + limit, num_runs)) for lo in range(0, num_runs, limit)]


@dataclass(frozen=True)
class BackendPolicy:
    """How the routed layer may use one backend's metadata builder."""

    max_requests: int | None  # virtual requests per build; None: no limit
    reusable: bool  # a built metadata object stays valid after later builds

    def describe(self) -> str:
        limit = "no limit" if self.max_requests is None else f"<= {self.max_requests}"
        reuse = "reused across layers" if self.reusable else "valid until the next build"
        return f"virtual requests per build {limit}, metadata {reuse}"


def backend_policy(backend_name: str, builder: Any, max_num_seqs: int) -> BackendPolicy:
    """The policy for vLLM 0.32's builder of `backend_name` (see the module docstring)."""
    name = backend_name.upper()
    if name == "CPU_ATTN":
        return BackendPolicy(None, True)
    if name == "TRITON_ATTN":
        rswa = getattr(builder, "persistent_rswa_prefix_lens", None)
        if rswa is not None:
            return BackendPolicy(int(rswa.shape[0]), False)
        return BackendPolicy(None, True)
    if name == "FLASH_ATTN":
        limits = []
        sched = getattr(builder, "scheduler_metadata", None)
        if sched is not None:  # full CUDA graphs + FA3: 1 + round_up(batch, 4) * 4 ints
            limits.append((int(sched.shape[0]) - 1) // 4)
        for attr in ("_dcp_context_kv_lens", "persistent_rswa_prefix_lens"):
            buf = getattr(builder, attr, None)
            if buf is not None:
                limits.append(int(buf.shape[0]))
        if limits:
            return BackendPolicy(min(limits), False)
        return BackendPolicy(None, True)
    if name == "FLASHINFER":
        return BackendPolicy(int(getattr(builder, "max_num_reqs", max_num_seqs)), False)
    return BackendPolicy(int(max_num_seqs), False)


class MetadataCache:
    """A step's built subset metadata, reused by later layers only when still valid.

    Reusable backends keep every build of the step, keyed by (keep mask, request range).
    Stateful ones (FlashInfer: one wrapper re-planned per build) keep only the latest build:
    a later layer reuses it only when it asks for the same key right after, as layers with
    equal masks do (the static router with a uniform schedule builds once per request range
    per step); pattern A, B, A builds A again.
    """

    def __init__(self, reusable: bool):
        self.reusable = reusable
        self.builds = 0
        self._entries: dict[Hashable, Any] = {}
        self._last_key: Hashable | None = None

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        if key in self._entries and (self.reusable or key == self._last_key):
            return self._entries[key]
        meta = build()
        self.builds += 1
        if not self.reusable:
            self._entries.clear()
        self._entries[key] = meta
        self._last_key = key
        return meta
