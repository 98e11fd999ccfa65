"""Scoring through the vLLM engine: the served system's prompt logprobs, routed by the plugin.

Same `Scorer` interface as the reference scorer, so `ftp-vllm eval --engine vllm` runs the
same harness on what production serves. Routing decisions and compute come from the plugin's
worker statistics, not from a re-computation here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ftp_vllm.contract import SPARSITY_KEY, STATS_METHOD
from ftp_vllm.eval.scoring import DEFAULT_MAX_LENGTH, Request, ScoreStats, truncate
from ftp_vllm.flops import BlockShape, prefill_flops
from ftp_vllm.plugin import routing_overrides


class VLLMScorer:
    """Log-likelihoods from a vLLM engine (CPU here, GPU in the image) with prompt logprobs."""

    def __init__(
        self,
        model_dir: Path | str,
        artifact: Path | str | None,
        sparsity: float,
        max_length: int = DEFAULT_MAX_LENGTH,
        dtype: str = "float32",
    ):
        from transformers import AutoConfig
        from vllm import LLM

        from ftp_vllm.artifact import load_artifact
        from ftp_vllm.plugin.memory import llm_kv_kwargs
        from ftp_vllm.routing.skip_update import rank_of

        self.routed = artifact is not None and sparsity > 0
        self.sparsity = sparsity if self.routed else 0.0
        self.max_length = max_length
        self.stats = ScoreStats()
        config = AutoConfig.from_pretrained(model_dir)
        update = load_artifact(artifact).skip_update if self.routed else None
        # the engine applies the artifact's skip update: its FLOPs count
        self.shape = BlockShape.from_config(config, skip_rank=rank_of(update))
        self.num_layers = config.num_hidden_layers
        overrides = routing_overrides(artifact, sparsity) if self.routed else None
        self.llm = LLM(
            model=str(model_dir), dtype=dtype, hf_overrides=overrides, seed=0,
            max_model_len=max_length, enable_prefix_caching=False,
            **llm_kv_kwargs(model_dir, dtype=dtype, max_model_len=max_length),
        )

    def describe(self) -> dict:
        return {"scorer": "vllm", "routed": self.routed, "sparsity": self.sparsity}

    def logprobs(self, requests: Sequence[Request]) -> list[float]:
        return [sum(lp) for lp in self.token_logprobs(requests)]

    def token_logprobs(self, requests: Sequence[Request]) -> list[list[float]]:
        from vllm import SamplingParams, TokensPrompt

        prompts = [truncate(r, self.max_length) for r in requests]
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0,
            extra_args={SPARSITY_KEY: self.sparsity},
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids, _ in prompts], params, use_tqdm=False
        )
        result = []
        for (ids, n_cont), out in zip(prompts, outputs, strict=True):
            start = len(ids) - n_cont
            result.append([out.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))])
        self._account([len(ids) for ids, _ in prompts])
        return result

    def _account(self, lengths: list[int]) -> None:
        import torch

        pairs = sum(lengths) * self.num_layers
        dense = sum(
            prefill_flops(self.shape, torch.ones(self.num_layers, n, dtype=torch.bool),
                          torch.arange(n))
            for n in lengths
        )
        step = ScoreStats(prompts=len(lengths), tokens=sum(lengths), token_blocks=pairs,
                          kept_token_blocks=pairs, flops=dense, dense_flops=dense)
        if self.routed:
            stats = self.llm.collective_rpc(STATS_METHOD, kwargs={"reset": True})[0]
            step.kept_token_blocks = pairs - int(stats["skipped_pairs"])
            step.flops = dense * float(stats["routed_flops"]) / float(stats["dense_flops"])
        self.stats = self.stats + step
