"""The contract between the API server, the vLLM plugin, router artifacts and clients: config
keys, RPC names, routed architectures, the model-fingerprint keys, the shipped artifact names,
and the one rule for a request's target sparsity.

A leaf module (standard library only, nothing of ours): every other module takes these names
from here, so the server's request check and the worker's reading of
``SamplingParams.extra_args`` are the same function and cannot drift.

The rule for ``ftp_sparsity`` in a request (``{"vllm_xargs": {"ftp_sparsity": 0.2}}`` over
HTTP, ``SamplingParams(extra_args={"ftp_sparsity": 0.2})`` in Python):

- absent: the server's default target;
- ``null`` / ``None`` or ``0``: dense (the request is not routed);
- a number (JSON number; Python int or float, not bool) in ``[0, max]``, ``max`` being the
  highest target the served router artifact was tuned for (always below 1);
- anything else is refused: numeric strings (``"0.2"``), booleans, NaN, infinities,
  negatives, values above ``max``. The server answers HTTP 400 with the message; an offline
  engine serves the request dense and logs the message once.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from typing import Any

SPARSITY_KEY = "ftp_sparsity"  # per-request target (extra_args / vllm_xargs), also hf_config
ROUTER_KEY = "ftp_router"  # hf_config key: the router artifact folder
XARGS_KEY = "vllm_xargs"  # the OpenAI request field vLLM copies into SamplingParams.extra_args
STATS_METHOD = "ftp_routing_stats"  # worker method read with collective_rpc

# Routed architecture -> (the plugin's "module:Class", the vanilla architecture it routes)
ARCHITECTURES = {
    "FTPLlamaForCausalLM": ("ftp_vllm.plugin.models:FTPLlamaForCausalLM", "LlamaForCausalLM"),
    "FTPQwen2ForCausalLM": ("ftp_vllm.plugin.models:FTPQwen2ForCausalLM", "Qwen2ForCausalLM"),
}
MODEL_TYPES = {"llama": "FTPLlamaForCausalLM", "qwen2": "FTPQwen2ForCausalLM"}  # HF model_type

# The HF config keys that, with a hash of the final norm, identify the model an artifact is for.
FINGERPRINT_KEYS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "vocab_size",
)

# Router artifacts shipped inside the package (ftp_vllm/artifacts/) for the default model.
SHIPPED_ARTIFACT = "smollm2-135m-instruct-window"  # served by default: window routing
EXACT_ARTIFACT = "smollm2-135m-instruct"  # FTP as published: trained MLP router, exact routing
STATIC_ARTIFACT = "smollm2-135m-instruct-static"  # training-free static router (fallback)
TOLERANCE = 1e-9  # a target equal to the maximum up to float noise is the maximum


def _show(value: Any) -> str:
    """The value as a JSON client wrote it (``"0.2"``, ``true``, ``NaN``), else repr."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def validate_sparsity(value: Any, max_sparsity: float) -> float:
    """A request's raw ``ftp_sparsity`` value as a float in [0, max_sparsity] (None -> 0.0).

    Raises ValueError saying what was wrong and what is accepted. ``max_sparsity`` 0 means
    routing is off: only 0 and None pass.
    """
    if value is None:
        return 0.0
    hi = min(float(max_sparsity), 1.0)
    allowed = (f"a number in [0, {hi:g}] (0 or null: dense)" if hi > 0
               else "0 or null (dense): FTP routing is off here")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = ""
        if isinstance(value, str):
            try:
                hint = f" (a string: send the number {float(value):g} without quotes)"
            except ValueError:
                hint = " (a string)"
        raise ValueError(f"{SPARSITY_KEY} must be {allowed}, got {_show(value)}{hint}")
    if not isinstance(value, numbers.Integral) and not math.isfinite(float(value)):
        raise ValueError(f"{SPARSITY_KEY} must be {allowed}, got {_show(value)}")
    if not (0 <= value <= hi + TOLERANCE and value < 1):
        where = ("the range the served router artifact was tuned for" if hi > 0
                 else "this server runs without FTP routing")
        raise ValueError(f"{SPARSITY_KEY}={_show(value)} is outside [0, {hi:g}], {where}")
    return float(value)


def request_sparsity(extra_args: Mapping[str, Any] | None, max_sparsity: float,
                     default: float, prompt_logprobs: bool = False) -> float:
    """A request's target from its extra arguments (``vllm_xargs`` / ``extra_args``).

    Absent key -> ``default``, or 0 (dense) for a request that asks for prompt
    log-probabilities (``prompt_logprobs``, ``echo`` with ``logprobs``): a skipped token's
    prompt log-probability comes from a partly processed state, so only a request that sets
    its own target gets one. Otherwise ``validate_sparsity`` (ValueError if refused).
    """
    if not extra_args or SPARSITY_KEY not in extra_args:
        return 0.0 if prompt_logprobs else float(default)
    return validate_sparsity(extra_args[SPARSITY_KEY], max_sparsity)


__all__ = [
    "ARCHITECTURES", "EXACT_ARTIFACT", "FINGERPRINT_KEYS", "MODEL_TYPES", "ROUTER_KEY",
    "SHIPPED_ARTIFACT",
    "SPARSITY_KEY", "STATIC_ARTIFACT", "STATS_METHOD", "TOLERANCE", "XARGS_KEY",
    "request_sparsity", "validate_sparsity",
]
