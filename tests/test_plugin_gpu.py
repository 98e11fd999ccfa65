"""The engine parity suite on GPU attention backends, in bf16 (needs CUDA; skipped without).

Per backend (FLASH_ATTN, FLASHINFER, TRITON_ATTN, chosen with vLLM 0.32's
``attention_config={"backend": ...}``, on the command line ``--attention-backend``), on a
tiny random Llama with head size 64 (FlashInfer's smallest) and a random MLP router that
scatters its decisions (many runs of kept tokens per layer):
- routing off == vanilla: bit for bit against vanilla eager (the V1 model runner, as routed
  engines), prompt logprobs within the bf16 tolerance of vanilla's default mode (CUDA graphs,
  torch.compile);
- routed == the float32 reference forward replaying the engine's masks, within the bf16
  tolerance of ``tests/engine_helpers.py``, greedy tokens equal;
- batch invariance, within bf16 rounding (GPU kernels round by batch shape: decisions agree
  on >= 97% of pairs, prompt logprobs within the bf16 tolerance);
- more virtual requests per layer than ``max_num_seqs`` (4 here): FlashInfer's builder takes
  at most that many per build, so the routed layer splits its attention into several calls;
  the engine does not crash and results do not change;
- masks differ from layer to layer, so the stateful FlashInfer builder is re-planned per
  layer and per call (``subset.MetadataCache``); results still match the reference.
Run on a GPU machine: ``pytest -m gpu tests/test_plugin_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from ftp_vllm.artifact import folder_fingerprint  # noqa: E402
from ftp_vllm.plugin import routing_overrides  # noqa: E402
from tests.engine_helpers import (  # noqa: E402
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
from tests.tiny_models import make_artifact  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")
SPARSITY = 0.3
MAX_NUM_SEQS = 4  # below the runs of kept tokens per layer: FlashInfer must split
LENGTHS = (3, 17, 40, 97, 150, 200)


def gpu_kwargs(backend: str, **kw):
    return engine_kwargs(
        dtype="bfloat16", attention_config={"backend": backend}, max_num_seqs=MAX_NUM_SEQS,
        gpu_memory_utilization=0.3, **kw,
    )


@pytest.fixture(scope="module", params=BACKENDS)
def setup(request, tiny_llama_hd64_dir, tmp_path_factory):
    from vllm import LLM

    from ftp_vllm.artifact import load_artifact

    backend = request.param
    model_dir = tiny_llama_hd64_dir
    fp, hf_model = folder_fingerprint(model_dir)
    art = make_artifact(tmp_path_factory.mktemp("art") / backend, fp, kind="mlp")
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    with pytest.MonkeyPatch.context() as mp:
        # Routed engines pin vLLM's V1 model runner; vanilla uses the same one, so routing
        # off is compared with the same runner and kernels.
        mp.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
        vanilla = {
            "default": vanilla_results(model_dir, prompts, **gpu_kwargs(backend)),
            "eager": vanilla_results(
                model_dir, prompts, **gpu_kwargs(backend, enforce_eager=True)
            ),
        }
        llm = LLM(
            str(model_dir), hf_overrides=routing_overrides(art, SPARSITY),
            **gpu_kwargs(backend),
        )
        llm.collective_rpc("ftp_record_masks")
        yield backend, llm, hf_model, load_artifact(art), prompts, vanilla
        shutdown(llm)


def test_backend_in_use(setup):
    backend, llm, *_ = setup
    chosen = llm.llm_engine.vllm_config.attention_config.backend
    assert chosen is not None and chosen.name == backend


def test_routing_off_equals_vanilla(setup):
    _, llm, _, _, prompts, vanilla = setup
    check_routing_off(llm, prompts, vanilla["eager"], vanilla["default"])


def test_routed_matches_reference(setup):
    _, llm, hf_model, artifact, prompts, _ = setup
    result = check_routed_bf16(llm, hf_model, artifact, prompts, SPARSITY)
    # most greedy tokens equal the reference's; where they part, it was a bf16 tie
    assert result["matched"] >= 0.5, result


def test_batch_invariance(setup):
    _, llm, _, _, prompts, _ = setup
    check_batch_invariance(llm, prompts, SPARSITY, exact=False)


def test_many_runs_and_changing_masks(setup):
    """The scattered router gives more runs than max_num_seqs and different masks per
    layer; every layer got its own plan (builds >= layers with a partial mask). (Checked on
    the CPU engine with this model: 36-52 runs per layer, 4 distinct masks.)"""
    _, llm, _, _, prompts, _ = setup
    llm.collective_rpc("ftp_routing_stats", kwargs={"reset": True})
    (out,), (mask,) = run(llm, [prompts[-1]], params(sparsity=SPARSITY))
    stats = llm.collective_rpc("ftp_routing_stats")[0]
    m = mask.int()
    runs_per_layer = ((m[:, 1:] - m[:, :-1]) == 1).sum(1) + 1  # runs of kept tokens
    assert int(runs_per_layer.max()) > MAX_NUM_SEQS
    distinct = {tuple(row.tolist()) for row in mask}
    assert len(distinct) > 2  # the plan changes from layer to layer
    partial_layers = int((~mask).any(1).sum())
    assert stats["metadata_builds"] >= partial_layers
