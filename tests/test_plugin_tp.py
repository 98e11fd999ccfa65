"""Tensor parallelism: routed outputs at tensor_parallel_size=2 equal tensor_parallel_size=1.

Each rank holds half the heads; the router's attention scores are averaged over all heads
with one all-reduce, so both ranks take the same decisions. CPU ranks need one core each
(VLLM_CPU_OMP_THREADS_BIND="0|1"). The tiny Llama has 4 query / 2 KV heads.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm")

from ftp_vllm.artifact import folder_fingerprint  # noqa: E402
from ftp_vllm.plugin import routing_overrides  # noqa: E402
from tests.engine_helpers import (  # noqa: E402
    check_against_reference,
    engine_kwargs,
    params,
    prompt_logprobs,  # noqa: E402
    random_prompt,
    run,
    shutdown,
)
from tests.tiny_models import make_artifact  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SPARSITY = 0.3


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor parallelism needs two cores")
    fp, hf_model = folder_fingerprint(tiny_llama_dir)
    art = make_artifact(tmp_path_factory.mktemp("art") / "mlp", fp, kind="mlp")
    prompts = [random_prompt(n, seed=100 + n) for n in (6, 31, 77)]
    return hf_model, art, prompts


def generate(model_dir, art, prompts, tp: int, monkeypatch):
    from vllm import LLM

    if tp > 1:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))
    llm = LLM(
        str(model_dir), hf_overrides=routing_overrides(art, SPARSITY),
        tensor_parallel_size=tp, **engine_kwargs(),
    )
    llm.collective_rpc("ftp_record_masks")
    outs, masks = run(llm, prompts, params(sparsity=SPARSITY))
    ranks = llm.collective_rpc("ftp_routing_stats")
    shutdown(llm)
    return outs, masks, ranks


def test_tp2_equals_tp1(tiny_llama_dir, setup, monkeypatch):
    from ftp_vllm.artifact import load_artifact

    hf_model, art, prompts = setup
    artifact = load_artifact(art)
    one, one_masks, _ = generate(tiny_llama_dir, art, prompts, 1, monkeypatch)
    two, two_masks, ranks = generate(tiny_llama_dir, art, prompts, 2, monkeypatch)
    assert len(ranks) == 2 and ranks[0] == ranks[1]  # both ranks took the same decisions
    for prompt, a, b, ma, mb in zip(prompts, one, two, one_masks, two_masks, strict=True):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        agree = (ma == mb).float().mean().item()
        assert agree >= 0.99
        assert torch.allclose(prompt_logprobs(a), prompt_logprobs(b), atol=2e-4, rtol=0)
        check_against_reference(hf_model, artifact, prompt, b, mb, SPARSITY)
