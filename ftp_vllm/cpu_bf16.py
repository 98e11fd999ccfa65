"""bf16 on x86 CPUs without bf16 instructions: what `ftp-vllm serve` tells the user.

vLLM's CPU backend serves a bf16 checkpoint in bf16 on every x86 CPU. Without AVX512-BF16 or
AMX tiles its matmuls take a slow path: on a 2-core AMD EPYC with AVX2 only, plain vLLM at its
defaults prefilled 512-token prompts at 44 tok/s in bf16 and 288 tok/s in float32 (6.5x), with
`ftp-vllm bench prefill --lengths 512 --sparsities 0 0.3 --rounds 2 [--dtype float32]`
(docs/OPERATIONS.md, "CPU nodes without bf16 instructions"). Routing's gain holds in either
dtype (1.33x and 1.27x of vanilla at 0.3 in that run), so the dtype is the bigger lever there.
The server warns and serves what was asked: float32 doubles the K/V bytes per token and is a
different numeric configuration, so the choice stays the user's.
"""

from __future__ import annotations

import platform

BF16 = "bfloat16"


def native_bf16() -> bool | None:
    """Whether this x86 CPU has bf16 instructions (AVX512-BF16 or AMX tiles); None on other
    architectures, which this module does not judge."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    import torch

    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def bf16_advice(dtype: str, native: bool | None) -> str | None:
    """The start-up warning for serving ``dtype`` on a CPU whose bf16 support is ``native``
    (None: not judged); None when there is nothing to say."""
    if dtype != BF16 or native is not False:
        return None
    return ("serving bfloat16 on a CPU without bf16 instructions (no AVX512-BF16, no AMX): "
            "its matmuls take a slow path (on a 2-core AVX2 CPU, vLLM's bf16 prefill ran 6.5x "
            "slower than float32). Add --dtype float32 for speed (K/V then take twice the "
            "bytes per token); docs/OPERATIONS.md, 'CPU nodes without bf16 instructions'.")
