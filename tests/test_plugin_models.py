"""Parity on more models: a tiny random Qwen2 and SmolLM2-135M-Instruct (static router).

Per model, one vanilla engine (default compilation mode) and one routed engine: at
sparsity 0 the routed engine equals vanilla token for token; routed, it equals the reference
forward replaying its decisions, and its decisions equal the reference's own.
"""

from __future__ import annotations

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
from tests.tiny_models import make_artifact, prepared_default_model  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SPARSITY = 0.3


@pytest.fixture(scope="module", params=["qwen2", "smollm2"])
def setup(request, tmp_path_factory):
    from vllm import LLM

    if request.param == "qwen2":
        model_dir = request.getfixturevalue("tiny_qwen2_dir")
        vocab, lengths, tol = 256, (2, 19, 45, 120), (2e-4, 0.0)
    else:
        model_dir = prepared_default_model()
        # 30 layers of float noise on logprobs down to -180 (random tokens): relative 1e-4
        vocab, lengths, tol = 49152, (5, 33, 70), (1e-3, 1e-4)
    fp, hf_model = folder_fingerprint(model_dir)
    art = make_artifact(tmp_path_factory.mktemp("art") / request.param, fp, kind="static")
    prompts = [random_prompt(n, seed=n, vocab=vocab) for n in lengths]

    vanilla = LLM(str(model_dir), **engine_kwargs())
    outs = vanilla.generate([{"prompt_token_ids": p} for p in prompts], params())
    expected = [(list(o.outputs[0].token_ids), prompt_logprobs(o)) for o in outs]
    shutdown(vanilla)

    from ftp_vllm.artifact import load_artifact

    llm = LLM(str(model_dir), hf_overrides=routing_overrides(art, SPARSITY), **engine_kwargs())
    llm.collective_rpc("ftp_record_masks")
    yield llm, hf_model, load_artifact(art), prompts, expected, tol
    shutdown(llm)


def test_sparsity_zero_equals_vanilla(setup):
    llm, _, _, prompts, expected, _ = setup
    outs, masks = run(llm, prompts, params(sparsity=0.0))
    assert all(m is None for m in masks)
    for (tokens, lps), out in zip(expected, outs, strict=True):
        assert list(out.outputs[0].token_ids) == tokens
        assert torch.allclose(prompt_logprobs(out), lps, atol=1e-4, rtol=0)


def test_routed_matches_reference(setup):
    llm, hf_model, artifact, prompts, _, tol = setup
    outs, masks = run(llm, prompts, params(sparsity=SPARSITY))
    for prompt, out, mask in zip(prompts, outs, masks, strict=True):
        agree = check_against_reference(
            hf_model, artifact, prompt, out, mask, SPARSITY, *tol
        )
        assert agree == 1.0  # the static router depends on positions only
    assert sum(int((~m).sum()) for m in masks) > 0
