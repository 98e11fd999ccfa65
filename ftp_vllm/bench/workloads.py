"""What `ftp-vllm serve-bench` sends: the workloads, as vLLM's benchmark client flags or, for
multi-turn chat (which vLLM 0.32's client has no dataset for), as conversations sent turn by
turn through vLLM's own chat request function.

- ``random-<N>``: N-token random prompts (vLLM's ``random`` dataset), all sent at once;
  ``random-1024`` sends 8 of them, ``random-2048`` 4 (other lengths: 8, or ``--num-prompts``);
- ``shared-prefix``: 16 prompts that share one 768-token prefix, each followed by 256 tokens of
  its own (vLLM's ``random`` dataset with ``--random-prefix-len``), all sent at once;
- ``multi-turn``: 4 conversations of 4 turns on ``/v1/chat/completions``; a shared 256-token
  system prompt, 128-token user messages; each turn resends the whole conversation so far
  (system, earlier user messages and the server's own earlier replies, then the new user
  message); the conversations run concurrently, each sends its next turn when its previous
  reply is complete. Requests go through ``async_request_openai_chat_completions`` (the request
  function `vllm bench serve` uses for chat, streaming) and the metrics through its
  ``calculate_metrics``, so TTFT, throughput and input-token counts (the server's
  ``prompt_tokens``, resent history included) mean what they mean for the other workloads.

Every workload produces 16 output tokens per request (``ignore_eos``, greedy). Prompt seeds
differ per workload and round (``seed_for``): a repeated prompt would hit vLLM's prefix cache.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

DEFAULT_WORKLOADS = ("random-1024", "random-2048", "shared-prefix", "multi-turn")
OUTPUT_LEN = 16
RANDOM_PROMPTS = {1024: 8, 2048: 4}  # prompts per random-<N> workload (others: 8)
MIN_TOKENS = 8  # smallest token length a --scale may produce


@dataclass(frozen=True)
class Workload:
    """One workload's sizes (token lengths after --scale)."""

    name: str
    kind: str  # "random" | "shared-prefix" | "multi-turn"
    num_prompts: int = 0  # random, shared-prefix: requests; multi-turn: conversations
    input_len: int = 0  # random: prompt tokens; shared-prefix: each prompt's own tokens
    prefix_len: int = 0  # shared-prefix: shared tokens at the start of every prompt
    turns: int = 0  # multi-turn
    system_len: int = 0  # multi-turn: shared system prompt tokens
    user_len: int = 0  # multi-turn: tokens per user message
    output_len: int = OUTPUT_LEN

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v or k in ("name", "kind")}

    def describe(self) -> str:
        if self.kind == "random":
            return (f"{self.num_prompts} random prompts of {self.input_len} tokens, "
                    f"{self.output_len} out, all at once")
        if self.kind == "shared-prefix":
            return (f"{self.num_prompts} prompts sharing a {self.prefix_len}-token prefix + "
                    f"{self.input_len} own tokens, {self.output_len} out, all at once")
        return (f"{self.num_prompts} chats x {self.turns} turns, {self.system_len}-token system "
                f"prompt, {self.user_len}-token user turns, {self.output_len} out per turn, "
                "history resent each turn")


def parse_workload(name: str, num_prompts: int | None = None,
                   output_len: int = OUTPUT_LEN) -> Workload:
    """The default sizes of a workload name (``random-<N>``, ``shared-prefix``, ``multi-turn``);
    `num_prompts` overrides the request (or conversation) count."""
    if name.startswith("random-") and name[len("random-"):].isdigit():
        n = int(name[len("random-"):])
        if n < 1:
            raise ValueError(f"workload {name!r}: prompt length must be positive")
        return Workload(name, "random", num_prompts or RANDOM_PROMPTS.get(n, 8), input_len=n,
                        output_len=output_len)
    if name == "shared-prefix":
        return Workload(name, "shared-prefix", num_prompts or 16, input_len=256,
                        prefix_len=768, output_len=output_len)
    if name == "multi-turn":
        return Workload(name, "multi-turn", num_prompts or 4, turns=4, system_len=256,
                        user_len=128, output_len=output_len)
    raise ValueError(f"unknown workload {name!r}: choose random-<tokens> (e.g. random-1024), "
                     "shared-prefix or multi-turn")


def scaled(w: Workload, scale: float) -> Workload:
    """Token lengths times `scale` (at least MIN_TOKENS each); counts unchanged. For smoke
    tests: the workload keeps its name, the record keeps the real lengths."""
    if scale == 1.0:
        return w

    def s(n: int) -> int:
        return max(MIN_TOKENS, round(n * scale)) if n else 0

    return replace(w, input_len=s(w.input_len), prefix_len=s(w.prefix_len),
                   system_len=s(w.system_len), user_len=s(w.user_len))


def seed_for(base: int, round_index: int, workload_index: int, offset: int = 0) -> int:
    """Distinct prompts per round and workload (same for every server within a round)."""
    return base + 1000 * round_index + 10 * workload_index + offset


def client_args(w: Workload, seed: int) -> list[str]:
    """`vllm bench serve` dataset flags for a random or shared-prefix workload."""
    if w.kind == "random":
        return ["--dataset-name", "random", "--random-input-len", str(w.input_len),
                "--random-output-len", str(w.output_len), "--num-prompts", str(w.num_prompts),
                "--seed", str(seed)]
    if w.kind == "shared-prefix":
        # One prefix for the whole run (RandomDataset.get_prefix, decoded and re-encoded to
        # exactly prefix_len tokens), then each prompt's own input_len tokens.
        return ["--dataset-name", "random", "--random-prefix-len", str(w.prefix_len),
                "--random-input-len", str(w.input_len),
                "--random-output-len", str(w.output_len), "--num-prompts", str(w.num_prompts),
                "--seed", str(seed)]
    raise ValueError(f"{w.name}: vLLM's client has no dataset for {w.kind!r}; use "
                     "run_multi_turn")


# ------------------------------------------------------------------------------ multi-turn
@dataclass(frozen=True)
class Conversation:
    """A system prompt and the user messages of every turn; the replies come from the server."""

    system: str
    users: tuple[str, ...]

    def messages(self, replies: list[str]) -> list[dict[str, str]]:
        """What turn ``len(replies)`` sends: the whole conversation so far, then the new user
        message (a client resends its history: the server keeps no conversation state)."""
        t = len(replies)
        if t >= len(self.users):
            raise ValueError(f"turn {t} of a {len(self.users)}-turn conversation")
        out = [{"role": "system", "content": self.system}]
        for user, reply in zip(self.users[:t], replies, strict=True):
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return out + [{"role": "user", "content": self.users[t]}]


def random_text(tokenizer: Any, n: int, rng: Any) -> str:
    """`n` tokens of random text: random non-special token ids, decoded and adjusted until
    they re-encode to `n` tokens (vLLM's random dataset helper)."""
    import numpy as np
    from vllm.benchmarks.datasets.datasets import gen_prompt_decode_to_target_len

    special = set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(tokenizer.vocab_size) if i not in special])
    tokens = allowed[rng.integers(0, len(allowed), size=n)].tolist()
    text, _, _ = gen_prompt_decode_to_target_len(tokenizer, tokens, n, rng=rng)
    return text


def build_conversations(w: Workload, tokenizer: Any, seed: int) -> list[Conversation]:
    """`w.num_prompts` conversations sharing one system prompt (one application, many users)."""
    import numpy as np

    if w.kind != "multi-turn":
        raise ValueError(f"{w.name} is not a multi-turn workload")
    rng = np.random.default_rng(seed)
    system = random_text(tokenizer, w.system_len, rng)
    return [Conversation(system, tuple(random_text(tokenizer, w.user_len, rng)
                                       for _ in range(w.turns)))
            for _ in range(w.num_prompts)]


async def _converse(conversations: list[Conversation], api_url: str, model: str,
                    served_name: str, output_len: int, extra_body: dict[str, Any] | None,
                    ) -> tuple[list[list[Any]], float]:
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_chat_completions,
    )

    body = {"temperature": 0.0, **(extra_body or {})}
    timeout = aiohttp.ClientTimeout(total=6 * 60 * 60)

    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        async def one(i: int, conv: Conversation) -> list[Any]:
            replies: list[str] = []
            outs = []
            for t in range(len(conv.users)):
                inp = RequestFuncInput(
                    prompt="", api_url=api_url, prompt_len=0, output_len=output_len,
                    model=model, model_name=served_name, ignore_eos=True, extra_body=body,
                    chat_messages=conv.messages(replies), request_id=f"bench-chat-{i}-{t}")
                out = await async_request_openai_chat_completions(inp, session)
                outs.append(out)
                if not out.success:
                    break  # the rest of this conversation cannot be sent: counted failed
                replies.append(out.generated_text)
            return outs

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i, c) for i, c in enumerate(conversations)))
        return list(results), time.perf_counter() - t0


def run_multi_turn(base_url: str, model: str, served_name: str, tokenizer: Any, w: Workload,
                   seed: int, extra_body: dict[str, Any] | None = None,
                   percentiles: tuple[float, ...] = (50, 90, 99)) -> dict[str, Any]:
    """Run the multi-turn workload; a result dict with `vllm bench serve`'s key names, plus
    ``per_turn_prompt_tokens`` (the mean prompt length the server counted at each turn)."""
    from vllm.benchmarks.datasets.datasets import SampleRequest
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    convs = build_conversations(w, tokenizer, seed)
    per_conv, duration = asyncio.run(_converse(
        convs, f"{base_url}/v1/chat/completions", model, served_name, w.output_len,
        extra_body))
    outputs = []
    for outs in per_conv:  # a failed turn ends its conversation: later turns count as failed
        outputs += outs + [RequestFuncOutput(error="earlier turn failed")
                           for _ in range(w.turns - len(outs))]
    errors = sorted({o.error.strip().splitlines()[-1][:200] for o in outputs
                     if not o.success and o.error})
    requests = [SampleRequest(prompt="", prompt_len=o.prompt_len, expected_output_len=w.output_len)
                for o in outputs]
    m, _ = calculate_metrics(requests, outputs, duration, tokenizer, list(percentiles), {})
    result = {
        "completed": m.completed, "failed": m.failed, "duration": duration,
        "total_input_tokens": m.total_input, "total_output_tokens": m.total_output,
        "request_throughput": m.request_throughput, "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
    }
    for metric in ("ttft", "tpot", "itl", "e2el"):
        result[f"mean_{metric}_ms"] = getattr(m, f"mean_{metric}_ms")
        result[f"median_{metric}_ms"] = getattr(m, f"median_{metric}_ms")
        for p, value in getattr(m, f"percentiles_{metric}_ms"):
            result[f"p{p:g}_{metric}_ms"] = value
    result["per_turn_prompt_tokens"] = [
        sum(outs[t].prompt_len for outs in per_conv if len(outs) > t and outs[t].success)
        / max(1, sum(1 for outs in per_conv if len(outs) > t and outs[t].success))
        for t in range(w.turns)]
    if errors:
        result["errors"] = errors
    return {k: (float(v) if hasattr(v, "item") else v) for k, v in result.items()}
