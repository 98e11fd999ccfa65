"""Generation fidelity against dense: what a chat user of a routed server would notice.

For each prompt, the dense model's greedy continuation (up to N new tokens, stopping at EOS)
is the reference. A routed configuration is measured against it with the reference routed
forward (`ftp_vllm.reference`, the oracle the vLLM plugin is proven against):

- **first-token KL**: KL(dense || routed) of the next-token distribution after the prompt,
  in nats (the first generated token is where all prompt routing acts; later tokens also see
  dense-computed generated tokens).
- **top-1 agreement**: whether the routed first token (argmax) equals dense's.
- **matching length**: how many leading tokens of the routed greedy continuation equal the
  dense one (0..N; N, or the dense length if dense stopped at EOS, is a full match).
- **realized sparsity**: fraction of (prompt token, block) pairs skipped, counted against the
  dense model's blocks (so ShortGPT's removed blocks count as skipped).

Greedy decoding by teacher forcing: prompt tokens are routed, generated tokens run dense, and a
prompt token's decisions depend on the prompt alone (as in `greedy_generate`). So the routed
greedy continuation equals dense's exactly as long as, at every step, the routed argmax given
the prompt and dense's tokens so far is dense's next token: one routed forward over the prompt
plus dense's continuation gives the first-token distribution and the matching length at once,
where `greedy_generate` would need N forwards. The dense continuation itself is the reference
forward's own greedy output: drafted with the Hugging Face model's cached `generate` and
verified (and corrected where they differ) by teacher-forced reference forwards.

The numeric noise floor is the same measurement of dense in another dtype (float32 against
the bfloat16 reference, as served): differences below it are rounding, not routing.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftp_vllm.reference import routed_forward
from ftp_vllm.routing.router import DenseRouter, TokenRouter
from ftp_vllm.routing.skip_update import SkipUpdate


@dataclass
class DenseReference:
    """Dense greedy output for one prompt: the continuation and the first token's logits."""

    prompt: list[int]
    continuation: list[int]  # 1..N tokens; the last is EOS if dense stopped early
    first_logits: Tensor  # [V] float32
    corrections: int = 0  # draft tokens the reference forward overruled


@dataclass
class PromptFidelity:
    """One prompt's measurement against its dense reference."""

    bucket: int
    prompt_tokens: int
    kl: float
    top1: bool
    match: int
    dense_tokens: int
    kept_token_blocks: int
    token_blocks: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept_token_blocks / self.token_blocks

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity}


def teacher_forced(model: nn.Module, prompt: Sequence[int], continuation: Sequence[int],
                   router: TokenRouter | None = None, block_sparsity: Tensor | None = None,
                   window: int | None = None, skip_update: SkipUpdate | None = None,
                   ) -> tuple[Tensor, Tensor]:
    """(logits [len(continuation), V] float32, keep [L, len(prompt)]): the logits predicting
    each continuation token given the prompt and the continuation before it, with the prompt
    routed and the continuation dense."""
    device = next(model.parameters()).device
    n = len(prompt)
    ids = torch.tensor([*prompt, *continuation[:-1]], dtype=torch.long, device=device)
    rows = torch.arange(n - 1, n - 1 + len(continuation), device=device)
    out = routed_forward(model, ids, [ids.numel()], router or DenseRouter(), block_sparsity,
                         routed_lengths=[n], logits_at=rows, window=window,
                         skip_update=skip_update)
    return out.logits.float(), out.keep


def first_mismatch(predicted: Sequence[int], reference: Sequence[int]) -> int:
    """Index of the first position where the sequences differ (their common length if none)."""
    for i, (a, b) in enumerate(zip(predicted, reference, strict=False)):
        if a != b:
            return i
    return min(len(predicted), len(reference))


class _Drafter:
    """Greedy tokens from the Hugging Face model with its KV cache: fast, but numerically not
    the reference forward (bfloat16 rounding differs), so only a draft. After a correction
    the cache is cut back to the corrected position and drafting resumes from there."""

    def __init__(self, model: nn.Module, prompt: list[int], eos_token_id: int | None):
        from transformers import DynamicCache

        self.model = model
        self.n = len(prompt)
        self.eos = eos_token_id
        self.cache = DynamicCache(config=model.config)
        self.device = next(model.parameters()).device
        self.first = self._next(prompt)

    def _next(self, ids: list[int]) -> int:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1)
        return int(out.logits[0, -1].argmax())

    def extend(self, continuation: list[int], limit: int) -> list[int]:
        """`continuation` (its tokens settled) drafted on to `limit` tokens or through EOS."""
        if not continuation:
            continuation = [self.first]
        surplus = self.cache.get_seq_length() - (self.n + len(continuation) - 1)
        if surplus > 0:  # keep the prompt and all but the continuation's last token
            self.cache.crop(-surplus)
        out = list(continuation)
        while len(out) < limit and out[-1] != self.eos:
            out.append(self._next([out[-1]]))
        return out


@torch.no_grad()
def dense_reference(model: nn.Module, prompt: Sequence[int], new_tokens: int,
                    eos_token_id: int | None = None) -> DenseReference:
    """The reference forward's dense greedy continuation of `prompt` (up to `new_tokens`,
    through EOS), found by draft-and-verify: each verification settles at least one more
    token, so at most `new_tokens` + 1 reference forwards (usually a few)."""
    if new_tokens < 1:
        raise ValueError(f"new tokens must be >= 1, got {new_tokens}")
    prompt = list(prompt)
    drafter = _Drafter(model, prompt, eos_token_id)
    cont = drafter.extend([], new_tokens)
    corrections = 0
    for _ in range(new_tokens + 1):
        logits, _keep = teacher_forced(model, prompt, cont)
        pred = logits.argmax(dim=-1).tolist()
        j = first_mismatch(pred, cont)
        if j == len(cont):
            return DenseReference(prompt, cont, logits[0].clone(), corrections)
        corrections += 1
        cont = drafter.extend([*cont[:j], pred[j]], new_tokens)
    raise RuntimeError(f"dense greedy continuation did not settle after {new_tokens + 1} "
                       f"verifications (prompt of {len(prompt)} tokens)")


def kl_divergence(reference_logits: Tensor, logits: Tensor) -> float:
    """KL(P || Q) in nats, P from `reference_logits`, Q from `logits` (computed in float64)."""
    p = F.log_softmax(reference_logits.double(), dim=-1)
    q = F.log_softmax(logits.double(), dim=-1)
    return max(0.0, float((p.exp() * (p - q)).sum()))


@torch.no_grad()
def measure(model: nn.Module, reference: DenseReference, bucket: int,
            router: TokenRouter | None = None, block_sparsity: Tensor | None = None,
            dense_num_layers: int | None = None, window: int | None = None,
            skip_update: SkipUpdate | None = None) -> PromptFidelity:
    """One prompt's fidelity of a configuration (model + router + per-block targets)."""
    logits, keep = teacher_forced(model, reference.prompt, reference.continuation, router,
                                  block_sparsity, window, skip_update)
    pred = logits.argmax(dim=-1).tolist()
    n = len(reference.prompt)
    layers = dense_num_layers or model.config.num_hidden_layers
    return PromptFidelity(
        bucket=bucket,
        prompt_tokens=n,
        kl=kl_divergence(reference.first_logits, logits[0]),
        top1=pred[0] == reference.continuation[0],
        match=first_mismatch(pred, reference.continuation),
        dense_tokens=len(reference.continuation),
        kept_token_blocks=int(keep.sum()),
        token_blocks=layers * n,
    )


def aggregate(rows: Sequence[PromptFidelity]) -> dict:
    """Mean KL, agreement rate, matching lengths and realized sparsity over `rows`
    (sparsity token-weighted: skipped pairs over all pairs)."""
    if not rows:
        raise ValueError("no prompts to aggregate")
    kls = [r.kl for r in rows]
    matches = [r.match for r in rows]
    return {
        "prompts": len(rows),
        "prompt_tokens_mean": statistics.fmean(r.prompt_tokens for r in rows),
        "kl_mean": statistics.fmean(kls),
        "kl_median": statistics.median(kls),
        "top1_agreement": sum(r.top1 for r in rows) / len(rows),
        "match_mean": statistics.fmean(matches),
        "match_median": statistics.median(matches),
        "full_match_rate": sum(r.match == r.dense_tokens for r in rows) / len(rows),
        "dense_tokens_mean": statistics.fmean(r.dense_tokens for r in rows),
        "sparsity": 1.0 - sum(r.kept_token_blocks for r in rows)
        / sum(r.token_blocks for r in rows),
    }


def mean_interval(values: Sequence[float], level: float = 0.9, resamples: int = 2000,
                  seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over prompts. Per-prompt KL is heavy-tailed
    (one prompt in 24 can carry a third of the mean), so a mean over a few dozen prompts is
    shown with how far another draw of prompts could move it; seeded, so a report is stable."""
    if not values:
        raise ValueError("no values")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    lo = means[int((1 - level) / 2 * (resamples - 1))]
    hi = means[int((1 + level) / 2 * (resamples - 1))]
    return lo, hi


def summarize(rows: Sequence[PromptFidelity]) -> dict:
    """Overall aggregate plus one per prompt-length bucket (keys are the bucket lengths)."""
    buckets: dict[int, list[PromptFidelity]] = {}
    for r in rows:
        buckets.setdefault(r.bucket, []).append(r)
    return {"overall": aggregate(rows),
            "buckets": {str(b): aggregate(rs) for b, rs in sorted(buckets.items())}}
