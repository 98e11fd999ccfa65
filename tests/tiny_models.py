"""Tiny random Llama and Qwen2 models built by the tests (no download, seconds to make), and
router artifacts for them: the one place tests build models.

- ``tiny_model``: in memory (reference forward, training, evaluation tests);
- ``save_tiny_checkpoint``: a Hugging Face folder vLLM can load (head size 32 for vLLM's CPU
  attention kernels);
- ``make_tiny_chat_model``: such a folder carrying a real tokenizer and chat template, so
  the OpenAI chat and completions APIs work on it;
- ``make_artifact`` / ``make_router``: uniform-schedule artifacts (static router, or a random
  MLP router whose decisions use all four factors).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ftp_vllm.artifact import folder_fingerprint, uniform_artifact
from ftp_vllm.routing.router import MLPRouter, StaticRouter
from ftp_vllm.routing.skip_update import SkipUpdate

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
)
# head_dim 32: vLLM's CPU attention kernels need head sizes that are multiples of 32.
TINY_ENGINE = dict(
    TINY, vocab_size=256, hidden_size=128, intermediate_size=256, max_position_embeddings=1024,
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def prepared_default_model() -> Path:
    """The prepared SmolLM2-135M-Instruct folder (`ftp-vllm model prepare`; `make test` does
    it), or skip: its weights, tokenizer and chat template are what these tests use."""
    import pytest

    from ftp_vllm.model import default_model_dir, is_prepared

    path = default_model_dir()
    if not is_prepared(path):
        pytest.skip("SmolLM2-135M-Instruct is not prepared: run `ftp-vllm model prepare`")
    return path


def with_random_norms(model: Any) -> Any:
    """A freshly initialised model (all-ones norms) made fp32, eval, with perturbed norm
    weights, so fingerprints and routed math see real values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model = model.float().eval()
    model.config.torch_dtype = torch.float32
    return model


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random Llama or Qwen2 (fp32, perturbed norms); ``overrides`` change ``TINY``."""
    kw = {**TINY, **overrides}
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    else:
        raise ValueError(arch)
    return with_random_norms(model)


def save_tiny_checkpoint(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random model vLLM can serve (``TINY_ENGINE``) as a Hugging Face folder."""
    tiny_model(arch, seed, **{**TINY_ENGINE, **overrides}).save_pretrained(path)
    return Path(path)


def make_tiny_chat_model(path: Path, tokenizer_dir: Path, seed: int = 0,
                         num_layers: int = 4) -> Path:
    """``save_tiny_checkpoint`` with `tokenizer_dir`'s vocabulary, tokenizer files and chat
    template."""
    cfg_src = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    path = save_tiny_checkpoint(
        path, "llama", seed, vocab_size=int(cfg_src["vocab_size"]),
        num_hidden_layers=num_layers, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=cfg_src.get("bos_token_id"), eos_token_id=cfg_src.get("eos_token_id"),
    )
    for f in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / f).exists():
            shutil.copy(Path(tokenizer_dir) / f, path / f)
    return path


def scored_mlp_router(seed: int = 0, bias: float = -0.5) -> MLPRouter:
    """A random MLP router whose decisions mix all four factors and grow with the target
    (on the tests' tiny random Llama: about 21% / 39% skipped at targets 0.2 / 0.3)."""
    gen = torch.Generator().manual_seed(seed)
    router = MLPRouter()
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        router.net[0].weight.mul_(6.0)
        router.net[0].weight[:, 3] = 0
        router.net[0].weight[0, :] = 0
        router.net[0].weight[0, 3] = 4.0  # unit 0 carries the block target
        router.net[2].weight[:, 0] = torch.tensor([4.0, -4.0])  # higher target: skip more
        router.net[2].bias.copy_(torch.tensor([bias, 0.0]))
    return router.eval()


def make_artifact(path: str | Path, fingerprint: dict[str, Any], kind: str = "static",
                  targets: tuple[float, ...] = (0.2, 0.4), router: Any = None,
                  window: int | None = None, skip_rank: int = 0) -> Path:
    """A uniform-schedule artifact: static router, or `router` / a scored random MLP;
    window routing over `window`-token windows, else exact; a random skip update of
    `skip_rank` (0: none)."""
    if router is None:
        router = StaticRouter() if kind == "static" else scored_mlp_router()
    update = None
    if skip_rank:
        update = random_skip_update(int(fingerprint["num_hidden_layers"]),
                                    int(fingerprint["hidden_size"]), skip_rank)
    return uniform_artifact(path, fingerprint, router, kind, targets, {"made_by": "tests"},
                            window, update)


def random_skip_update(num_layers: int, hidden: int, rank: int, seed: int = 0) -> SkipUpdate:
    """A random skip update whose deltas are about a tenth of a normed state's size: large
    enough that a path which drops or misplaces it leaves the reference's tolerance."""
    gen = torch.Generator().manual_seed(seed)
    return SkipUpdate(
        torch.randn(num_layers, hidden, rank, generator=gen) / hidden ** 0.5,
        torch.randn(num_layers, rank, hidden, generator=gen) * (0.1 / rank ** 0.5),
        torch.randn(num_layers, hidden, generator=gen) * 0.05,
    )


def make_router(model_dir: Path, path: Path, kind: str = "mlp",
                targets: tuple[float, ...] = (0.2, 0.4), window: int | None = None) -> Path:
    """A router artifact for the checkpoint folder `model_dir` (window routing over `window`
    tokens, else exact)."""
    fingerprint, _ = folder_fingerprint(model_dir)
    return make_artifact(path, fingerprint, kind=kind, targets=targets, window=window)
