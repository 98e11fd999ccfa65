"""The compared configurations: how each `--method` becomes a scorer.

| method         | routing                          | per-block targets                   |
|----------------|----------------------------------|-------------------------------------|
| dense          | none                             | -                                   |
| window         | window routing (served default)  | artifact's searched schedule        |
| ftp            | trained MLP router, exact        | artifact's searched schedule        |
| static         | static router                    | artifact's searched schedule        |
| static-uniform | static router                    | S at every block                    |
| random         | random router (static's count)   | S at every block                    |
| shortgpt       | k = round(S*L) blocks removed by Block Influence, the rest dense       |

`schedule` ("searched" or "uniform") overrides the default schedule of ftp/static/random.
`window` is what `ftp-vllm serve` routes with by default: its artifact's router and searched
schedule over aligned windows (docs/ROUTER.md); every other method routes whole prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ftp_vllm
from ftp_vllm.artifact import DEFAULT_ARTIFACT, EXACT_ARTIFACT, STATIC_ARTIFACT
from ftp_vllm.eval.scoring import ReferenceScorer
from ftp_vllm.routing.router import DenseRouter, RandomRouter, StaticRouter, TokenRouter
from ftp_vllm.routing.schedule import SparsitySchedule

METHODS = ("dense", "window", "ftp", "static", "static-uniform", "random", "shortgpt")
DEFAULT_SCHEDULE = {"window": "searched", "ftp": "searched", "static": "searched",
                    "static-uniform": "uniform", "random": "uniform"}
# The artifact a method reads its router from by default.
METHOD_ARTIFACT = {"window": DEFAULT_ARTIFACT, "ftp": EXACT_ARTIFACT}
REPO_ROOT = Path(ftp_vllm.__file__).resolve().parent.parent


def display_path(path: Path | str) -> str:
    """A path as it may appear in a results file: relative to the repository if inside it,
    else just its last two parts (never this machine's absolute layout)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return "/".join(path.parts[-2:])


@dataclass
class MethodSetup:
    scorer: ReferenceScorer
    info: dict[str, Any] = field(default_factory=dict)


def tune_calibration(tokenizer: Any, limit: int) -> Callable[[], list[list[int]]]:
    """ShortGPT's calibration text for ``build_method``: `limit` passages of the LAMBADA "tune"
    split, tokenised as the harness does, read only when a method asks for them."""

    def calibration() -> list[list[int]]:
        from ftp_vllm.data import calibration_passages
        from ftp_vllm.eval.harness import HFEncoder

        encoder = HFEncoder(tokenizer)
        passages = calibration_passages("tune", limit=limit, seed=0)
        return [[encoder.prefix_token_id, *encoder.encode(p)] for p in passages]

    return calibration


def build_method(
    method: str,
    model: nn.Module,
    sparsity: float,
    *,
    artifact: Path | str | None = None,
    schedule: str | None = None,
    seed: int = 0,
    batch_tokens: int = 512,
    calibration: Callable[[], list[list[int]]] | None = None,
    log: Callable[[str], None] = print,
) -> MethodSetup:
    """The scorer of one configuration at mean sparsity `sparsity`, and what to record about
    it. `calibration` gives tokenised calibration passages (ShortGPT's Block Influence)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    num_layers = model.config.num_hidden_layers
    info: dict[str, Any] = {"method": method, "sparsity_target": sparsity}
    if method == "dense":
        info["sparsity_target"] = 0.0
        return MethodSetup(ReferenceScorer(model, DenseRouter(), batch_tokens=batch_tokens), info)
    if method == "shortgpt":
        from ftp_vllm.shortgpt import block_influence, plan, prune

        if calibration is None:
            raise ValueError("shortgpt needs calibration text for Block Influence")
        sequences = calibration()
        log(f"shortgpt: Block Influence over {len(sequences)} calibration passages "
            f"({sum(map(len, sequences))} tokens)")
        p = plan(block_influence(model, sequences), sparsity)
        log(f"shortgpt: dropping blocks {p.dropped} (k={p.k} of {num_layers}, "
            f"sparsity {p.sparsity:.3f})")
        pruned = prune(model, p.dropped)
        scorer = ReferenceScorer(pruned, DenseRouter(), batch_tokens=batch_tokens,
                                 dense_num_layers=num_layers, name="reference")
        info["shortgpt"] = {**p.to_dict(), "calibration_passages": len(sequences),
                            "calibration_tokens": sum(map(len, sequences))}
        return MethodSetup(scorer, info)

    kind = schedule or DEFAULT_SCHEDULE[method]
    if kind not in ("searched", "uniform"):
        raise ValueError(f"schedule must be 'searched' or 'uniform', got {kind!r}")
    if method == "static-uniform" and kind != "uniform":
        raise ValueError("static-uniform always uses the uniform schedule (use --method static)")
    art = None
    artifact = artifact or METHOD_ARTIFACT.get(method, STATIC_ARTIFACT)
    if method in METHOD_ARTIFACT or kind == "searched":
        art = _load_artifact(artifact, model)
        info["router_artifact"] = {
            "path": display_path(artifact),
            "kind": art.kind,
            "routing": art.mode,
            "schedules": art.schedule.targets,
            "provenance": art.provenance,
        }
    if kind == "searched":
        blocks = art.schedule.blocks(sparsity)
    else:
        blocks = SparsitySchedule.uniform([sparsity], num_layers).blocks(sparsity) \
            if sparsity > 0 else torch.zeros(num_layers, dtype=torch.float64)
    router: TokenRouter
    window = None
    if method == "window":
        if not art.window:
            raise ValueError(f"--method window needs a window-routing artifact; "
                             f"{display_path(artifact)} routes whole prompts (exact)")
        router, window = art.router, art.window
        info["window"] = window
    elif method == "ftp":
        if art.kind != "mlp" or art.window:
            raise ValueError(f"--method ftp needs a trained (mlp) exact-routing artifact; "
                             f"{display_path(artifact)} holds a {art.kind} router "
                             f"({art.mode} routing)")
        router = art.router
    elif method in ("static", "static-uniform"):
        router = StaticRouter()
    else:
        router = RandomRouter(seed)
        info["seed"] = seed
    info["schedule"] = kind
    info["block_sparsity"] = [round(float(b), 6) for b in blocks]
    # the artifact's skip update goes with its own router (window, ftp), as served
    skip_update = art.skip_update if method in METHOD_ARTIFACT else None
    if skip_update is not None:
        info["skip_update_rank"] = skip_update.rank
    scorer = ReferenceScorer(model, router, blocks, batch_tokens=batch_tokens, window=window,
                             skip_update=skip_update)
    return MethodSetup(scorer, info)


def _load_artifact(path: Path | str | None, model: nn.Module):
    from ftp_vllm.artifact import load_artifact, model_fingerprint

    path = Path(path)
    art = load_artifact(path)
    art.check_model(model_fingerprint(model.config, model.model.norm.weight), path)
    return art
