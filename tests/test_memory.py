"""The CPU KV-cache sizing rule (ftp_vllm.plugin.memory): simulated nodes, no engine."""

from __future__ import annotations

import pytest

from ftp_vllm.plugin.memory import (
    ENV_KV_SPACE,
    KV_CAP_BYTES,
    GiB,
    MemoryTooSmallError,
    ModelMemory,
    NodeMemory,
    auto_kv_cache,
    choose_kv_cache,
    model_memory,
    read_node_memory,
    user_kv_setting,
)
from tests.memory_helpers import SMOLLM2

MiB = 1 << 20


def node(available_gib: float, total_gib: float) -> NodeMemory:
    return NodeMemory(total=int(total_gib * GiB), available=int(available_gib * GiB))


def test_small_node_takes_half_of_what_is_left():
    choice = choose_kv_cache(node(4.0, 6.0), SMOLLM2)
    left = 4.0 * GiB - SMOLLM2.weights - 2 * GiB  # engine core + one worker
    assert choice.kv_bytes == pytest.approx(left / 2, abs=MiB)
    assert choice.limited_by == "a share of the free memory"
    assert choice.kv_bytes >= SMOLLM2.one_sequence


def test_big_node_is_capped():
    choice = choose_kv_cache(node(900, 1024), SMOLLM2)
    assert choice.kv_bytes == KV_CAP_BYTES and choice.limited_by == "the cap"


def test_no_more_than_the_engine_can_use():
    short = ModelMemory(weights=SMOLLM2.weights, kv_per_token=23_040, max_model_len=512,
                        max_num_seqs=4)
    choice = choose_kv_cache(node(900, 1024), short)
    assert choice.kv_bytes == pytest.approx(23_040 * 512 * 4, abs=MiB)
    assert choice.limited_by == "max_model_len x max_num_seqs"


def test_nearly_full_node_gets_one_sequence():
    # 2.45 GiB free of 64: half of what is left is below one 8192-token sequence (0.18 GiB).
    choice = choose_kv_cache(node(2.45, 64), SMOLLM2)
    assert choice.limited_by == "one max_model_len sequence"
    assert SMOLLM2.one_sequence <= choice.kv_bytes < SMOLLM2.one_sequence + MiB


def test_too_small_says_what_is_free_needed_and_what_to_do():
    with pytest.raises(MemoryTooSmallError) as e:
        choose_kv_cache(node(1.5, 9.59), SMOLLM2)
    msg = str(e.value)
    assert "1.50 of 9.59 GiB available" in msg
    assert "needs about 2.43 GiB" in msg  # 0.25 weights + 2 engine + 0.18 one sequence
    for hint in ("--max-model-len", ENV_KV_SPACE, "--kv-cache-memory-bytes", "other processes"):
        assert hint in msg
    assert isinstance(e.value, ValueError)  # `ftp-vllm serve` prints it without a traceback


def test_workers_share_the_budget():
    tp2 = ModelMemory(weights=SMOLLM2.weights, kv_per_token=23_040, max_model_len=8192,
                      max_num_seqs=256, workers=2)
    choice = choose_kv_cache(node(8, 16), tp2)
    left = 8 * GiB - tp2.weights - 3 * GiB  # engine core + two workers
    assert choice.total_kv == pytest.approx(left / 2, abs=2 * MiB)
    assert choice.kv_bytes == pytest.approx(choice.total_kv / 2, abs=MiB)


def test_the_log_line_names_numbers_and_overrides():
    text = choose_kv_cache(node(6.0, 9.59), SMOLLM2).describe()
    assert text.startswith("KV cache: ")
    for part in ("6.00 of 9.59 GiB available", "weights 0.25 GiB", "tokens",
                 f"{ENV_KV_SPACE}=<GiB>", "--kv-cache-memory-bytes", "--gpu-memory-utilization"):
        assert part in text


def test_user_override_is_respected():
    env: dict[str, str] = {}
    assert user_kv_setting(env) is None
    assert user_kv_setting({ENV_KV_SPACE: "3"}) == f"{ENV_KV_SPACE}=3"
    assert user_kv_setting(env, gpu_memory_utilization=0.5) is not None
    assert user_kv_setting(env, kv_cache_memory_bytes=GiB) is not None
    kw = dict(on_cpu=True, memory=node(6, 8), max_model_len=1024)
    assert auto_kv_cache("nowhere", environ={ENV_KV_SPACE: "3"}, **kw) is None
    assert auto_kv_cache("nowhere", environ=env, gpu_memory_utilization=0.3, **kw) is None
    assert auto_kv_cache("nowhere", environ=env, kv_cache_memory_bytes=GiB, **kw) is None
    assert auto_kv_cache("nowhere", environ=env, on_cpu=False, memory=node(6, 8)) is None
    # An unknown model (no folder, no config) still gets a size from the free memory.
    choice = auto_kv_cache("nowhere", environ=env, **kw)
    assert choice is not None and 0 < choice.kv_bytes <= KV_CAP_BYTES


def _fake_root(tmp_path, nodes: dict[int, tuple[int, int, int]], mems_allowed: str,
               cgroup: dict[str, str] | None = None):
    """A fake / with node meminfo files (MemTotal, MemFree, Inactive(file) in kB)."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/status").write_text(f"Name:\tpython\nMems_allowed_list:\t"
                                               f"{mems_allowed}\n")
    (tmp_path / "proc/meminfo").write_text("MemTotal: 999 kB\nMemAvailable: 999 kB\n")
    for n, (total, free, inactive_file) in nodes.items():
        d = tmp_path / f"sys/devices/system/node/node{n}"
        d.mkdir(parents=True)
        d.joinpath("meminfo").write_text(
            f"Node {n} MemTotal: {total} kB\nNode {n} MemFree: {free} kB\n"
            f"Node {n} Active(file): 1024 kB\nNode {n} Inactive(file): {inactive_file} kB\n"
            f"Node {n} SReclaimable: 1024 kB\n")
    for rel, text in (cgroup or {}).items():
        p = tmp_path / "sys/fs/cgroup" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_reader_mirrors_vllm_node_formula_and_takes_the_worst_node(tmp_path):
    root = _fake_root(tmp_path, {0: (8 << 20, 2 << 20, 1 << 20), 1: (8 << 20, 1 << 20, 0)},
                      "0-1", {"memory.max": "max\n"})
    m = read_node_memory(root, environ={})
    assert (m.node, m.total) == (1, 8 * GiB)
    assert m.available == (1 << 30) + 2 * 1024 * 1024  # free + file pages + reclaimable
    m0 = read_node_memory(root, environ={"CPU_VISIBLE_MEMORY_NODES": "0"})
    assert m0.node == 0 and m0.available == 3 * GiB + 2 * MiB


@pytest.mark.parametrize("cgroup", [
    {"memory.max": str(4 * GiB), "memory.current": str(3 * GiB)},  # v2
    {"memory/memory.limit_in_bytes": str(4 * GiB),
     "memory/memory.usage_in_bytes": str(3 * GiB)},  # v1
])
def test_container_limit_below_the_node_wins(tmp_path, cgroup):
    root = _fake_root(tmp_path, {0: (64 << 20, 60 << 20, 0)}, "0", cgroup)
    m = read_node_memory(root, environ={})
    assert m.total == 4 * GiB and m.available == GiB and m.cgroup_limit == 4 * GiB
    assert "cgroup limit 4.00 GiB" in m.describe()
    with pytest.raises(MemoryTooSmallError, match="raise the container's memory limit"):
        choose_kv_cache(m, SMOLLM2)


def test_unlimited_cgroup_v1_and_missing_node_files(tmp_path):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/status").write_text("Mems_allowed_list:\t0\n")
    (tmp_path / "proc/meminfo").write_text(
        "MemTotal: 16777216 kB\nMemFree: 1048576 kB\nMemAvailable: 8388608 kB\n")
    (tmp_path / "sys/fs/cgroup/memory").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/memory/memory.limit_in_bytes").write_text(
        "9223372036854771712\n")
    m = read_node_memory(tmp_path, environ={})
    assert (m.total, m.available, m.cgroup_limit) == (16 * GiB, 8 * GiB, None)


def test_reader_matches_vllm_on_this_machine():
    cpu_resource_utils = pytest.importorskip("vllm.utils.cpu_resource_utils")
    ours = read_node_memory()
    theirs = cpu_resource_utils.get_memory_node_info(ours.node)
    assert ours.total == theirs.total_memory
    assert ours.available == pytest.approx(theirs.available_memory, abs=256 * MiB)


def test_model_memory_from_a_checkpoint(tmp_path):
    from tests.tiny_models import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "m")  # fp32 on disk, 4 layers, 2 KV heads x 32
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    m = model_memory(folder, dtype="float32", max_model_len=256)
    assert m.weights == params * 4
    assert m.kv_per_token == 2 * 4 * 2 * 32 * 4 and m.max_model_len == 256
    half = model_memory(folder, dtype="bfloat16", kv_cache_dtype="fp8")
    assert half.weights == params * 2 and half.kv_per_token == 2 * 4 * 2 * 32 * 1
    assert half.max_model_len == 1024  # the config's max_position_embeddings
    assert model_memory(folder, tensor_parallel_size=2).workers == 2


def test_model_memory_of_the_default_model():
    from ftp_vllm.model import default_model_dir, is_prepared

    if not is_prepared(default_model_dir()):
        pytest.skip("the default model is not prepared (`ftp-vllm model prepare`)")
    m = model_memory(default_model_dir())
    assert m.kv_per_token == SMOLLM2.kv_per_token and m.max_model_len == 8192
    assert m.weights == pytest.approx(SMOLLM2.weights, rel=0.01)


@pytest.mark.vllm
def test_serve_applies_the_rule_unless_the_user_sized_it(tmp_path, monkeypatch):
    """`ftp-vllm serve` argument handling: the rule fills --kv-cache-memory-bytes and leaves
    vLLM's default utilization; a user's flag or env wins."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    from ftp_vllm.server.app import prepare_args, size_kv_cache
    from tests.tiny_models import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "m")
    monkeypatch.delenv(ENV_KV_SPACE, raising=False)
    args, _ = prepare_args([str(folder), "--max-model-len", "256"])
    choice = size_kv_cache(args)
    assert choice is not None and args.kv_cache_memory_bytes == choice.kv_bytes
    assert args.gpu_memory_utilization == EngineArgs.gpu_memory_utilization
    assert choice.model.max_model_len == 256 and choice.model.max_num_seqs == 128
    args, _ = prepare_args([str(folder), "--gpu-memory-utilization", "0.5"])
    assert size_kv_cache(args) is None
    assert args.kv_cache_memory_bytes is None and args.gpu_memory_utilization == 0.5
    args, _ = prepare_args([str(folder), "--kv-cache-memory-bytes", "123456789"])
    assert size_kv_cache(args) is None and args.kv_cache_memory_bytes == 123456789
    monkeypatch.setenv(ENV_KV_SPACE, "1")
    args, _ = prepare_args([str(folder)])
    assert size_kv_cache(args) is None and args.kv_cache_memory_bytes is None


@pytest.mark.vllm
def test_serve_stops_with_the_clear_error_when_memory_is_too_small(tmp_path):
    """A real shortage, no simulation: one 100M-token sequence of K/V fits nowhere here."""
    pytest.importorskip("vllm")
    import os
    import subprocess
    import sys

    from tests.tiny_models import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "m")
    env = {k: v for k, v in os.environ.items() if k != ENV_KV_SPACE}
    out = subprocess.run([sys.executable, "-m", "ftp_vllm.server", str(folder), "--no-routing",
                          "--max-model-len", "100000000"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode != 0
    assert "ftp-vllm serve: error: not enough memory to start the engine" in out.stderr
    assert "GiB available" in out.stderr and "--max-model-len" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_empty_kv_space_variable_counts_as_unset(monkeypatch):
    """vLLM's CPU platform treats VLLM_CPU_KVCACHE_SPACE="" as unset but its envs module
    would crash on int(""): the rule applies and the empty variable goes."""
    import os

    monkeypatch.setenv(ENV_KV_SPACE, "")
    assert auto_kv_cache("nowhere", on_cpu=True, memory=node(6, 8)) is not None
    assert ENV_KV_SPACE not in os.environ


@pytest.mark.vllm
def test_offline_engines_get_the_same_rule(tmp_path, monkeypatch):
    """`ftp-vllm bench` and `eval --engine vllm` build `vllm.LLM` with these keywords."""
    pytest.importorskip("vllm")
    from ftp_vllm.plugin.memory import llm_kv_kwargs
    from tests.tiny_models import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "m")
    monkeypatch.delenv(ENV_KV_SPACE, raising=False)
    kw = llm_kv_kwargs(folder, dtype="float32", max_model_len=128)
    # 2 KiB per token x 128 x 256 sequences (LLM's default): the engine can use no more.
    assert kw == {"kv_cache_memory_bytes": 2048 * 128 * 256}
    monkeypatch.setenv(ENV_KV_SPACE, "1")
    assert llm_kv_kwargs(folder, dtype="float32", max_model_len=128) == {}
