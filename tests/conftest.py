"""Shared test fixtures: tiny random checkpoints on disk (Hugging Face folders)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_checkpoint

# vLLM on the CPU: a small KV cache keeps engine start-up fast in tests.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=2)


@pytest.fixture(scope="session")
def tiny_llama_hd64_dir(tmp_path_factory) -> Path:
    """Head size 64: the smallest every GPU backend takes (FlashInfer: 64, 128, 256, 512)."""
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-llama-hd64"), "llama", seed=3, hidden_size=256
    )
