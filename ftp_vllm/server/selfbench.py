"""Dense-vs-routed prefill self-benchmark, run through the serving engine itself.

A batch of `prompts` fresh random-token prompts of `tokens` tokens each, one output token,
submitted together, timed from submission to the last completion; alternately with
``ftp_sparsity=0`` (dense) and with the server's target, `repeats` times each after one
warm-up of each. Fresh prompts every time: a repeated prompt could hit a prefix cache and fake
a speedup (and dense and routed requests never share cached blocks). A dense request runs
vLLM's compiled forward, as plain vLLM does, so the result (the ratio of median times, dense
over routed; 0 when not measured) is routed against plain vLLM on this machine. The start-up
break-even sweep (``server.route_threshold``) repeats it at several prompt lengths.

At start-up it runs before the server accepts connections (nothing else is in flight, so the
timing is clean and its requests are kept out of the metrics). ``POST /ftp/benchmark`` runs
it again while serving: then it shares the engine with live traffic, which the result says.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from ftp_vllm.server.metrics import SELF_BENCH_PREFIX


@dataclass
class BenchResult:
    sparsity: float
    tokens: int
    prompts: int
    repeats: int
    dense_s: list[float] = field(default_factory=list)
    routed_s: list[float] = field(default_factory=list)
    speedup: float = 0.0
    during_traffic: bool = False  # re-run while serving: shares the engine with requests
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _one_batch(engine_client: Any, vocab: int, tokens: int, prompts: int,
                     sparsity: float, rng: Any) -> float:
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False,
                            extra_args={"ftp_sparsity": sparsity})

    async def run(ids: list[int]) -> None:
        rid = f"{SELF_BENCH_PREFIX}{uuid.uuid4().hex[:12]}"
        async for _ in engine_client.generate(tokens_input(ids), params, rid):
            pass

    batch = [[int(x) for x in rng.integers(0, vocab, size=tokens)] for _ in range(prompts)]
    t0 = time.perf_counter()
    await asyncio.gather(*(run(ids) for ids in batch))
    return time.perf_counter() - t0


async def self_benchmark(
    engine_client: Any, sparsity: float, tokens: int = 256, prompts: int = 2,
    repeats: int = 3, seed: int = 0,
) -> BenchResult:
    """Dense and routed prefill timings on the serving engine (see the module doc)."""
    import numpy as np

    model_config = engine_client.model_config
    tokens = max(2, min(int(tokens), int(model_config.max_model_len) - 1))
    vocab = int(model_config.get_vocab_size())
    result = BenchResult(sparsity, tokens, prompts, repeats)
    if sparsity <= 0:
        return result
    rng = np.random.default_rng(seed)
    t_start = time.perf_counter()
    await _one_batch(engine_client, vocab, tokens, prompts, 0.0, rng)  # warm-up
    await _one_batch(engine_client, vocab, tokens, prompts, sparsity, rng)
    for _ in range(repeats):
        result.dense_s.append(await _one_batch(engine_client, vocab, tokens, prompts, 0.0, rng))
        result.routed_s.append(
            await _one_batch(engine_client, vocab, tokens, prompts, sparsity, rng))
    result.elapsed_s = time.perf_counter() - t_start
    routed = statistics.median(result.routed_s)
    result.speedup = statistics.median(result.dense_s) / routed if routed > 0 else 0.0
    return result
