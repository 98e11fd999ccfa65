"""Offline ``vllm.LLM`` engines of our own (benchmarks, tests): stopping them promptly."""

from __future__ import annotations

import gc
from typing import Any


def shutdown_engine(llm: Any) -> None:
    """Stop an offline `LLM`'s engine processes now (CPU workers busy-poll until stopped)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    del llm
    gc.collect()
