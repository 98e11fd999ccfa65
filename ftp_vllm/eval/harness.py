"""Zero-shot multiple-choice evaluation by log-likelihood, as lm-evaluation-harness does it.

For each item, each choice i is the request (contexts[i], continuations[i]); its score is the
summed log-probability of the continuation tokens. The prediction is

- `acc`: argmax of the summed log-probability;
- `acc_norm`: argmax of the summed log-probability divided by the continuation's length in
  UTF-8 bytes, without the leading target delimiter (lm-evaluation-harness divides by the
  length of the answer text; the same for ASCII text). Where all choices share one
  continuation (WinoGrande's partial scoring) acc_norm equals acc.

Ties go to the first choice (numpy's argmax). Text is tokenised as lm-evaluation-harness's
Hugging Face model does (`encode_pair`): trailing spaces of the context move to the front of
the continuation, the continuation's tokens are those of encode(context + continuation) past
len(encode(context)), no special tokens are added, and an empty context becomes the prefix
token (BOS, else EOS).

The scorer (`ftp_vllm.eval.scoring.Scorer`) decides how requests are scored: the reference
routed forward, a pruned model, or a serving engine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ftp_vllm.eval.scoring import Request, Scorer, ScoreStats, pack

DEFAULT_CHUNK_TOKENS = 512


class TextEncoder(Protocol):
    """What the harness needs of a tokenizer."""

    prefix_token_id: int

    def encode(self, text: str) -> list[int]: ...


class HFEncoder:
    """A Hugging Face tokenizer as a `TextEncoder` (no special tokens added, like
    lm-evaluation-harness's HFLM with its default add_bos_token=False)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix_token_id = bos if bos is not None else tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def encode_pair(encoder: TextEncoder, context: str, continuation: str) -> Request:
    """(context ids, continuation ids) split as lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [encoder.prefix_token_id], encoder.encode(continuation)
    whole = encoder.encode(context + continuation)
    ctx = encoder.encode(context)
    cont = whole[len(ctx) :]
    if not cont:  # the tokenizer swallowed the continuation into the context's last token
        cont = encoder.encode(continuation)
    return ctx, cont


def norm_length(continuation: str) -> int:
    """Length for acc_norm: UTF-8 bytes of the continuation without its leading delimiter."""
    return max(len(continuation.removeprefix(" ").encode("utf-8")), 1)


def argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def predict(item: Any, lls: Sequence[float]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction) for one item from its choices' log-likelihoods."""
    norm = [ll / norm_length(c) for ll, c in zip(lls, item.continuations, strict=True)]
    return argmax(lls), argmax(norm)


def stderr(p: float, n: int) -> float:
    """Standard error of a mean of n Bernoulli outcomes (lm-evaluation-harness's formula)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


@dataclass
class TaskResult:
    task: str
    n: int
    acc: float
    acc_norm: float
    stats: ScoreStats
    seconds: float
    predictions: list[tuple[str, int, int, int]] = field(default_factory=list)  # id, label, p, pn
    chance: float = 0.0  # expected accuracy of uniform guessing: mean of 1 / choices

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "acc": self.acc,
            "acc_stderr": stderr(self.acc, self.n),
            "acc_norm": self.acc_norm,
            "acc_norm_stderr": stderr(self.acc_norm, self.n),
            "sparsity": self.stats.sparsity,
            "flop_fraction": self.stats.flop_fraction,
            "prompts": self.stats.prompts,
            "prompt_tokens": self.stats.tokens,
            "seconds": self.seconds,
            "seconds_per_item": self.seconds / self.n if self.n else 0.0,
            "chance": self.chance,
            # Per item, in item order (fixed by task, limit and seed): the predicted choice
            # (one character per item, 0-9 then a-z) and 1/0 for correct. Lets two results
            # files be compared item by item (agreement, paired tests).
            "pred": "".join(_digit(p) for _, _, p, _ in self.predictions),
            "pred_norm": "".join(_digit(p) for _, _, _, p in self.predictions),
            "correct": "".join(str(int(p == lab)) for _, lab, p, _ in self.predictions),
            "correct_norm": "".join(str(int(p == lab)) for _, lab, _, p in self.predictions),
        }


def _digit(i: int) -> str:
    return "0123456789abcdefghijklmnopqrstuvwxyz"[i] if 0 <= i < 36 else "?"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, dynamic_ncols=True)


def evaluate_task(
    task: str,
    items: Sequence[Any],
    encoder: TextEncoder,
    scorer: Scorer,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
) -> TaskResult:
    """Accuracy and length-normalised accuracy of `scorer` on multiple-choice `items`
    (`ftp_vllm.data.tasks.MCItem`: contexts, continuations, label). Items are scored in
    chunks of about `chunk_tokens` prompt tokens, all their choices in one scorer call."""
    t0 = time.perf_counter()
    before = scorer.stats.copy()
    requests = [[encode_pair(encoder, c, k) for c, k in item.requests()] for item in items]
    sizes = [sum(len(c) + len(k) for c, k in reqs) for reqs in requests]
    correct = correct_norm = 0
    predictions = []
    with _progress(len(items), task, progress) as bar:
        for chunk in pack(sizes, chunk_tokens):
            flat = [r for i in chunk for r in requests[i]]
            lls = scorer.logprobs(flat)
            pos = 0
            for i in chunk:
                item = items[i]
                k = len(requests[i])
                pred, pred_norm = predict(item, lls[pos : pos + k])
                pos += k
                correct += pred == item.label
                correct_norm += pred_norm == item.label
                predictions.append((str(item.id), item.label, pred, pred_norm))
            bar.update(len(chunk))
    n = len(items)
    return TaskResult(
        task=task,
        n=n,
        acc=correct / n if n else 0.0,
        acc_norm=correct_norm / n if n else 0.0,
        stats=scorer.stats - before,
        seconds=time.perf_counter() - t0,
        predictions=predictions,
        chance=sum(1 / len(r) for r in requests) / n if n else 0.0,
    )


@dataclass
class PerplexityResult:
    """Two signals from one routed prompt per passage ([prefix token] + passage):

    - passage perplexity: exp(mean NLL of every passage token), as the prompt's logprobs come
      back from a serving engine (a token that skipped every block predicts badly, and
      this shows it);
    - last-word perplexity: exp(mean over passages of the final word's NLL), LAMBADA's own
      metric (lm-evaluation-harness's `perplexity`), read off the end of the same prompt.
    """

    passages: int
    tokens: int
    bytes: int
    nll: float  # summed negative log-likelihood of all passage tokens (nats)
    word_nll: float  # summed negative log-likelihood of the final words (nats)
    word_tokens: int
    stats: ScoreStats
    seconds: float

    @property
    def perplexity(self) -> float:
        return _exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / self.bytes / math.log(2) if self.bytes else float("nan")

    @property
    def word_perplexity(self) -> float:
        return _exp(self.word_nll / self.passages) if self.passages else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "passages": self.passages,
            "tokens": self.tokens,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "word_perplexity": self.word_perplexity,
            "word_tokens": self.word_tokens,
            "sparsity": self.stats.sparsity,
            "flop_fraction": self.stats.flop_fraction,
            "seconds": self.seconds,
        }


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def split_last_word(passage: str) -> tuple[str, str]:
    """(context, " lastword") of a LAMBADA passage."""
    text = passage.rstrip()
    cut = text.rfind(" ")
    return (text[:cut], text[cut:]) if cut > 0 else ("", text)


def perplexity(
    passages: Sequence[str],
    encoder: TextEncoder,
    scorer: Scorer,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    max_tokens: int = 1024,
    progress: bool = True,
    desc: str = "lambada ppl",
) -> PerplexityResult:
    """Passage and last-word perplexity (`PerplexityResult`). Each passage is one prompt:
    [prefix token] + context tokens + final-word tokens (split as `encode_pair` splits them;
    the context left-truncated to `max_tokens` in all), every token after the prefix scored.
    Scorers without `token_logprobs` are asked twice (whole passage, then final word)."""
    t0 = time.perf_counter()
    before = scorer.stats.copy()
    pairs = []
    for p in passages:
        ctx, word = encode_pair(encoder, *split_last_word(p))
        if ctx == [encoder.prefix_token_id]:
            ctx = []
        ctx = ctx[max(len(ctx) + len(word) - max_tokens, 0) :]
        pairs.append((ctx, word))
    nll = word_nll = 0.0
    per_token = getattr(scorer, "token_logprobs", None)
    prefix = encoder.prefix_token_id
    with _progress(len(passages), desc, progress) as bar:
        for chunk in pack([1 + len(c) + len(w) for c, w in pairs], chunk_tokens):
            whole = [([prefix], pairs[i][0] + pairs[i][1]) for i in chunk]
            if per_token is not None:
                for i, lps in zip(chunk, per_token(whole), strict=True):
                    nll -= math.fsum(lps)
                    word_nll -= math.fsum(lps[len(lps) - len(pairs[i][1]) :])
            else:
                nll -= math.fsum(scorer.logprobs(whole))
                word_nll -= math.fsum(scorer.logprobs(
                    [([prefix, *pairs[i][0]], pairs[i][1]) for i in chunk]))
            bar.update(len(chunk))
    return PerplexityResult(
        passages=len(passages),
        tokens=sum(len(c) + len(w) for c, w in pairs),
        bytes=sum(len(p.encode("utf-8")) for p in passages),
        nll=nll,
        word_nll=word_nll,
        word_tokens=sum(len(w) for _, w in pairs),
        stats=scorer.stats - before,
        seconds=time.perf_counter() - t0,
    )
