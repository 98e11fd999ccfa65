"""Engine-core scheduler for window routing (docs/ROUTER.md, "Serving inside vLLM").

Window routing decides each aligned window of prompt positions from the window and what
precedes it, so a routed prompt may be prefilled in chunks and reuse cached prefixes, as long
as no step splits a window whose decisions read its tokens. vLLM's scheduler, with these
changes for routed requests only (dense ones are scheduled exactly as vanilla):

- a prefill chunk that stops inside the prompt stops at a window boundary (vLLM's own
  block-aligned split hook, used for Mamba models, is the place), unless the router decides
  from positions only (the static router): then the worker decides a window split over two
  steps from the whole window's positions in each, and chunks end where vLLM ends them;
- a prefix-cache hit is cut back to a window boundary;
- the request's ``cache_salt`` gains its routing configuration (artifact, target), so cached
  blocks are only shared by requests routed the same way, and never with dense ones;
- the blocks from the prompt's last window on (decided by the prompt's last token; generated
  tokens run dense) get a key of their own that names that window, so only a request with the
  same prompt end reuses them: a longer prompt continuing the same text (the next turn of a
  chat) computes them as its own full windows, as a cold run would.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from ftp_vllm.contract import request_sparsity
from ftp_vllm.plugin.settings import routing_settings

logger = init_logger("vllm.ftp_vllm")

_TARGET = "_ftp_target"  # attribute cached on each vLLM Request


class _WindowScheduling:
    """Mixed into vLLM's Scheduler / AsyncScheduler (``WindowScheduler`` picks which)."""

    def _ftp_setup(self) -> None:
        settings = routing_settings(self.vllm_config.model_config.hf_config)
        artifact = settings.artifact
        self.ftp_window = int(artifact.window)
        self.ftp_max = settings.max_sparsity
        self.ftp_default = settings.sparsity
        self.ftp_key = routing_key(settings.artifact_path, self.ftp_window)
        self.ftp_hit_unit = math.lcm(self.ftp_window, int(self.block_size))
        # Chunk ends go through our split unless the router reads positions only: then a
        # window computed over two steps is decided as a whole in each (runtime.py).
        self.ftp_split_windows = bool(artifact.router.position_only)
        self.need_mamba_block_aligned_split = not self.ftp_split_windows
        logger.info(
            "FTP routing: window routing over %d-token windows; chunked prefill %s (%s), "
            "prefix caching %s", self.ftp_window,
            "on" if self.scheduler_config.enable_chunked_prefill else "off",
            "chunks end anywhere: the router reads positions only" if self.ftp_split_windows
            else "routed chunks end on window boundaries",
            "on" if self.cache_config.enable_prefix_caching else "off",
        )

    def ftp_target(self, request: Any) -> float:
        """The request's mean target (0: dense), as the worker computes it."""
        target = getattr(request, _TARGET, None)
        if target is None:
            params = request.sampling_params
            try:
                target = request_sparsity(
                    getattr(params, "extra_args", None), self.ftp_max, self.ftp_default,
                    prompt_logprobs=getattr(params, "prompt_logprobs", None) is not None)
            except ValueError:
                target = 0.0  # the worker serves it dense (and says why)
            setattr(request, _TARGET, target)
        return target

    def add_request(self, request: Any) -> None:
        if request.request_id not in self.requests and self.ftp_target(request) > 0:
            salt = f"ftp-vllm:{self.ftp_key}:{self.ftp_target(request)!r}"
            request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
            if request._block_hasher is not None:  # noqa: SLF001 (vLLM's Request holds it)
                request._block_hasher = tail_keyed(
                    request._block_hasher, int(self.hash_block_size), self.ftp_window,
                    request.prompt_token_ids)
            request.block_hashes = []
            request.update_block_hashes()
        super().add_request(request)

    def _mamba_block_aligned_split(self, request: Any, num_new_tokens: int,
                                   num_new_local_computed_tokens: int = 0,
                                   num_external_computed_tokens: int = 0) -> int:
        if self.ftp_target(request) <= 0:
            return num_new_tokens
        start = (request.num_computed_tokens + num_new_local_computed_tokens
                 + num_external_computed_tokens)
        end = start + num_new_tokens
        if end >= request.num_prompt_tokens:
            return num_new_tokens
        aligned = end // self.ftp_window * self.ftp_window
        if aligned > start:
            return aligned - start
        # Too little budget left this step to reach the next window boundary: wait for a
        # step that has it, unless no step ever does (then the worker runs the split window
        # dense and counts it).
        limit = self.max_num_scheduled_tokens
        if self.scheduler_config.long_prefill_token_threshold > 0:
            limit = min(limit, self.scheduler_config.long_prefill_token_threshold)
        reach = min(aligned + self.ftp_window, request.num_prompt_tokens) - start
        return 0 if reach <= limit else num_new_tokens

    def _get_local_prefix_cache_hit(self, request: Any):
        blocks, hit, boundary, diverged = super()._get_local_prefix_cache_hit(request)
        if hit % self.ftp_hit_unit and self.ftp_target(request) > 0:
            hit = hit // self.ftp_hit_unit * self.ftp_hit_unit
            num_blocks = hit // int(self.block_size)
            blocks = KVCacheBlocks(tuple(list(group[:num_blocks]) for group in blocks.blocks))
        return blocks, hit, boundary, diverged


class _SyncWindowScheduler(_WindowScheduling, Scheduler):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._ftp_setup()


class _AsyncWindowScheduler(_WindowScheduling, AsyncScheduler):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._ftp_setup()


class WindowScheduler:
    """``scheduler_cls`` for window routing: vLLM's scheduler (async when the engine
    schedules asynchronously, decided after the config hook runs) with the changes above."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Scheduler:
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        base = (_AsyncWindowScheduler if vllm_config.scheduler_config.async_scheduling
                else _SyncWindowScheduler)
        return base(*args, **kwargs)


def tail_keyed(hasher: Callable[[Any], list[bytes]], hash_block_size: int, window: int,
               prompt: Sequence[int]) -> Callable[[Any], list[bytes]]:
    """A request's block hasher whose blocks reaching past ``stable`` (the start of the
    prompt's last window) are keyed by that window's tokens and the prompt length too.

    Before ``stable`` a token's K/V depend only on the tokens up to its window's end, so a
    block there is valid for any prompt that shares its tokens (vLLM's chained hash says
    exactly that). From ``stable`` on they also depend on where the prompt ends: the last
    window is decided by the prompt's last token, and generated tokens run dense. Parent
    hashes chain, so every later block differs as well."""
    n = len(prompt)
    stable = (n - 1) // window * window
    tail = hashlib.sha256(json.dumps([n, list(prompt[stable:])]).encode()).digest()

    def keyed(request: Any) -> list[bytes]:
        first = len(request.block_hashes)
        out = []
        for i, h in enumerate(hasher(request)):
            if (first + i + 1) * hash_block_size > stable:
                h = hashlib.sha256(bytes(h) + tail).digest()
            out.append(h)
        return out

    return keyed


def routing_key(artifact_path: Any, window: int) -> str:
    """A short digest of the artifact's files and window: the prefix-cache key part that
    keeps requests routed by different artifacts apart."""
    h = hashlib.sha256(json.dumps({"window": window}).encode())
    root = Path(artifact_path)
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
