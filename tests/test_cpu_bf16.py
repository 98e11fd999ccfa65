"""The start-up warning for bf16 on x86 CPUs without bf16 instructions (ftp_vllm.cpu_bf16)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from ftp_vllm.cpu_bf16 import BF16, bf16_advice, native_bf16
from ftp_vllm.plugin.memory import checkpoint_dtype, dtype_bytes, served_dtype


@pytest.mark.parametrize(("dtype", "checkpoint", "served"), [
    ("auto", "bfloat16", BF16),
    (None, "bfloat16", BF16),
    ("bf16", None, BF16),
    ("bfloat16", "float32", BF16),
    ("float32", "bfloat16", "float32"),
    ("auto", "torch.float16", "float16"),
    ("auto", None, "auto"),
])
def test_served_dtype_is_the_flag_or_the_checkpoints(dtype, checkpoint, served):
    assert served_dtype(dtype, checkpoint) == served
    # the KV-cache sizing counts the same dtype (unknown ones as 4 bytes: safe)
    assert dtype_bytes(dtype, checkpoint) == {BF16: 2, "float16": 2}.get(served, 4)


def test_only_bf16_on_a_cpu_known_to_lack_it_is_warned_about():
    advice = bf16_advice(BF16, native=False)
    assert advice is not None and "--dtype float32" in advice and "OPERATIONS.md" in advice
    assert bf16_advice(BF16, native=True) is None
    assert bf16_advice(BF16, native=None) is None  # not x86: not judged
    assert bf16_advice("float32", native=False) is None
    assert bf16_advice("float16", native=False) is None


def test_native_bf16_matches_the_cpu_flags():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert native_bf16() is None
        return
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    assert native_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})


def test_checkpoint_dtype_reads_the_model_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert checkpoint_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"dtype": "float16"}}))
    assert checkpoint_dtype(tmp_path) == "float16"
    assert checkpoint_dtype(tmp_path / "missing") is None
