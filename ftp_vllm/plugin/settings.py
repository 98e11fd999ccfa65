"""What a routed model routes with: its artifact and default target, read from the model's
(overridden) HF config. One type for the whole product: the config hook and the worker read
it from ``hf_overrides``, the server (``ftp_vllm.server.settings.Routing``) holds the same.
No vLLM import: the server resolves settings before any engine exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftp_vllm.artifact import RouterArtifact, load_artifact
from ftp_vllm.contract import FINGERPRINT_KEYS, ROUTER_KEY, SPARSITY_KEY


@dataclass(frozen=True)
class RoutingSettings:
    artifact_path: Path
    sparsity: float  # default mean sparsity for requests that do not ask for their own
    artifact: RouterArtifact

    @property
    def max_sparsity(self) -> float:
        """The highest target the artifact was tuned for."""
        return self.artifact.schedule.max_target


def routing_settings(hf_config: Any) -> RoutingSettings:
    """Read and check the routing options of a routed model's (overridden) HF config."""
    path = getattr(hf_config, ROUTER_KEY, None)
    if not path:
        raise ValueError(
            f"routed architecture {getattr(hf_config, 'architectures', None)} needs "
            f"hf_overrides['{ROUTER_KEY}'] (the router artifact folder); to serve the model "
            "without routing, drop the overrides (use its vanilla architecture)"
        )
    artifact = load_artifact(path)
    shape = {k: _cfg_get(hf_config, k) for k in FINGERPRINT_KEYS}
    if shape["num_key_value_heads"] is None:
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    artifact.check_model(shape, path)  # the weights' hash is checked in the worker
    raw = getattr(hf_config, SPARSITY_KEY, 0.0)
    try:
        sparsity = artifact.schedule.validate(raw)
    except ValueError as e:
        raise ValueError(f"hf_overrides['{SPARSITY_KEY}']: {e} ({path})") from None
    return RoutingSettings(Path(path), sparsity, artifact)


def _cfg_get(cfg: Any, key: str) -> Any:
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return getattr(cfg, key, None)
