"""Shared test fixtures: tiny random checkpoints on disk (Hugging Face folders)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ftp_vllm.plugin.testing import with_random_norms

# vLLM on the CPU: a small KV cache keeps engine start-up fast in tests.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# head_dim 32: vLLM's CPU attention kernels need head sizes that are multiples of 32.
TINY_CHECKPOINT = dict(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
)


def make_tiny_checkpoint(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random Llama or Qwen2 (fp32, perturbed norms) as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = {**TINY_CHECKPOINT, **overrides}
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    else:
        raise ValueError(arch)
    model = with_random_norms(model)
    model.save_pretrained(path)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=2)


@pytest.fixture(scope="session")
def tiny_llama_hd64_dir(tmp_path_factory) -> Path:
    """Head size 64: the smallest every GPU backend takes (FlashInfer: 64, 128, 256, 512)."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-llama-hd64"), "llama", seed=3, hidden_size=256
    )
