"""vLLM plugin: routed Llama / Qwen2 architectures that serve FTP token routing.

Entry point (pyproject.toml): ``vllm.general_plugins: ftp_vllm = "ftp_vllm.plugin:register"``.
vLLM runs ``register()`` in every process (front end and workers). It only registers names;
nothing changes for a model unless its config asks for a routed architecture:

    hf_overrides = {"architectures": ["FTPLlamaForCausalLM"],
                    "ftp_router": "<router artifact folder>", "ftp_sparsity": 0.3}

``routing_overrides(artifact, sparsity)`` builds that dict. Without it vLLM is vanilla.
Per request: ``SamplingParams(extra_args={"ftp_sparsity": 0.2})`` (0 = dense).
Statistics: ``llm.collective_rpc("ftp_routing_stats")`` (see ``stats.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftp_vllm.contract import ARCHITECTURES, MODEL_TYPES, ROUTER_KEY, SPARSITY_KEY, STATS_METHOD

if TYPE_CHECKING:
    from ftp_vllm.artifact import RouterArtifact

_registered = False


def register() -> None:
    """Register the routed architectures and their config hook (idempotent, cheap)."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from ftp_vllm.plugin.config import FTPRoutingConfig

    for arch, (target, _) in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
        MODELS_CONFIG_MAP[arch] = FTPRoutingConfig
    _registered = True


def routing_overrides(
    artifact_path: str | Path, sparsity: float, architecture: str | None = None,
    artifact: RouterArtifact | None = None,
) -> dict[str, Any]:
    """The ``hf_overrides`` that turn routing on: ``LLM(model, hf_overrides=...)``.

    The routed architecture follows the artifact's model type (llama or qwen2) unless given.
    Raises ArtifactError for a bad artifact and ValueError for an out-of-range sparsity, so
    mistakes show before an engine starts.
    """
    from ftp_vllm.artifact import load_artifact

    if artifact is None:  # a caller that has loaded it already passes it (one load, one check)
        artifact = load_artifact(artifact_path)
    sparsity = artifact.schedule.validate(sparsity)
    if architecture is None:
        model_type = artifact.fingerprint.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"router artifact {artifact_path}: model type {model_type!r} has no routed "
                f"architecture (supported: {sorted(MODEL_TYPES)})"
            )
        architecture = MODEL_TYPES[model_type]
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown routed architecture {architecture!r}: {sorted(ARCHITECTURES)}")
    return {
        "architectures": [architecture],
        ROUTER_KEY: str(Path(artifact_path).resolve()),
        SPARSITY_KEY: sparsity,
    }


__all__ = [
    "ARCHITECTURES", "ROUTER_KEY", "SPARSITY_KEY", "STATS_METHOD", "register",
    "routing_overrides",
]
