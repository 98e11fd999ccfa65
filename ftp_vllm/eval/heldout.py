"""Held-out chat prompts for generation fidelity: BoolQ passages, never calibration text.

Source: the distinct passages of BoolQ's validation split (`ftp_vllm.data.tasks`, ~2,900
Wikipedia paragraphs of ~90 words). Router training, the schedule search and ShortGPT's Block
Influence read LAMBADA only (`ftp_vllm.data.calibration`), so these passages are text the
routers never saw; `heldout_passages` also refuses any passage that is a calibration passage.

A prompt is one user turn of the model's chat template: passages joined by blank lines, then
an instruction to summarise them. Each length bucket (about 64, 256, 1024, 2048 tokens) draws
passages in its own seeded order and takes whole passages until the next would overflow, then
the words of one more that still fit, so a prompt lands a few tokens under its bucket length.
Prompt i of a bucket does not depend on how many prompts or which other buckets are asked for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from typing import Any

from ftp_vllm.data import DataError, lambada_passages, load_task
from ftp_vllm.model import chat_prompt_ids

SOURCE = "boolq validation passages"
INSTRUCTION = "Summarize the text above in a few sentences."
DEFAULT_LENGTHS = (64, 256, 1024)


@dataclass(frozen=True)
class HeldoutPrompt:
    """One prompt: `ids` is the chat-templated user turn, ready for the reply."""

    bucket: int  # the length it was built for
    index: int  # its position within the bucket
    text: str  # the user message
    ids: tuple[int, ...]
    passages: int  # how many passages (the last possibly cut) it holds


@cache
def heldout_passages() -> tuple[str, ...]:
    """The distinct BoolQ validation passages, in file order (DataError if any is calibration
    text: then the data files changed and the separation must be re-checked)."""
    seen: dict[str, None] = {}
    for item in load_task("boolq"):
        passage = item.context.rsplit("\nQuestion: ", 1)[0].strip()
        if passage:
            seen.setdefault(passage, None)
    overlap = set(seen) & set(lambada_passages())
    if overlap:
        raise DataError(f"{len(overlap)} BoolQ passages are also LAMBADA calibration passages; "
                        f"held-out prompts must not contain calibration text")
    return tuple(seen)


def user_message(body: str) -> str:
    return f"{body}\n\n{INSTRUCTION}"


def build_prompts(tokenizer: Any, lengths: tuple[int, ...] | list[int], per_bucket: int,
                  seed: int = 0, passages: tuple[str, ...] | None = None,
                  ) -> list[HeldoutPrompt]:
    """`per_bucket` prompts of at most (and close to) each length in `lengths`, in tokens of
    the chat-templated prompt; from the held-out passages unless `passages` are given (the
    schedule search builds prompts of the same form from calibration text)."""
    if per_bucket < 1:
        raise ValueError(f"prompts per bucket must be >= 1, got {per_bucket}")
    passages = heldout_passages() if passages is None else passages
    overhead = len(chat_prompt_ids(tokenizer, user_message("")))
    prompts = []
    for length in lengths:
        if length < overhead + 8:
            raise ValueError(f"prompt length {length} leaves no room for text: the chat "
                             f"template and instruction alone take {overhead} tokens")
        order = list(range(len(passages)))
        random.Random(f"fidelity:{seed}:{length}").shuffle(order)
        stream = iter(order)
        for index in range(per_bucket):
            prompts.append(_fill(tokenizer, passages, stream, length, index))
    return prompts


def _fill(tokenizer: Any, passages: tuple[str, ...], stream, length: int,
          index: int) -> HeldoutPrompt:
    def size(parts: list[str]) -> int:
        return len(chat_prompt_ids(tokenizer, user_message("\n\n".join(parts))))

    parts: list[str] = []
    for i in stream:
        if size([*parts, passages[i]]) <= length:
            parts.append(passages[i])
            continue
        words = passages[i].split(" ")
        lo, hi = 0, len(words)  # the most leading words of this passage that still fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if size([*parts, " ".join(words[:mid])]) <= length:
                lo = mid
            else:
                hi = mid - 1
        if lo:
            parts.append(" ".join(words[:lo]))
        break
    else:
        raise DataError(f"ran out of passages building a {length}-token prompt")
    text = user_message("\n\n".join(parts))
    ids = tuple(int(t) for t in chat_prompt_ids(tokenizer, text))
    return HeldoutPrompt(bucket=length, index=index, text=text, ids=ids, passages=len(parts))
