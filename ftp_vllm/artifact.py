"""The router artifact: one small folder that says how to route one specific model.

    router.json         format, version, router kind, routing mode, schedules, model
                        fingerprint, provenance
    router.safetensors  MLP weights (absent for the static router)
    skip_update.safetensors
                        the skip update (``routing.skip_update``; absent: skipped tokens
                        pass through unchanged, as in FTP)

Loading checks everything a wrong file could get wrong and names the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ftp_vllm.contract import EXACT_ARTIFACT as EXACT_ARTIFACT_NAME
from ftp_vllm.contract import FINGERPRINT_KEYS, SHIPPED_ARTIFACT
from ftp_vllm.contract import STATIC_ARTIFACT as STATIC_ARTIFACT_NAME
from ftp_vllm.routing.router import MLPRouter, StaticRouter, TokenRouter
from ftp_vllm.routing.schedule import SparsitySchedule
from ftp_vllm.routing.skip_update import SkipUpdate

FORMAT = "ftp-vllm-router"
VERSION = 1
CONFIG_FILE = "router.json"
WEIGHTS_FILE = "router.safetensors"
SKIP_UPDATE_FILE = "skip_update.safetensors"
# Artifacts shipped inside the package, for the default model (SmolLM2-135M-Instruct).
SHIPPED_DIR = Path(__file__).parent / "artifacts"
DEFAULT_ARTIFACT = SHIPPED_DIR / SHIPPED_ARTIFACT  # served by default: window routing
EXACT_ARTIFACT = SHIPPED_DIR / EXACT_ARTIFACT_NAME  # FTP as published: trained MLP, exact
STATIC_ARTIFACT = SHIPPED_DIR / STATIC_ARTIFACT_NAME  # static router + schedules


class ArtifactError(ValueError):
    """A router artifact that cannot serve: the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str, fix: str = ""):
        self.path = Path(path)
        msg = f"router artifact {path}: {problem}"
        super().__init__(msg + (f". {fix}" if fix else ""))


def model_fingerprint(config: Any, final_norm_weight: torch.Tensor) -> dict[str, Any]:
    """Identity of a model: its shape and a hash of its final norm weights.

    The norm weights tell apart checkpoints of one architecture (base vs instruct) and are
    whole on every tensor-parallel rank, so vLLM workers compute the same fingerprint.
    """
    cfg = config if isinstance(config, dict) else config.to_dict()
    fp = {k: cfg.get(k) for k in FINGERPRINT_KEYS}
    if fp["num_key_value_heads"] is None:
        fp["num_key_value_heads"] = fp["num_attention_heads"]
    data = final_norm_weight.detach().float().cpu().contiguous().numpy().tobytes()
    fp["norm_sha256"] = hashlib.sha256(data).hexdigest()
    return fp


def folder_fingerprint(model_dir: str | Path) -> tuple[dict[str, Any], Any]:
    """(fingerprint, fp32 HF model) of a Hugging Face checkpoint folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_fingerprint(model.config, model.model.norm.weight), model


def uniform_artifact(path: str | Path, fingerprint: dict[str, Any], router: TokenRouter,
                     kind: str, targets: tuple[float, ...],
                     provenance: dict[str, Any] | None = None,
                     window: int | None = None,
                     skip_update: SkipUpdate | None = None) -> Path:
    """Save an artifact whose schedules spread each target evenly over the blocks (the
    benchmarks' static router for a model with no shipped artifact; the tests' routers)."""
    schedule = SparsitySchedule.uniform(list(targets), int(fingerprint["num_hidden_layers"]))
    return RouterArtifact(kind, schedule, dict(fingerprint), router, provenance or {},
                          window, skip_update).save(path)


@dataclass
class RouterArtifact:
    kind: str  # "mlp" or "static"
    schedule: SparsitySchedule
    fingerprint: dict[str, Any]
    router: TokenRouter
    provenance: dict[str, Any] = field(default_factory=dict)
    window: int | None = None  # window routing over aligned windows of this many tokens
    skip_update: SkipUpdate | None = None  # what skipped tokens gain (None: nothing)

    @property
    def num_layers(self) -> int:
        return self.schedule.num_layers

    @property
    def mode(self) -> str:
        """``window`` (causal per aligned window: composes with prefix caching and chunked
        prefill) or ``exact`` (FTP as published: decisions depend on the whole prompt)."""
        return "window" if self.window else "exact"

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "router": {"kind": self.kind},
            "routing": {"mode": self.mode, **({"window": self.window} if self.window else {})},
            **({"skip_update": {"kind": "low_rank_linear", "rank": self.skip_update.rank}}
               if self.skip_update is not None else {}),
            "schedules": self.schedule.to_dict(),
            "model": self.fingerprint,
            "provenance": self.provenance,
        }
        if isinstance(self.router, MLPRouter):
            meta["router"]["hidden"] = self.router.hidden
            state = {
                k: v.detach().float().contiguous() for k, v in self.router.state_dict().items()
            }
            save_file(state, str(path / WEIGHTS_FILE), metadata={"format": FORMAT})
        skip_file = path / SKIP_UPDATE_FILE
        if self.skip_update is not None:
            if self.skip_update.num_layers != self.num_layers:
                raise ValueError(f"skip update has {self.skip_update.num_layers} layers, the "
                                 f"schedules {self.num_layers}")
            save_file(self.skip_update.state_dict(), str(skip_file), metadata={"format": FORMAT})
        elif skip_file.exists():
            skip_file.unlink()  # a stale update of an earlier save must not be loaded with this
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    def check_model(self, fingerprint: dict[str, Any], where: Path | str = "") -> None:
        """ArtifactError unless this artifact was made for the model with `fingerprint`."""
        diffs = [
            f"{k}: artifact {self.fingerprint.get(k)!r}, model {v!r}"
            for k, v in fingerprint.items()
            if self.fingerprint.get(k) != v
        ]
        if diffs:
            raise ArtifactError(
                where or "(in memory)",
                "made for another model (" + "; ".join(diffs) + ")",
                "Use the artifact trained for this model, or train one with `ftp-vllm train`",
            )


def load_artifact(path: Path | str) -> RouterArtifact:
    path = Path(path)
    cfg_path = path / CONFIG_FILE if path.is_dir() else path
    if path.is_file() and path.name != CONFIG_FILE:
        raise ArtifactError(path, f"not a router artifact (expected a folder with {CONFIG_FILE})")
    root = cfg_path.parent
    if not cfg_path.exists():
        raise ArtifactError(
            cfg_path, "file not found", "Pass the folder made by `ftp-vllm train`"
        )
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(cfg_path, f"corrupt JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(cfg_path, f"not a {FORMAT} file (format={_get(meta, 'format')!r})")
    if meta.get("version") != VERSION:
        raise ArtifactError(
            cfg_path,
            f"unknown version {meta.get('version')!r} (this ftp-vllm reads version {VERSION})",
            "Upgrade ftp-vllm or re-export the artifact",
        )
    try:
        kind = meta["router"]["kind"]
        fingerprint = dict(meta["model"])
        schedules = {float(t): v for t, v in meta["schedules"].items()}
        num_layers = int(fingerprint["num_hidden_layers"])
        schedule = SparsitySchedule(schedules, num_layers)
        window = _routing_window(meta.get("routing", {"mode": "exact"}))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(cfg_path, f"malformed contents ({type(e).__name__}: {e})") from None
    if kind == "static":
        router: TokenRouter = StaticRouter()
    elif kind == "mlp":
        weights = root / WEIGHTS_FILE
        if not weights.exists():
            raise ArtifactError(weights, "file not found (an MLP router needs its weights)")
        try:
            state = load_file(str(weights))
            router = MLPRouter(hidden=int(meta["router"].get("hidden", 64)))
            router.load_state_dict(state)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ArtifactError(weights, f"corrupt or mismatched weights ({e})") from None
        router.eval()
    else:
        raise ArtifactError(cfg_path, f"unknown router kind {kind!r} (expected 'mlp' or 'static')")
    skip_update = _load_skip_update(cfg_path, meta.get("skip_update"), fingerprint)
    return RouterArtifact(
        kind=kind, schedule=schedule, fingerprint=fingerprint, router=router,
        provenance=dict(meta.get("provenance", {})), window=window, skip_update=skip_update,
    )


def _load_skip_update(cfg_path: Path, entry: Any, fingerprint: dict[str, Any]
                      ) -> SkipUpdate | None:
    """The artifact's skip update, checked against its model's shape; None without the entry."""
    if entry is None:
        return None
    weights = cfg_path.parent / SKIP_UPDATE_FILE
    if not isinstance(entry, dict) or entry.get("kind") != "low_rank_linear":
        raise ArtifactError(cfg_path, f"unknown skip update {entry!r} (expected kind "
                            "'low_rank_linear')")
    if not weights.exists():
        raise ArtifactError(weights, "file not found (router.json names a skip update)",
                            "Restore the file or refit it with `ftp-vllm skip-update`")
    try:
        update = SkipUpdate.from_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ArtifactError(weights, f"corrupt or mismatched skip update ({e})") from None
    want = (int(fingerprint["num_hidden_layers"]), int(fingerprint["hidden_size"]),
            entry.get("rank"))
    if (update.num_layers, update.hidden_size, update.rank) != want:
        raise ArtifactError(weights, f"skip update of {update.num_layers} layers, hidden size "
                            f"{update.hidden_size}, rank {update.rank}; router.json and the "
                            f"model say {want}", "Refit it with `ftp-vllm skip-update`")
    return update


def _routing_window(routing: Any) -> int | None:
    """The window of a ``routing`` entry: None for exact mode (also when the entry is absent:
    artifacts older than window routing are exact)."""
    mode = routing["mode"]
    if mode == "exact":
        return None
    if mode != "window":
        raise ValueError(f"unknown routing mode {mode!r} (expected 'window' or 'exact')")
    window = routing["window"]
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"routing window must be a positive number of tokens, got {window!r}")
    return window


def _get(meta: Any, key: str) -> Any:
    return meta.get(key) if isinstance(meta, dict) else None
