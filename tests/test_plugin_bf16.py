"""bf16, the serving dtype, on vLLM's CPU engine: the parity suite of the float32 tests.

Per model, a vanilla engine and a routed engine, both in bfloat16:
- routing off (sparsity 0) equals vanilla exactly: token ids and prompt logprobs bit for bit
  against vanilla at its defaults (steps with nothing to route run vLLM's compiled model),
  token ids against vanilla in eager mode;
- routed equals the float32 reference forward (the oracle) replaying the engine's keep masks
  within the bf16 tolerance of ``tests/engine_helpers.py`` (BF16_*), with greedy tokens equal
  up to a bf16 tie, and the engine's decisions agree with the reference router's;
- a request's output does not depend on what it is batched with (tokens: up to a bf16 tie).
Models: the tiny random Llama with a random MLP router that mixes all four factors, and
SmolLM2-135M-Instruct on text with the shipped trained MLP router (``EXACT_ARTIFACT``, exact
routing) and with the served default (``DEFAULT_ARTIFACT``: static scores, window routing,
chunked prefill and prefix caching on).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from ftp_vllm.artifact import folder_fingerprint  # noqa: E402
from ftp_vllm.plugin import routing_overrides  # noqa: E402
from tests.engine_helpers import (  # noqa: E402
    BF16_ATOL,
    check_batch_invariance,
    check_routed_bf16,
    check_routing_off,
    engine_kwargs,
    params,
    random_prompt,
    run,
    shutdown,
    vanilla_results,
)
from tests.tiny_models import make_artifact, prepared_default_model  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SPARSITY = 0.3
TEXTS = (
    "The quick brown fox jumps over the lazy dog. The dog did not move, and the fox",
    "Photosynthesis is the process by which green plants use sunlight to make food from "
    "carbon dioxide and water. It takes place mainly in the leaves, inside small structures "
    "called chloroplasts, which contain a green pigment named chlorophyll. The main products "
    "of photosynthesis are",
    "Question: A farmer has 12 cows and buys 7 more. Then 4 cows are sold at the market. "
    "How many cows does the farmer have now? Explain your reasoning step by step before "
    "giving the final number.\nAnswer: The farmer starts with 12 cows.",
)


def text_prompts(model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(t)["input_ids"] for t in TEXTS]


_VANILLA: dict[str, dict] = {}  # model folder -> vanilla results (shared by two artifacts)


@pytest.fixture(scope="module", params=["tiny", "smollm2", "smollm2-window"])
def setup(request, tmp_path_factory):
    """(routed bf16 engine, fp32 reference model, artifact, prompts, vanilla results)."""
    from vllm import LLM

    from ftp_vllm.artifact import DEFAULT_ARTIFACT, EXACT_ARTIFACT, load_artifact

    if request.param == "tiny":
        model_dir = request.getfixturevalue("tiny_llama_dir")
        fp, hf_model = folder_fingerprint(model_dir)
        art = make_artifact(tmp_path_factory.mktemp("art") / "mlp", fp, kind="mlp")
        prompts = [random_prompt(n, seed=n) for n in (3, 17, 40, 97, 150)]
    else:
        model_dir = prepared_default_model()
        _, hf_model = folder_fingerprint(model_dir)
        # the shipped trained MLP router (exact), or the served default (window routing)
        art = EXACT_ARTIFACT if request.param == "smollm2" else DEFAULT_ARTIFACT
        prompts = text_prompts(model_dir)
    artifact = load_artifact(art)
    if request.param == "smollm2-window":
        assert artifact.mode == "window"
    else:
        assert artifact.kind == "mlp" and artifact.mode == "exact"
    key = str(model_dir)
    if key not in _VANILLA:
        _VANILLA[key] = {
            "default": vanilla_results(model_dir, prompts, dtype="bfloat16"),
            "eager": vanilla_results(model_dir, prompts, dtype="bfloat16", enforce_eager=True),
        }
    vanilla = _VANILLA[key]
    llm = LLM(
        str(model_dir), hf_overrides=routing_overrides(art, SPARSITY),
        **engine_kwargs(dtype="bfloat16"),
    )
    if artifact.mode == "window":  # the served configuration keeps vLLM's features
        cfg = llm.llm_engine.vllm_config
        assert cfg.scheduler_config.enable_chunked_prefill
        assert cfg.cache_config.enable_prefix_caching
    llm.collective_rpc("ftp_record_masks")
    yield llm, hf_model, artifact, prompts, vanilla
    shutdown(llm)


def test_routing_off_equals_vanilla_exactly(setup):
    llm, _, _, prompts, vanilla = setup
    assert llm.llm_engine.vllm_config.model_config.dtype == torch.bfloat16
    check_routing_off(llm, prompts, vanilla["eager"], vanilla["default"])


def test_routed_matches_fp32_reference_within_bf16_tolerance(setup):
    llm, hf_model, artifact, prompts, _ = setup
    result = check_routed_bf16(llm, hf_model, artifact, prompts, SPARSITY)
    # most greedy tokens equal the reference's; where they part, it was a bf16 tie
    assert result["matched"] >= 0.5, result


def test_batch_invariance_bf16(setup):
    llm, _, _, prompts, _ = setup
    check_batch_invariance(llm, prompts, SPARSITY, atol=BF16_ATOL, tie=BF16_ATOL)


def test_keep_masks_reach_the_host_only_from_routers_that_read_the_hidden_state(setup):
    """A static router's decisions are made on the host when the step is planned (no mask
    copied back per layer: a device sync each on a GPU); an MLP router's come from the
    device, one copy per routed layer."""
    llm, _, artifact, prompts, _ = setup
    llm.collective_rpc("ftp_routing_stats", kwargs={"reset": True})
    run(llm, prompts[:2], params(sparsity=SPARSITY))
    stats = llm.collective_rpc("ftp_routing_stats")[0]
    assert stats["routed_steps"] > 0 and stats["skipped_pairs"] > 0
    if artifact.router.needs_scores:
        assert stats["host_copies"] >= stats["routed_steps"], stats
    else:
        assert stats["host_copies"] == 0, stats
