"""Evaluation: zero-shot multiple-choice accuracy and perplexity of routed configurations.

- `scoring`: the `Scorer` interface (log-likelihood of token requests + compute accounting)
  and `ReferenceScorer` (the reference routed forward, requests flattened back to back).
- `harness`: lm-evaluation-harness-style tokenisation and acc / acc_norm; LAMBADA perplexity.
- `methods`: how each compared configuration (dense, ftp, static, static-uniform, random,
  shortgpt) becomes a scorer.
- `command`, `report`: the `ftp-vllm eval` and `ftp-vllm report` commands.
"""

from ftp_vllm.eval.harness import (
    HFEncoder,
    PerplexityResult,
    TaskResult,
    encode_pair,
    evaluate_task,
    perplexity,
)
from ftp_vllm.eval.scoring import ReferenceScorer, Request, Scorer, ScoreStats

__all__ = [
    "HFEncoder",
    "PerplexityResult",
    "ReferenceScorer",
    "Request",
    "ScoreStats",
    "Scorer",
    "TaskResult",
    "encode_pair",
    "evaluate_task",
    "perplexity",
]
