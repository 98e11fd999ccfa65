"""Engine-config hook for routed architectures (runs in the front end, at config time).

vLLM calls ``verify_and_update_config`` for architectures listed in MODELS_CONFIG_MAP while
it builds the VllmConfig, before the platform hook and before any worker starts. Here the
plugin checks the routing options (a bad artifact or sparsity fails engine creation with the
reason), refuses what routed layers cannot serve (the table in ``refusals.py``: pipeline and
context parallelism, KV connectors and offloading, quantized KV caches) and switches off what
routed prefill cannot serve consistently, saying why. ``window`` routing artifacts keep
vLLM's chunked prefill, prefix caching and token budget (the window scheduler,
``scheduler.py``, aligns chunks and cache hits); ``exact`` ones switch the first two off.
"""

from __future__ import annotations

import os
from typing import Any

from vllm.logger import init_logger

from ftp_vllm.contract import STATS_METHOD
from ftp_vllm.plugin.refusals import check_config
from ftp_vllm.plugin.settings import routing_settings

logger = init_logger("vllm.ftp_vllm")  # a child of vLLM's logger: same handlers

WORKER_EXTENSION = "ftp_vllm.plugin.worker.FTPWorkerExtension"
WINDOW_SCHEDULER = "ftp_vllm.plugin.scheduler.WindowScheduler"


def _use_v1_model_runner() -> None:
    """The per-request hook wraps the V1 model runner (the only one on CPU; GPU images with
    Triton default to V2): pin V1 before workers start. Workers inherit the environment."""
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if value is not None and value.strip().lower() in ("1", "true"):
        raise ValueError(
            "FTP routing needs vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER"
        )
    if value is None:
        logger.info("FTP routing: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


class FTPRoutingConfig:
    """MODELS_CONFIG_MAP entry for the routed architectures (vLLM's VerifyAndUpdateConfig)."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        model_config = vllm_config.model_config
        settings = routing_settings(model_config.hf_config)
        logger.info(
            "FTP routing on: router %s (%s), default sparsity %.3g, artifact tuned up to %.3g",
            settings.artifact_path, settings.artifact.kind, settings.sparsity,
            settings.artifact.schedule.max_target,
        )
        check_config(vllm_config)  # refusals (ftp_vllm.plugin.refusals): fail before changes
        if settings.artifact.window:
            _use_window_scheduler(vllm_config, settings.artifact_path, settings.artifact.window)
        else:
            _serve_whole_prompts(vllm_config)
        if not model_config.enforce_eager:
            dense = ("eager: the router reads attention scores" if
                     settings.artifact.router.needs_scores else
                     "compiled with dynamic token counts")
            logger.info(
                "FTP routing: steps that route prompt tokens run the routed layers (dense parts "
                "%s; routing, gathers and subset attention eager: a data-dependent number of "
                "kept tokens per layer does not trace into vLLM's graph); every other step "
                "(decode, dense requests) runs vLLM's compiled model.", dense
            )
        _use_v1_model_runner()
        pc = vllm_config.parallel_config
        if not pc.worker_extension_cls:
            pc.worker_extension_cls = WORKER_EXTENSION
        elif pc.worker_extension_cls != WORKER_EXTENSION:
            logger.warning(
                "FTP routing: worker_extension_cls=%s is set, so collective_rpc('%s') is "
                "unavailable; read stats with collective_rpc(ftp_vllm.plugin.worker.read_stats)",
                pc.worker_extension_cls, STATS_METHOD,
            )


def _use_window_scheduler(vllm_config: Any, artifact_path: Any, window: int) -> None:
    """Window routing: vLLM's scheduler with chunks and cache hits aligned to windows, so
    every step holds whole windows; a step budget below one window could not."""
    sched = vllm_config.scheduler_config
    if sched.scheduler_cls not in (None, WINDOW_SCHEDULER):
        raise ValueError(
            f"FTP window routing ({artifact_path}) schedules with its own scheduler, but "
            f"scheduler_cls={sched.scheduler_cls!r} is set; drop --scheduler-cls"
        )
    for name, flag in (("max_num_batched_tokens", "--max-num-batched-tokens"),
                       ("long_prefill_token_threshold", "--long-prefill-token-threshold")):
        value = getattr(sched, name, 0) or 0
        if 0 < value < window:
            raise ValueError(
                f"FTP window routing ({artifact_path}) routes whole {window}-token windows, "
                f"but {name}={value} lets a step hold less than one; set {flag} >= {window}"
            )
    sched.scheduler_cls = WINDOW_SCHEDULER


def _serve_whole_prompts(vllm_config: Any) -> None:
    """Exact routing: a routed prompt must be prefilled whole and never reuse cached K/V."""
    model_config = vllm_config.model_config
    sched = vllm_config.scheduler_config
    cache = vllm_config.cache_config
    if sched.enable_chunked_prefill:
        logger.warning(
            "FTP routing: chunked prefill switched off. Exact routing decisions depend on "
            "the whole prompt (its last token's query, score ranks, length-normalised "
            "positions), so a chunk cannot be routed as the full prompt would be."
        )
        sched.enable_chunked_prefill = False
    if sched.max_num_batched_tokens < model_config.max_model_len:
        logger.warning(
            "FTP routing: max_num_batched_tokens raised from %d to max_model_len=%d so "
            "that any prompt fits one step without chunking.",
            sched.max_num_batched_tokens, model_config.max_model_len,
        )
        sched.max_num_batched_tokens = model_config.max_model_len
    if cache.enable_prefix_caching:
        logger.warning(
            "FTP routing: prefix caching switched off. A cached prefix holds K/V computed "
            "under another prompt's routing decisions, which differ from this prompt's."
        )
        cache.enable_prefix_caching = False
