"""Engine parity helpers shared by the vLLM engine tests (CPU engine and the `gpu` suite).

Each parity test starts a vanilla engine and a routed engine on the same checkpoint and
compares: routing off == vanilla; routed == the reference forward replaying the plugin's
keep masks (``MaskRouter``); a request's output does not depend on its batch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ftp_vllm.plugin.offline import shutdown_engine
from ftp_vllm.reference import greedy_generate, routed_forward
from ftp_vllm.routing.router import MaskRouter

MAX_NEW = 8
LOGPROB_TOL = 2e-4  # float32 engine vs float32 reference

# bf16 engine vs float32 reference (the oracle), prompt logprobs. bf16 keeps 8 significant
# bits (relative rounding 2^-9) and the error adds up over the layers and grows with a token's
# improbability: on SmolLM2 (30 layers) the dense bf16 engine is off by up to 0.28 (mean
# 0.03-0.04) and routed prompts by up to 1.1 at logprob -26 (mean up to 0.14). Per prompt
# token |engine - reference| <= BF16_ATOL + BF16_RTOL * |reference|, and the mean over a
# prompt <= BF16_MEAN. Greedy tokens must equal the reference's, except from a step where the
# two differ and the engine's log-probabilities of both tokens there are within that same
# per-token tolerance of the reference's (a tie at bf16 precision: either token is right).
# The engine's decisions (on bf16 router factors) equal the float32 reference router's on
# >= BF16_DECISION_AGREEMENT of the (token, block) pairs: a decision near the boundary flips.
BF16_ATOL = 0.25
BF16_RTOL = 0.05
BF16_MEAN = 0.2
BF16_TOP_LOGPROBS = 5  # the engine reports its top 5 per generated token (the tie check)
BF16_DECISION_AGREEMENT = 0.97
shutdown = shutdown_engine


def external_id(internal_id: str) -> str:
    """vLLM's engine appends '-<random>' to a request id; the caller's id is the rest."""
    return internal_id.rsplit("-", 1)[0]


def masks_by_request(masks: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The plugin's recorded keep masks (``ftp_pop_masks``), by the caller's request id."""
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


def random_prompt(n: int, seed: int, vocab: int = 256) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def engine_kwargs(dtype: str = "float32", **kw: Any) -> dict[str, Any]:
    """Offline `LLM` arguments of the parity tests (token ids in, no tokenizer)."""
    base = dict(
        skip_tokenizer_init=True, dtype=dtype, max_model_len=512, seed=0, max_num_seqs=16,
    )
    return {**base, **kw}


def params(sparsity=None, prompt_logprobs=0, max_tokens=MAX_NEW, logprobs=None):
    from vllm import SamplingParams

    extra = None if sparsity is None else {"ftp_sparsity": sparsity}
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.0, prompt_logprobs=prompt_logprobs,
        logprobs=logprobs, detokenize=False, extra_args=extra, ignore_eos=True,
    )


def run(llm, prompts, sampling):
    """Generate; returns (outputs, {request id: keep mask}) in prompt order."""
    if not isinstance(sampling, list):
        sampling = [sampling] * len(prompts)
    llm.collective_rpc("ftp_pop_masks")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling)
    masks = masks_by_request(llm.collective_rpc("ftp_pop_masks")[0])
    return outs, [masks.get(o.request_id) for o in outs]


def vanilla_results(model_dir: str | Path, prompts, **kw) -> list[tuple[list[int], torch.Tensor]]:
    """Vanilla vLLM (its default mode): greedy tokens and prompt logprobs per prompt."""
    from vllm import LLM

    llm = LLM(str(model_dir), **engine_kwargs(**kw))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params())
    result = [(list(o.outputs[0].token_ids), prompt_logprobs(o)) for o in outs]
    shutdown(llm)
    return result


def check_against_reference(
    hf_model, router, prompt, out, mask, sparsity, tol=LOGPROB_TOL, rtol=0.0,
    check_tokens: bool = True,
):
    """Prompt logprobs and greedy tokens equal the reference replaying the plugin's mask;
    returns the agreement of the plugin's decisions with the reference router's own."""
    blocks = router.schedule.blocks(sparsity)
    skip_update = getattr(router, "skip_update", None)
    ref = greedy_generate(hf_model, torch.tensor(prompt), MAX_NEW, MaskRouter(mask), blocks,
                          skip_update=skip_update)
    if check_tokens:
        assert list(out.outputs[0].token_ids) == ref.tokens
    got = prompt_logprobs(out)
    want = reference_logprobs(ref.prompt_logits, prompt)
    assert torch.allclose(got, want, atol=tol, rtol=rtol), (got - want).abs().max()
    own = routed_forward(hf_model, torch.tensor(prompt), None, router.router, blocks,
                         window=getattr(router, "window", None), skip_update=skip_update)
    assert bool(own.keep[:, 0].all()) and bool(own.keep[:, -1].all())
    return (own.keep == mask).float().mean().item()




# ---------------------------------------------------------------------- bf16 parity suite
def check_routing_off(llm, prompts, vanilla_eager, vanilla_default) -> None:
    """Sparsity 0: a routed engine runs steps with nothing to route through vLLM's own
    compiled model, so token ids and prompt logprobs equal vanilla at its defaults bit for
    bit. Against vanilla eager (no fused kernels): prompt logprobs within the bf16 tolerance,
    and token ids equal wherever vanilla's two modes agree with each other (on flat logits a
    near tie breaks differently per mode and CPU: a tiny random model's 256-token vocabulary
    on an AVX2-only CPU did)."""
    outs, masks = run(llm, prompts, params(sparsity=0.0))
    assert all(m is None for m in masks)
    for i, out in enumerate(outs):
        tokens, lps = vanilla_default[i]
        assert list(out.outputs[0].token_ids) == tokens, (i, out.outputs[0].token_ids, tokens)
        got = prompt_logprobs(out)
        assert torch.equal(got, lps), (got - lps).abs().max()
        eager_tokens, eager_lps = vanilla_eager[i]
        assert torch.allclose(got, eager_lps, atol=BF16_ATOL, rtol=BF16_RTOL), (
            (got - eager_lps).abs().max())
        if tokens == eager_tokens:
            assert list(out.outputs[0].token_ids) == eager_tokens


def check_routed_bf16(llm, hf_model, artifact, prompts, sparsity) -> dict[str, float]:
    """Routed bf16 engine vs the float32 reference replaying its masks (BF16_* above);
    returns the realised token sparsity and the fraction of greedy tokens that equal the
    reference's before any bf16 tie."""
    outs, masks = run(llm, prompts, params(sparsity=sparsity, logprobs=BF16_TOP_LOGPROBS))
    pairs = agree = skipped = 0.0
    matched = 0
    blocks = artifact.schedule.blocks(sparsity)
    for prompt, out, mask in zip(prompts, outs, masks, strict=True):
        assert mask is not None and mask.shape[1] == len(prompt)
        a = check_against_reference(
            hf_model, artifact, prompt, out, mask, sparsity, tol=BF16_ATOL, rtol=BF16_RTOL,
            check_tokens=False,
        )
        matched += check_greedy_tokens(hf_model, prompt, out, mask, blocks,
                                       artifact.skip_update)
        with torch.no_grad():
            ref = routed_forward(hf_model, torch.tensor(prompt), None, MaskRouter(mask), blocks,
                                 skip_update=artifact.skip_update)
            err = (prompt_logprobs(out) - reference_logprobs(ref.logits, prompt)).abs()
        assert float(err.mean()) <= BF16_MEAN, float(err.mean())
        pairs += mask.numel()
        agree += a * mask.numel()
        skipped += int((~mask).sum())
    assert agree / pairs >= BF16_DECISION_AGREEMENT, agree / pairs
    assert skipped / pairs > 0.1  # routing really skipped work
    return {"sparsity": skipped / pairs, "matched": matched / (MAX_NEW * len(prompts))}


def check_greedy_tokens(hf_model, prompt, out, mask, blocks, skip_update=None) -> int:
    """Engine greedy tokens == the float32 reference's (no-cache recomputation replaying the
    mask), up to a step where they differ as a bf16 tie: the engine's log-probabilities of
    its token and of the reference's there (its top BF16_TOP_LOGPROBS, so `out` must come from
    ``params(logprobs=BF16_TOP_LOGPROBS)``) are both within the per-token bf16 tolerance of
    the reference's. Returns how many leading tokens match."""
    ref = greedy_generate(hf_model, torch.tensor(prompt), MAX_NEW, MaskRouter(mask), blocks,
                          skip_update=skip_update)
    got = list(out.outputs[0].token_ids)
    if got == ref.tokens:
        return len(got)
    j = next(i for i, (g, r) in enumerate(zip(got, ref.tokens, strict=True)) if g != r)
    ids = torch.tensor(prompt + ref.tokens[:j])
    with torch.no_grad():
        logits = routed_forward(
            hf_model, ids, [len(ids)], MaskRouter(mask), blocks, routed_lengths=[len(prompt)],
            skip_update=skip_update,
        ).logits[-1]
    want = torch.log_softmax(logits.double(), dim=-1)
    engine = out.outputs[0].logprobs[j]
    for tok in (got[j], ref.tokens[j]):
        assert tok in engine, (
            f"greedy token {j} differs ({got[j]} vs {ref.tokens[j]}) and the reference's token "
            f"is not among the engine's top {BF16_TOP_LOGPROBS}: not a tie"
        )
        err = abs(engine[tok].logprob - float(want[tok]))
        assert err <= BF16_ATOL + BF16_RTOL * abs(float(want[tok])), (
            f"greedy token {j} differs ({got[j]} vs {ref.tokens[j]}): the engine's logprob of "
            f"token {tok} is {err:.3f} from the reference's (top-2 margin "
            f"{float(want[ref.tokens[j]] - want[got[j]]):.3f}), beyond the bf16 tolerance"
        )
    return j


def first_token_kl(a: dict, b: dict) -> float:
    """KL(b || a) over the tokens in both runs' top lists (vLLM returns the top 20
    log-probabilities), the rest of each run's mass lumped into one outcome: by the
    log-sum inequality a lower bound of the full KL, exact when the lists hold the same
    tokens. (A token of one list missing from the other is not given a made-up probability:
    with 1e-9 for it, a swap at rank 20 alone read as a KL of 0.05.)"""
    keys = [k for k in b if k in a]
    p = [math.exp(b[k].logprob) for k in keys]
    q = [math.exp(a[k].logprob) for k in keys]
    rest_p, rest_q = max(1e-12, 1 - sum(p)), max(1e-12, 1 - sum(q))
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0) \
        + rest_p * math.log(rest_p / rest_q)


def check_tokens_or_tie(a, b, tie: float) -> None:
    """Two runs' greedy tokens are equal, or part at a step where each run's log-probabilities
    of the two tokens are within `tie` of each other (bf16 logits between 16 and 32 are 0.125
    apart, so such tokens can come out exactly equal, and the argmax then breaks the tie)."""
    ta, tb = list(a.token_ids), list(b.token_ids)
    if ta == tb:
        return
    j = next(i for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y)
    for run_, (mine, other) in ((a, (ta[j], tb[j])), (b, (tb[j], ta[j]))):
        top = run_.logprobs[j]
        assert other in top, f"greedy token {j}: {ta[j]} vs {tb[j]}, not a tie"
        gap = top[mine].logprob - top[other].logprob
        assert gap <= tie, f"greedy token {j}: {ta[j]} vs {tb[j]} at a {gap:.3f} gap, not a tie"


def check_batch_invariance(llm, prompts, sparsity: float, atol: float = 0.0,
                           exact: bool = True, tie: float = 0.0) -> None:
    """Each prompt alone gives the batch's decisions and tokens (logprobs within atol), routed
    at `sparsity` (set explicitly: prompt-logprob requests without a target run dense).
    Greedy tokens may part from a step where both runs are tied within `tie` between the
    two tokens (``check_tokens_or_tie``; 0: equal log-probabilities).

    exact=False (GPU kernels, whose bf16 rounding depends on the batch shape unless vLLM runs
    batch-invariant): decisions agree on >= BF16_DECISION_AGREEMENT of the pairs and prompt
    logprobs stay within the bf16 tolerance; tokens are not compared."""
    sampling = params(sparsity=sparsity, logprobs=BF16_TOP_LOGPROBS)
    batch, batch_masks = run(llm, prompts, sampling)
    for i in (0, len(prompts) - 1):
        alone, alone_masks = run(llm, [prompts[i]], sampling)
        got, want = prompt_logprobs(alone[0]), prompt_logprobs(batch[i])
        if exact:
            assert torch.equal(alone_masks[0], batch_masks[i])
            check_tokens_or_tie(alone[0].outputs[0], batch[i].outputs[0], tie)
            assert torch.allclose(got, want, atol=atol, rtol=0), (got - want).abs().max()
        else:
            agree = (alone_masks[0] == batch_masks[i]).float().mean().item()
            assert agree >= BF16_DECISION_AGREEMENT, agree
            assert torch.allclose(got, want, atol=BF16_ATOL, rtol=BF16_RTOL)
