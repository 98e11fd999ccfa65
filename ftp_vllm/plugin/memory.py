"""KV-cache size on vLLM's CPU backend when the user chose none.

Without ``VLLM_CPU_KVCACHE_SPACE``, ``--kv-cache-memory-bytes`` or
``--gpu-memory-utilization``, vLLM's CPU worker reserves 92% of its NUMA node and refuses to
start when other processes hold more than 8% of it (``CPUWorker.__init__``). Every engine this
project builds for users (``ftp-vllm serve``, ``bench``, ``eval --engine vllm``) instead gets
an explicit KV-cache size from the memory actually available, through ``auto_kv_cache``:

    budget = available - weights - overhead * (workers + 1)
    kv     = max(one_sequence, min(wanted, cap, share * budget)) / workers   (per worker)

``available`` is what the CPU worker itself checks: its memory node's free + file pages +
reclaimable slab, clamped by the cgroup limit (``vllm.utils.cpu_resource_utils.
get_memory_node_info``, mirrored by ``read_node_memory``; the worst visible node). ``wanted``
is ``max_model_len * max_num_seqs`` tokens of K/V, ``one_sequence`` one ``max_model_len``
sequence (vLLM refuses less). An explicit size also skips vLLM's 92% start-up check. When even
one sequence does not fit, ``MemoryTooSmallError`` says how much is free and what to do.

The rule (``choose_kv_cache``) is pure arithmetic; reading memory and the model folder is
separate, so tests simulate any node.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 1 << 30
ENV_KV_SPACE = "VLLM_CPU_KVCACHE_SPACE"  # vLLM's own (GiB, integer)
KV_CAP_BYTES = 4 * GiB  # a few GiB of K/V is plenty on a CPU (SmolLM2: ~186k tokens in bf16)
KV_SHARE = 0.5  # never more than half of what is left: the rest of the machine keeps room
OVERHEAD_BYTES = 1 * GiB  # per engine process (engine core, each worker): torch, activations
SEQ_SLACK_TOKENS = 256  # block rounding above one max_model_len sequence

logger = logging.getLogger("vllm.ftp_vllm")  # a child of vLLM's logger: same handlers

_DTYPE_BYTES = {
    "float32": 4, "float": 4, "fp32": 4, "float64": 8, "double": 8,
    "bfloat16": 2, "float16": 2, "half": 2, "fp16": 2, "bf16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "fp8_ds_mla": 1,
}
_SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2,
                      "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


class MemoryTooSmallError(ValueError):
    """Not even one max_model_len sequence of K/V fits beside the weights."""


@dataclass(frozen=True)
class NodeMemory:
    """What vLLM's CPU worker compares against: one memory node, cgroup-clamped."""

    total: int
    available: int
    node: int = 0
    cgroup_limit: int | None = None

    def describe(self) -> str:
        where = f"memory node {self.node}"
        if self.cgroup_limit is not None and self.cgroup_limit <= self.total:
            where += f" (cgroup limit {_gib(self.cgroup_limit)} GiB)"
        return f"{where}: {_gib(self.available)} of {_gib(self.total)} GiB available"


@dataclass(frozen=True)
class ModelMemory:
    """What one engine needs besides its KV cache, and what K/V costs per token."""

    weights: int  # bytes as served, all workers together (0: unknown)
    kv_per_token: int  # bytes of K/V per token, all layers and workers (0: unknown)
    max_model_len: int
    max_num_seqs: int
    workers: int = 1  # worker processes on this node (TP x PP x local DP)

    @property
    def one_sequence(self) -> int:
        return self.kv_per_token * (self.max_model_len + SEQ_SLACK_TOKENS)

    @property
    def wanted(self) -> int:
        return self.kv_per_token * self.max_model_len * self.max_num_seqs


@dataclass(frozen=True)
class KVCacheChoice:
    """The chosen size and the numbers it came from (for the log line)."""

    kv_bytes: int  # per worker: vLLM's --kv-cache-memory-bytes
    memory: NodeMemory
    model: ModelMemory
    overhead: int
    limited_by: str

    @property
    def total_kv(self) -> int:
        return self.kv_bytes * self.model.workers

    def describe(self) -> str:
        m = self.model
        per = f" per worker x {m.workers}" if m.workers > 1 else ""
        tokens = (f", {self.total_kv // m.kv_per_token:,} tokens" if m.kv_per_token else "")
        weights = f"{_gib(m.weights)} GiB" if m.weights else "unknown"
        return (
            f"KV cache: {_gib(self.kv_bytes)} GiB{per}{tokens} (limited by {self.limited_by}; "
            f"{self.memory.describe()}, weights {weights}, engine overhead "
            f"{_gib(self.overhead)} GiB). Override with {ENV_KV_SPACE}=<GiB> or "
            "--kv-cache-memory-bytes <bytes> (or --gpu-memory-utilization <fraction of the "
            "node>)."
        )


def choose_kv_cache(memory: NodeMemory, model: ModelMemory, *, cap: int = KV_CAP_BYTES,
                    share: float = KV_SHARE, overhead: int = OVERHEAD_BYTES) -> KVCacheChoice:
    """The rule (module docstring): a KV-cache size that leaves the machine room."""
    workers = max(1, model.workers)
    overhead_all = overhead * (workers + 1)
    budget = memory.available - model.weights - overhead_all
    floor = model.one_sequence
    if budget < max(floor, 1):
        need = model.weights + overhead_all + floor
        what = (f"one {model.max_model_len}-token sequence of K/V {_gib(floor)} GiB"
                if floor else "some K/V")
        raise MemoryTooSmallError(
            f"not enough memory to start the engine: {memory.describe()}; it needs about "
            f"{_gib(need)} GiB (weights {_gib(model.weights)} GiB + engine processes "
            f"{_gib(overhead_all)} GiB + {what}). Free memory (stop other processes, or raise "
            f"the container's memory limit), serve shorter sequences (--max-model-len), or "
            f"force a size with {ENV_KV_SPACE}=<GiB> or --kv-cache-memory-bytes <bytes>."
        )
    limits = {"a share of the free memory": int(share * budget), "the cap": cap}
    if model.wanted:
        limits["max_model_len x max_num_seqs"] = model.wanted
    limited_by, total = min(limits.items(), key=lambda kv: kv[1])
    if total < floor:
        limited_by, total = "one max_model_len sequence", floor
    return KVCacheChoice(kv_bytes=_round_mib(math.ceil(total / workers)), memory=memory,
                         model=model, overhead=overhead_all, limited_by=limited_by)


def minimum_memory(model: ModelMemory, *, kv_on_host: bool = True,
                   overhead: int = OVERHEAD_BYTES) -> int:
    """The least memory (node, or container limit) an engine starts in under the rule: the
    API server, the engine core and each worker (``overhead`` each), the weights and, when the
    KV cache lives in host memory (CPU backend), one max_model_len sequence of K/V. For
    checking deployments: ``choose_kv_cache`` refuses below it."""
    kv = model.one_sequence if kv_on_host else 0
    return model.weights + overhead * (max(1, model.workers) + 2) + kv


# ---------------------------------------------------------------- reading the machine


def read_node_memory(root: str | Path = "/", environ: Mapping[str, str] | None = None
                     ) -> NodeMemory:
    """vLLM's ``get_memory_node_info`` for the worst of this process's visible memory nodes.

    Per node: MemFree + Active(file) + Inactive(file) + SReclaimable of
    ``/sys/devices/system/node/node<N>/meminfo`` (system MemAvailable when the file is
    missing); a cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) below the
    node's total replaces it and caps available at limit - usage."""
    root = Path(root)
    env = os.environ if environ is None else environ
    nodes = _visible_nodes(root, env)
    infos = [_node_info(root, n) for n in nodes]
    node, total, available = min(infos, key=lambda i: i[2])
    limit, usage = _cgroup(root)
    if limit is not None and limit < total:
        total = limit
        available = max(0, min(available, limit - (usage or 0)))
    return NodeMemory(total=total, available=available, node=node, cgroup_limit=limit)


def _visible_nodes(root: Path, env: Mapping[str, str]) -> list[int]:
    allowed: list[int] = []
    try:
        for line in (root / "proc/self/status").read_text().splitlines():
            if line.startswith("Mems_allowed_list:"):
                allowed = _parse_ids(line.split(":", 1)[1].strip())
    except OSError:
        pass
    allowed = allowed or [0]
    visible = env.get("CPU_VISIBLE_MEMORY_NODES", "")
    if visible and "VLLM_CPU_SIM_MULTI_NUMA" not in env:
        chosen = [n for n in _parse_ids(visible) if n in allowed]
        return chosen or allowed
    return allowed


def _parse_ids(text: str) -> list[int]:
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return sorted(out)


def _node_info(root: Path, node: int) -> tuple[int, int, int]:
    path = root / f"sys/devices/system/node/node{node}/meminfo"
    if path.exists():
        info = {}
        for line in path.read_text().splitlines():  # "Node 0 MemTotal: 97421888 kB"
            parts = line.split()
            if len(parts) >= 4:
                info[parts[2].rstrip(":")] = int(parts[3]) * 1024
        available = (info["MemFree"] + info.get("Active(file)", 0)
                     + info.get("Inactive(file)", 0) + info.get("SReclaimable", 0))
        return node, info["MemTotal"], available
    info = {}
    for line in (root / "proc/meminfo").read_text().splitlines():  # "MemTotal: 123 kB"
        parts = line.split()
        if len(parts) >= 2:
            info[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return node, info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup(root: Path) -> tuple[int | None, int | None]:
    """(limit, usage) of this process's cgroup, as vLLM reads them (v2, else v1)."""
    cg = root / "sys/fs/cgroup"
    limit = _read_int(cg / "memory.max")
    if limit is not None:
        return limit, _read_int(cg / "memory.current")
    limit = _read_int(cg / "memory/memory.limit_in_bytes")
    if limit is not None and limit < (1 << 62):
        return limit, _read_int(cg / "memory/memory.usage_in_bytes")
    return None, None


# ---------------------------------------------------------------- reading the model


def served_dtype(dtype: Any, config_dtype: str | None) -> str:
    """The dtype a server runs: ``--dtype`` as given, or the checkpoint's for "auto" ("auto"
    when the checkpoint names none)."""
    name = str(dtype or "auto").removeprefix("torch.").lower()
    if name == "auto":
        name = str(config_dtype or "auto").removeprefix("torch.").lower()
    return "bfloat16" if name == "bf16" else name


def dtype_bytes(dtype: Any, config_dtype: str | None = None) -> int:
    """Bytes per element as served: vLLM's "auto" keeps a 16-bit checkpoint's dtype and
    downcasts float32 on most CPUs (counted as 4 bytes here, as is a checkpoint that names no
    dtype: an over-estimate is safe)."""
    return _DTYPE_BYTES.get(served_dtype(dtype, config_dtype), 4)


def model_memory(model: str | Path, *, dtype: Any = "auto", kv_cache_dtype: Any = "auto",
                 max_model_len: int | None = None, max_num_seqs: int | None = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 data_parallel_size: int = 1, default_max_num_seqs: int = 128) -> ModelMemory:
    """Weights and K/V cost of a Hugging Face folder (config.json + safetensors headers);
    zeros where unknown (a hub name not on disk)."""
    folder = _local_folder(model)
    config = _read_config(folder)
    text = config.get("text_config") or config
    served = dtype_bytes(dtype, _config_dtype(config))
    kv_name = str(kv_cache_dtype or "auto").lower()
    kv_bytes = served if kv_name == "auto" else dtype_bytes(kv_name)
    dp = max(1, int(data_parallel_size or 1))
    tp_pp = max(1, int(tensor_parallel_size or 1)) * max(1, int(pipeline_parallel_size or 1))
    weights = _count_params(folder, text) * served * dp
    per_token = 0
    layers = text.get("num_hidden_layers")
    heads = text.get("num_attention_heads")
    if layers and heads:
        kv_heads = text.get("num_key_value_heads") or heads
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        per_token = 2 * int(layers) * int(kv_heads) * int(head_dim) * kv_bytes
    length = max_model_len if max_model_len and max_model_len > 0 else int(
        text.get("max_position_embeddings") or 2048)
    seqs = max_num_seqs if max_num_seqs and max_num_seqs > 0 else default_max_num_seqs * tp_pp
    return ModelMemory(weights=weights, kv_per_token=per_token * dp, max_model_len=length,
                       max_num_seqs=seqs, workers=tp_pp * dp)


def checkpoint_dtype(model: str | Path) -> str | None:
    """The dtype a model folder's config.json names (None: unknown, or not on disk)."""
    return _config_dtype(_read_config(_local_folder(model)))


def _config_dtype(config: Mapping[str, Any]) -> str | None:
    text = config.get("text_config") or config
    return (text.get("dtype") or text.get("torch_dtype") or config.get("dtype")
            or config.get("torch_dtype"))


def _local_folder(model: str | Path) -> Path | None:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:  # a hub name already in the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a hub name, no hub library
        return None


def _read_config(folder: Path | None) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text()) if folder else {}
    except (OSError, ValueError):
        return {}


def _count_params(folder: Path | None, text: Mapping[str, Any]) -> int:
    """Parameters from the safetensors headers (no tensor is read); else from the config."""
    if folder is not None:
        files = sorted(folder.glob("*.safetensors"))
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                names = set(json.loads(index.read_text())["weight_map"].values())
                files = [folder / n for n in sorted(names)]
            except (OSError, ValueError, KeyError):
                pass
        if files:
            return sum(_safetensors_params(f) for f in files)
        for pattern in ("*.bin", "*.pt", "*.gguf"):  # bytes as stored: assume 2 per param
            found = list(folder.glob(pattern))
            if found:
                return sum(f.stat().st_size for f in found) // 2
    h = text.get("hidden_size")
    layers, vocab = text.get("num_hidden_layers"), text.get("vocab_size")
    if not (h and layers and vocab):
        return 0
    inter = text.get("intermediate_size") or 4 * h
    heads = text.get("num_attention_heads") or 1
    head_dim = text.get("head_dim") or h // heads
    kv_heads = text.get("num_key_value_heads") or heads
    attn = h * head_dim * (2 * heads + 2 * kv_heads)
    embed = vocab * h * (1 if text.get("tie_word_embeddings") else 2)
    return int(layers) * (attn + 3 * h * inter) + embed


def _safetensors_params(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        total += (end - start) // _SAFETENSORS_BYTES.get(meta.get("dtype", ""), 2)
    return total


# ---------------------------------------------------------------- the one entry point


def user_kv_setting(environ: Mapping[str, str] | None = None,
                    gpu_memory_utilization: float | None = None,
                    kv_cache_memory_bytes: int | None = None) -> str | None:
    """What the user set that sizes the KV cache (None: nothing, the rule applies)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_KV_SPACE, "") != "":
        return f"{ENV_KV_SPACE}={env[ENV_KV_SPACE]}"
    if kv_cache_memory_bytes is not None:
        return f"--kv-cache-memory-bytes {kv_cache_memory_bytes}"
    if gpu_memory_utilization is not None:
        return f"--gpu-memory-utilization {gpu_memory_utilization}"
    return None


def auto_kv_cache(model: str | Path, *, gpu_memory_utilization: float | None = None,
                  kv_cache_memory_bytes: int | None = None, on_cpu: bool | None = None,
                  environ: Mapping[str, str] | None = None, memory: NodeMemory | None = None,
                  **model_kw: Any) -> KVCacheChoice | None:
    """The KV-cache size for an engine on vLLM's CPU backend, or None when the user sized it
    (``user_kv_setting``) or the platform is not the CPU. Pass the result's ``kv_bytes`` as
    vLLM's ``kv_cache_memory_bytes``. ``model_kw``: ``model_memory``'s keywords. An empty
    ``VLLM_CPU_KVCACHE_SPACE`` is removed from ``os.environ`` (it means unset)."""
    if environ is None and os.environ.get(ENV_KV_SPACE) == "":
        del os.environ[ENV_KV_SPACE]  # unset for vLLM's CPU platform, but its envs int("") fails
    if user_kv_setting(environ, gpu_memory_utilization, kv_cache_memory_bytes) is not None:
        return None
    if on_cpu is None:
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
    if not on_cpu:
        return None
    return choose_kv_cache(memory or read_node_memory(environ=environ),
                           model_memory(model, **model_kw))


def llm_kv_kwargs(model: str | Path, **kw: Any) -> dict[str, int]:
    """``vllm.LLM(...)`` keywords for the rule: ``{"kv_cache_memory_bytes": n}`` (logged), or
    nothing when the user sized the KV cache or the platform is not the CPU."""
    choice = auto_kv_cache(model, **{"default_max_num_seqs": 256, **kw})
    if choice is None:
        return {}
    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging_if_needed

    configure_logging_if_needed(LoggingConfig())  # what LLM() does first (same defaults)
    logger.info("%s", choice.describe())
    return {"kv_cache_memory_bytes": choice.kv_bytes}


def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f}"


def _round_mib(n: int) -> int:
    mib = 1 << 20
    return -(-n // mib) * mib
