"""The default model's memory needs, as the KV-cache sizing tests simulate them."""

from __future__ import annotations

from ftp_vllm.plugin.memory import ModelMemory

# SmolLM2-135M-Instruct as served: bf16 weights, 30 layers x 3 KV heads x 64 x 2 (K, V) x 2 B.
SMOLLM2 = ModelMemory(weights=269_030_016, kv_per_token=23_040, max_model_len=8192,
                      max_num_seqs=128)
