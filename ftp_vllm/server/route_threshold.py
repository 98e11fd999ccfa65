"""Route only where it pays: prompts shorter than a threshold are served dense.

Routing a short prompt costs more (router, gather/scatter, subset attention metadata, an eager
step) than skipping its blocks saves. The start-up self-benchmark measures dense against
routed prefill at a few prompt lengths on this machine (``break_even``); prompts shorter than
the shortest length from which routing paid at every longer measured length are served dense
(``--route-min-tokens``: ``auto`` by default, a number to fix it, 0 to route every prompt).

The rule runs in the API server, on each request as the engine receives it (``DenseBelow``
wraps the engine client's ``add_request_async``): the prompt is tokenized by then. A request
without its own ``ftp_sparsity`` and with a shorter prompt gets ``ftp_sparsity = 0`` written
into its ``extra_args``, so the scheduler (prefix-cache keys) and the workers read one and
the same target. A request that sets ``ftp_sparsity`` itself is left alone, and so is one
asking for prompt log-probabilities (already dense unless it sets a target).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ftp_vllm.contract import SPARSITY_KEY

AUTO = "auto"
BREAK_EVEN_LENGTHS = (64, 128, 256, 512)  # prompt lengths the start-up sweep measures


def parse_min_tokens(value: str) -> str | int:
    """``--route-min-tokens``: ``auto`` or a number of tokens >= 0 (argparse type)."""
    import argparse

    if value == AUTO:
        return AUTO
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(
            f"must be '{AUTO}' or a number of prompt tokens >= 0 (0 routes every prompt), "
            f"got {value!r}")
    return n


def threshold_from_speedups(speedups: Mapping[int, float]) -> int:
    """The shortest measured length from which routing paid (speedup > 1) at every longer
    measured length; the longest measured length when it did not pay there either (longer
    prompts gain more, every measurement so far says so). 0 when nothing was measured."""
    lengths = sorted(speedups)
    if not lengths:
        return 0
    threshold = lengths[-1]
    for n in reversed(lengths):
        if speedups[n] <= 1.0:
            break
        threshold = n
    return threshold


class DenseBelow:
    """Writes ``ftp_sparsity = 0`` into requests whose prompt is shorter than ``min_tokens``
    (see the module doc); ``on_dense`` is called once per such request."""

    def __init__(self, min_tokens: int = 0, on_dense: Callable[[], None] | None = None):
        self.min_tokens = int(min_tokens)
        self.on_dense = on_dense

    def apply(self, request: Any) -> None:
        params = getattr(request, "sampling_params", None)
        ids = getattr(request, "prompt_token_ids", None)
        if params is None or ids is None or len(ids) >= self.min_tokens:
            return
        extra = params.extra_args or {}
        if SPARSITY_KEY in extra or params.prompt_logprobs is not None:
            return
        params.extra_args = {**extra, SPARSITY_KEY: 0.0}  # a copy: n>1 children share dicts
        if self.on_dense is not None:
            self.on_dense()

    def install(self, engine_client: Any) -> None:
        """Apply the rule to every request the engine client hands to its engine core."""
        core = engine_client.engine_core
        add = core.add_request_async

        async def add_request_async(request: Any, *args: Any, **kwargs: Any) -> Any:
            self.apply(request)
            return await add(request, *args, **kwargs)

        core.add_request_async = add_request_async
