"""Tiny random Llama and Qwen2 models built by the tests (no download, seconds to make)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ftp_vllm.plugin.testing import with_random_norms

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY, rope_theta=10000.0))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, rope_theta=10000.0))
    else:
        raise ValueError(arch)
    return with_random_norms(model)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def make_tiny_chat_model(path: Path, tokenizer_dir: Path, seed: int = 0,
                         num_layers: int = 4) -> Path:
    """A tiny random Llama (head_dim 32 for vLLM's CPU kernels) with `tokenizer_dir`'s
    tokenizer files; fp32, norms perturbed so routing factors see real values."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_src = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=int(cfg_src["vocab_size"]), hidden_size=128, intermediate_size=256,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=10000.0, bos_token_id=cfg_src.get("bos_token_id"),
        eos_token_id=cfg_src.get("eos_token_id"),
    )
    model = LlamaForCausalLM(config)
    model = with_random_norms(model)
    path = Path(path)
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / f).exists():
            shutil.copy(Path(tokenizer_dir) / f, path / f)
    return path


def make_router(model_dir: Path, path: Path, kind: str = "mlp",
                targets: tuple[float, ...] = (0.2, 0.4)) -> Path:
    """A router artifact for `model_dir` (static, or the plugin's scored random MLP)."""
    from ftp_vllm.plugin.testing import hf_fingerprint, make_artifact

    fp, _ = hf_fingerprint(model_dir)
    return make_artifact(path, fp, kind=kind, targets=targets)
