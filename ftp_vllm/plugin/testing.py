"""Helpers for proving the plugin against the reference forward (tests, eval through vLLM).

Keep-mask replay: the plugin records each routed request's [L, n_prompt] keep mask
(``collective_rpc("ftp_record_masks")``), and the reference replays it with ``MaskRouter``,
so float noise that flips a borderline router decision cannot make outputs differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ftp_vllm.artifact import RouterArtifact, model_fingerprint
from ftp_vllm.routing.router import MLPRouter, StaticRouter
from ftp_vllm.routing.schedule import SparsitySchedule


def scored_mlp_router(seed: int = 0, bias: float = -0.5) -> MLPRouter:
    """A random MLP router whose decisions mix all four factors and grow with the target
    (on the tests' tiny random Llama: about 21% / 39% skipped at targets 0.2 / 0.3)."""
    gen = torch.Generator().manual_seed(seed)
    router = MLPRouter()
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        router.net[0].weight.mul_(6.0)
        router.net[0].weight[:, 3] = 0
        router.net[0].weight[0, :] = 0
        router.net[0].weight[0, 3] = 4.0  # unit 0 carries the block target
        router.net[2].weight[:, 0] = torch.tensor([4.0, -4.0])  # higher target: skip more
        router.net[2].bias.copy_(torch.tensor([bias, 0.0]))
    return router.eval()


def with_random_norms(model: Any) -> Any:
    """A freshly initialised model (all-ones norms) made fp32, eval, with perturbed norm
    weights, so fingerprints and routed math see real values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model = model.float().eval()
    model.config.torch_dtype = torch.float32
    return model


def hf_fingerprint(model_dir: str | Path) -> tuple[dict[str, Any], Any]:
    """(fingerprint, fp32 HF model) of a checkpoint folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_fingerprint(model.config, model.model.norm.weight), model


def make_artifact(
    path: str | Path,
    fingerprint: dict[str, Any],
    kind: str = "static",
    targets: tuple[float, ...] = (0.2, 0.4),
    router: Any = None,
) -> Path:
    """Save a uniform-schedule artifact (static router, or `router` / a scored MLP)."""
    num_layers = int(fingerprint["num_hidden_layers"])
    schedule = SparsitySchedule.uniform(list(targets), num_layers)
    if router is None:
        router = StaticRouter() if kind == "static" else scored_mlp_router()
    artifact = RouterArtifact(kind, schedule, dict(fingerprint), router, {"made_by": "tests"})
    return artifact.save(path)


def shutdown_engine(llm: Any) -> None:
    """Stop an offline `LLM`'s engine processes now (CPU workers busy-poll until stopped)."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    del llm
    gc.collect()


def external_id(internal_id: str) -> str:
    """vLLM's engine appends '-<random>' to a request id; the caller's id is the rest."""
    return internal_id.rsplit("-", 1)[0]


def masks_by_request(masks: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {external_id(k): torch.tensor(v, dtype=torch.bool) for k, v in masks.items()}


def prompt_logprobs(output: Any) -> torch.Tensor:
    """[n-1] log-probabilities vLLM gave each prompt token after the first."""
    values = []
    ids = output.prompt_token_ids
    for tok, entry in zip(ids[1:], output.prompt_logprobs[1:], strict=True):
        values.append(entry[tok].logprob)
    return torch.tensor(values, dtype=torch.float64)


def reference_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """[n-1] log-probabilities of ids[1:] from reference logits [n, V]."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def set_subset_policy(
    worker: Any, max_requests: int | None = None, reusable: bool | None = None
) -> bool:
    """Tests, as ``collective_rpc(set_subset_policy, args=(n, reusable))``: replace the
    backend's subset-attention policy (virtual requests per build, metadata reuse), so the
    split path and the stateful-backend cache run on the CPU engine; no arguments restore
    the backend's own. False when the model is not routed."""
    from ftp_vllm.plugin.runtime import get_runtime
    from ftp_vllm.plugin.subset import BackendPolicy

    rt = get_runtime()
    if rt is None:
        return False
    if max_requests is None and reusable is None:
        rt.policy_override = None
    else:
        rt.policy_override = BackendPolicy(max_requests, bool(reusable))
    return True
