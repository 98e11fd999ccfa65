"""Log-likelihood scoring of (context, continuation) token requests, with compute accounting.

A `Scorer` answers one question: the summed log-probability of each request's continuation
tokens given its context tokens. The harness (`ftp_vllm.eval.harness`) turns task items into
such requests and knows nothing about how they are scored, so a scorer backed by a serving
engine (vLLM prompt logprobs) plugs in beside the reference scorer here without touching it.

Routing semantics: a request's *whole* token sequence (context + continuation) is one prompt,
routed as a serving engine would route it when asked for prompt logprobs. The continuation's
log-probabilities are read from that prompt's logits.

Compute accounting (`ScoreStats`): token sparsity is the fraction of (prompt token, block)
pairs skipped, and the FLOP fraction is routed prefill FLOPs over dense prefill FLOPs of the
same prompts (`ftp_vllm.flops`; a skipped token still pays for its K/V). Both are summed over
every prompt a scorer has seen, so they are token-weighted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftp_vllm.flops import BlockShape, prefill_flops
from ftp_vllm.reference import routed_forward
from ftp_vllm.routing.router import DenseRouter, TokenRouter
from ftp_vllm.routing.skip_update import SkipUpdate, rank_of

Request = tuple[list[int], list[int]]  # (context token ids, continuation token ids)

DEFAULT_BATCH_TOKENS = 512
DEFAULT_MAX_LENGTH = 2048


@dataclass
class ScoreStats:
    """Compute a scorer spent, summed over the prompts it scored.

    `token_blocks` counts (prompt token, block) pairs of the *dense* model, so a model with
    blocks removed (ShortGPT) shows its removed blocks as skipped pairs.
    """

    prompts: int = 0
    tokens: int = 0
    token_blocks: int = 0
    kept_token_blocks: int = 0
    flops: float = 0.0
    dense_flops: float = 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of (prompt token, block) pairs skipped."""
        return 1.0 - self.kept_token_blocks / self.token_blocks if self.token_blocks else 0.0

    @property
    def flop_fraction(self) -> float:
        """Routed prefill FLOPs over dense prefill FLOPs (1.0 = dense)."""
        return self.flops / self.dense_flops if self.dense_flops else 1.0

    def __add__(self, other: ScoreStats) -> ScoreStats:
        return ScoreStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: ScoreStats) -> ScoreStats:
        return ScoreStats(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def copy(self) -> ScoreStats:
        return ScoreStats(**asdict(self))

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "sparsity": self.sparsity, "flop_fraction": self.flop_fraction}


@runtime_checkable
class Scorer(Protocol):
    """Scores log-likelihood requests.

    `logprobs` returns, per request, the sum of log p(continuation token | everything before
    it), in request order. A scorer may also offer `token_logprobs(requests) ->
    list[list[float]]` (the same, token by token); perplexity uses it when present.
    `stats` is the running total of compute spent so far (a scorer that cannot measure it
    leaves it at zero). `describe` says what the scorer is, for the results file (its
    "scorer" entry names the engine: "reference" here, e.g. "vllm" for a serving engine).
    """

    stats: ScoreStats

    def logprobs(self, requests: Sequence[Request]) -> list[float]: ...

    def describe(self) -> dict: ...


class _NormedHidden(nn.Module):
    """A view of a causal LM whose `lm_head` is the identity: `routed_forward` then returns
    final-normed hidden states, and the scorer applies the real head only at the positions it
    needs (the vocabulary projection of every prompt token is a fifth of the work otherwise)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.model
        self.config = model.config
        self.lm_head = nn.Identity()


def pack(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy packing of sequences, in order, into groups of at most `max_tokens` tokens (a
    longer sequence gets a group of its own)."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, n in enumerate(lengths):
        if current and total + n > max_tokens:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        groups.append(current)
    return groups


def truncate(request: Request, max_length: int) -> tuple[list[int], int]:
    """The prompt (context + continuation, left-truncated to `max_length` tokens as
    lm-evaluation-harness does) and the continuation's length."""
    context, continuation = request
    if not continuation:
        raise ValueError("a request needs at least one continuation token")
    if not context:
        raise ValueError("a request needs at least one context token (use the prefix token)")
    if len(continuation) >= max_length:
        raise ValueError(f"continuation of {len(continuation)} tokens exceeds max length "
                         f"{max_length}")
    ids = (list(context) + list(continuation))[-max_length:]
    return ids, len(continuation)


class ReferenceScorer:
    """Scores requests with the reference routed forward (`ftp_vllm.reference`).

    Requests are flattened back to back into calls of about `batch_tokens` tokens; each
    request is its own prompt (its own routing decisions), so results do not depend on the
    batching for deterministic routers. `block_sparsity` ([L]) is the per-block target of
    every prompt. `dense_num_layers` is the block count of the dense model FLOPs and sparsity
    are measured against (defaults to this model's: set it for a model with blocks removed).
    """

    def __init__(
        self,
        model: nn.Module,
        router: TokenRouter | None = None,
        block_sparsity: Tensor | None = None,
        *,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_length: int = DEFAULT_MAX_LENGTH,
        dense_num_layers: int | None = None,
        name: str = "reference",
        window: int | None = None,
        skip_update: SkipUpdate | None = None,
    ):
        self.model = model
        self.hidden = _NormedHidden(model)
        self.router = router or DenseRouter()
        self.block_sparsity = block_sparsity
        self.batch_tokens = batch_tokens
        self.max_length = max_length
        self.num_layers = model.config.num_hidden_layers
        self.dense_num_layers = dense_num_layers or self.num_layers
        self.skip_update = skip_update  # what skipped tokens gain (None: nothing)
        self.shape = BlockShape.from_config(model.config, skip_rank=rank_of(skip_update))
        self.name = name
        self.window = window  # window routing (docs/ROUTER.md); None: whole prompts
        self.stats = ScoreStats()

    def describe(self) -> dict:
        return {
            "scorer": self.name,
            "router": type(self.router).__name__,
            "num_layers": self.num_layers,
            "dense_num_layers": self.dense_num_layers,
            "batch_tokens": self.batch_tokens,
            "max_length": self.max_length,
        }

    def logprobs(self, requests: Sequence[Request]) -> list[float]:
        return [math.fsum(t) for t in self.token_logprobs(requests)]

    @torch.no_grad()
    def token_logprobs(self, requests: Sequence[Request]) -> list[list[float]]:
        """Per request, log p of each continuation token given everything before it."""
        prompts = [truncate(r, self.max_length) for r in requests]
        out: list[list[float]] = [[] for _ in prompts]
        for group in pack([len(p[0]) for p in prompts], self.batch_tokens):
            scores = self._score_group([prompts[i] for i in group])
            for i, s in zip(group, scores, strict=True):
                out[i] = s
        return out

    def _score_group(self, prompts: list[tuple[list[int], int]]) -> list[list[float]]:
        lengths = [len(ids) for ids, _ in prompts]
        device = next(self.model.parameters()).device
        ids = torch.tensor([t for p, _ in prompts for t in p], dtype=torch.long, device=device)
        res = routed_forward(self.hidden, ids, lengths, self.router, self.block_sparsity,
                             window=self.window, skip_update=self.skip_update)
        # Positions whose next-token distribution predicts a continuation token.
        rows, targets = [], []
        start = 0
        for p, n_cont in prompts:
            end = start + len(p)
            rows.extend(range(end - n_cont - 1, end - 1))
            targets.extend(p[len(p) - n_cont :])
            start = end
        rows_t = torch.tensor(rows, device=device)
        logits = self.model.lm_head(res.logits[rows_t]).float()
        picked = F.log_softmax(logits, dim=-1).gather(
            1, torch.tensor(targets, device=device)[:, None]
        )[:, 0].double().tolist()
        out, pos = [], 0
        for _, n_cont in prompts:
            out.append(picked[pos : pos + n_cont])
            pos += n_cont
        self.stats.prompts += len(prompts)
        self._account(res.keep, res.layout.prompt_positions)  # windows: not in-window
        return out

    def _account(self, keep: Tensor, positions: Tensor) -> None:
        num_tokens = keep.shape[1]
        dense = torch.ones(self.dense_num_layers, num_tokens, dtype=torch.bool)
        self.stats.tokens += num_tokens
        self.stats.token_blocks += self.dense_num_layers * num_tokens
        self.stats.kept_token_blocks += int(keep.sum())
        self.stats.flops += prefill_flops(self.shape, keep.cpu(), positions.cpu())
        self.stats.dense_flops += prefill_flops(self.shape, dense, positions.cpu())
