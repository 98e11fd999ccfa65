"""Methods the plugin adds to vLLM's workers of routed models (``worker_extension_cls``),
called from the front end with ``collective_rpc("<name>", ...)``.

    llm.collective_rpc("ftp_routing_stats")            # -> [dict per rank]
    llm.collective_rpc("ftp_routing_stats", kwargs={"drain_requests": True})
"""

from __future__ import annotations

from typing import Any

from ftp_vllm.plugin.runtime import RoutingRuntime, get_runtime
from ftp_vllm.plugin.subset import BackendPolicy


def read_stats(worker: Any = None, reset: bool = False, drain_requests: bool = False):
    """The worker's routing statistics (None when the model is not routed).

    Usable as ``collective_rpc(read_stats)`` (callables need vLLM's insecure serialization)
    or through the worker extension method ``ftp_routing_stats``.
    """
    runtime = get_runtime()
    if runtime is None:
        return None
    out = runtime.stats.snapshot(drain_requests=drain_requests)
    if reset:
        runtime.stats.reset()
    return out


class FTPWorkerExtension:
    """Methods the plugin adds to vLLM workers of routed models (``worker_extension_cls``)."""

    def ftp_routing_stats(self, reset: bool = False, drain_requests: bool = False):
        return read_stats(self, reset=reset, drain_requests=drain_requests)

    def ftp_record_masks(self, on: bool = True) -> bool:
        """Tests: keep each routed request's [L, n_prompt] keep mask, by request id."""
        runtime = get_runtime()
        if runtime is None:
            return False
        runtime.stats.record_masks = on
        if not on:
            runtime.stats.masks.clear()
        return True

    def ftp_pop_masks(self) -> dict[str, list[list[bool]]]:
        runtime = get_runtime()
        if runtime is None:
            return {}
        masks = {k: v.tolist() for k, v in runtime.stats.masks.items()}
        runtime.stats.masks.clear()
        return masks

    def ftp_set_subset_policy(self, max_requests: int | None = None,
                              reusable: bool | None = None) -> bool:
        """Tests: replace the backend's subset-attention policy (virtual requests per build,
        metadata reuse), so the split path and the stateful-backend cache run on the CPU
        engine; no arguments restore the backend's own. False when the model is not
        routed."""
        runtime: RoutingRuntime | None = get_runtime()
        if runtime is None:
            return False
        if max_requests is None and reusable is None:
            runtime.policy_override = None
        else:
            runtime.policy_override = BackendPolicy(max_requests, bool(reusable))
        return True
