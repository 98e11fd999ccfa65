"""Which model, router artifact and default sparsity `ftp-vllm serve` serves.

Precedence, highest first:
- routing off: ``--no-routing`` (the model is served by vanilla vLLM);
- ``--hf-overrides`` naming a routed architecture: the caller manages routing (then
  ``--router``/``--sparsity`` must not be given);
- router artifact: ``--router``, else ``$FTP_VLLM_ROUTER``, else, for the default model only,
  the shipped artifact ``ftp_vllm/artifacts/smollm2-135m-instruct`` (falling back, with a
  warning, to ``smollm2-135m-instruct-static``); none of them: served dense, said loudly;
- default target sparsity: ``--sparsity``, else ``$FTP_VLLM_SPARSITY``, else 0.3 (capped to
  the artifact's maximum when it tops out lower).

No vLLM import here: this runs before the engine exists and in unit tests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftp_vllm.contract import (
    ARCHITECTURES,
    ROUTER_KEY,
    SHIPPED_ARTIFACT,
    SPARSITY_KEY,
    STATIC_ARTIFACT,
)

if TYPE_CHECKING:
    from ftp_vllm.plugin.settings import RoutingSettings

ENV_ROUTER = "FTP_VLLM_ROUTER"
ENV_SPARSITY = "FTP_VLLM_SPARSITY"
DEFAULT_SPARSITY = 0.3


class ServeConfigError(ValueError):
    """A serve setting that cannot work; the message says which and how to fix it."""


@dataclass
class Routing:
    """What the server routes with: the plugin's own ``RoutingSettings`` (None: served dense),
    plus where they came from and what to say about them at start-up."""

    settings: RoutingSettings | None = None
    source: str = ""  # where the router came from (flag, env, shipped, hf-overrides)
    notes: list[str] = field(default_factory=list)  # messages to log at start-up

    @property
    def enabled(self) -> bool:
        return self.settings is not None

    @property
    def router(self) -> Path | None:
        return self.settings.artifact_path if self.settings else None

    @property
    def sparsity(self) -> float:
        """The server's default target (0 when routing is off)."""
        return self.settings.sparsity if self.settings else 0.0

    @property
    def max_sparsity(self) -> float:
        """The highest per-request target allowed (0 when routing is off)."""
        return self.settings.max_sparsity if self.settings else 0.0

    @property
    def kind(self) -> str | None:
        return self.settings.artifact.kind if self.settings else None

    def describe(self) -> str:
        if not self.enabled:
            return "FTP routing off: the model is served dense"
        return (f"FTP routing on: router {self.router} ({self.kind}, from {self.source}), "
                f"default sparsity {self.sparsity:g}, per-request range [0, "
                f"{self.max_sparsity:g}]")


def artifacts_dir() -> Path:
    from ftp_vllm.artifact import SHIPPED_DIR

    return Path(SHIPPED_DIR)


def shipped_router() -> tuple[Path | None, list[str]]:
    """The shipped router artifact for the default model (or its static fallback)."""
    base = artifacts_dir()
    main, fallback = base / SHIPPED_ARTIFACT, base / STATIC_ARTIFACT
    if (main / "router.json").exists():
        return main, []
    if (fallback / "router.json").exists():
        return fallback, [
            f"the shipped router artifact {main} is missing; using the training-free static "
            f"router {fallback} instead (pass --router or {ENV_ROUTER} to choose another)"
        ]
    return None, [
        f"no router artifact ships with this build ({main} is missing, and so is the static "
        f"fallback {fallback}): the model is served DENSE. Pass --router <artifact folder> or "
        f"set {ENV_ROUTER}."
    ]


def _parse_sparsity(raw: Any, where: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ServeConfigError(f"{where}: sparsity must be a number, got {raw!r}") from None
    if not 0.0 <= value < 1.0:
        raise ServeConfigError(f"{where}: sparsity must lie in [0, 1), got {value:g}")
    return value


def resolve_routing(
    *,
    model_given: bool,
    router: str | None = None,
    sparsity: float | None = None,
    no_routing: bool = False,
    hf_overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Routing, dict[str, Any] | None]:
    """(routing, hf_overrides to pass to vLLM). Raises ServeConfigError with the fix."""
    from ftp_vllm.artifact import load_artifact
    from ftp_vllm.plugin import routing_overrides
    from ftp_vllm.plugin.settings import RoutingSettings

    env = os.environ if env is None else env
    overrides = dict(hf_overrides) if hf_overrides else None
    archs = (overrides or {}).get("architectures") or []
    user_routed = any(a in ARCHITECTURES for a in archs)

    if no_routing:
        if router is not None or sparsity is not None:
            raise ServeConfigError("--no-routing cannot be combined with --router/--sparsity")
        if user_routed:
            raise ServeConfigError(
                "--no-routing conflicts with --hf-overrides naming a routed architecture "
                f"{archs}")
        return Routing(source="--no-routing"), overrides

    if user_routed:
        if router is not None or sparsity is not None:
            raise ServeConfigError(
                "--hf-overrides already names a routed architecture: give the router and "
                f"sparsity there ({ROUTER_KEY!r}, {SPARSITY_KEY!r}), not with --router/--sparsity")
        path = overrides.get(ROUTER_KEY)
        if not path:
            raise ServeConfigError(f"--hf-overrides names {archs} but no {ROUTER_KEY!r}")
        art = load_artifact(path)
        value = art.schedule.validate(overrides.get(SPARSITY_KEY, 0.0))
        return Routing(RoutingSettings(Path(path), value, art), "--hf-overrides"), overrides

    notes: list[str] = []
    if router is not None:
        path, source = Path(router), "--router"
    elif env.get(ENV_ROUTER):
        path, source = Path(env[ENV_ROUTER]), ENV_ROUTER
    elif not model_given:
        path, notes = shipped_router()
        source = "the shipped artifact"
    else:
        path, source = None, ""
        notes.append(
            f"no router artifact given for this model (--router or {ENV_ROUTER}): the model is "
            "served dense")
    if path is None:  # the caller logs the notes (once)
        return Routing(source="no artifact", notes=notes), overrides

    art = load_artifact(path)  # ArtifactError names the file and the fix
    explicit = True
    if sparsity is not None:
        value = _parse_sparsity(sparsity, "--sparsity")
    elif env.get(ENV_SPARSITY, "").strip():
        value = _parse_sparsity(env[ENV_SPARSITY], ENV_SPARSITY)
    else:
        value, explicit = DEFAULT_SPARSITY, False
    max_s = art.schedule.max_target
    if value > max_s + 1e-9:
        if explicit:
            raise ServeConfigError(
                f"sparsity {value:g} is above {max_s:g}, the highest target the router "
                f"artifact {path} was tuned for; choose a value in [0, {max_s:g}]")
        notes.append(f"default sparsity {value:g} capped to the artifact's maximum {max_s:g}")
        value = max_s
    routed = routing_overrides(path, value, artifact=art)
    merged = {**(overrides or {}), **routed}
    return Routing(RoutingSettings(Path(routed[ROUTER_KEY]), value, art), source, notes), merged
