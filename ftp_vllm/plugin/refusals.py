"""What FTP routing refuses to start with: one table, read by the engine and by deploy checks.

Each rule names a vLLM engine argument, the config field vLLM builds from it, and when its
value is refused. ``FTPRoutingConfig.verify_and_update_config`` applies the table to the
engine's ``VllmConfig`` (start-up fails with every refusal's message); ``refused_flags``
applies the same table to a command line (``ftp-vllm serve`` / ``vllm serve`` arguments),
parsed by vLLM's own engine-argument parser, so manifests and scripts can be checked without
a model or an engine. Importing this module imports no vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# KV-cache dtypes stored unquantized: the routed K/V write and subset attention are exact.
PLAIN_KV_CACHE_DTYPES = ("auto", "bfloat16", "float16")


@dataclass(frozen=True)
class Refusal:
    """One configuration routed serving refuses at start-up."""

    name: str
    engine_arg: str  # vLLM EngineArgs field (the CLI flag is its dashed form)
    config_field: str  # dotted path of the same setting on a VllmConfig
    refused: Callable[[Any], bool]  # value -> refused?
    message: str  # what is refused, why, what to do instead

    @property
    def cli_flag(self) -> str:
        return "--" + self.engine_arg.replace("_", "-")

    def config_value(self, vllm_config: Any) -> Any:
        value = vllm_config
        for part in self.config_field.split("."):
            value = getattr(value, part)
        return value

    def check(self, vllm_config: Any) -> bool:
        """True when this engine config is refused."""
        return bool(self.refused(self.config_value(vllm_config)))

    def describe(self, value: Any) -> str:
        shown = getattr(value, "kv_connector", value)  # a KVTransferConfig: its connector
        return f"FTP routing refuses {self.cli_flag} {shown}: {self.message}"


def _above_one(value: Any) -> bool:
    return value is not None and int(value) > 1


def _is_set(value: Any) -> bool:
    return value is not None


def _quantized(value: Any) -> bool:
    return str(value) not in PLAIN_KV_CACHE_DTYPES


_TP_INSTEAD = (
    "Use --tensor-parallel-size instead (across nodes too: --nnodes, --node-rank, "
    "--master-addr, --headless on the other nodes; see docs/OPERATIONS.md), or serve "
    "without routing (ftp-vllm serve --no-routing)."
)

REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        name="pipeline-parallel",
        engine_arg="pipeline_parallel_size",
        config_field="parallel_config.pipeline_parallel_size",
        refused=_above_one,
        message=(
            "pipeline parallelism is not supported. A routed step's plan (keep masks, "
            "per-request statistics) is opened at the model's first decoder layer and "
            "closed at its last one inside one worker; pipeline stages hold different "
            "layers, and nothing carries the plan between them. " + _TP_INSTEAD
        ),
    ),
    Refusal(
        name="decode-context-parallel",
        engine_arg="decode_context_parallel_size",
        config_field="parallel_config.decode_context_parallel_size",
        refused=_above_one,
        message=(
            "decode context parallelism is not supported. DCP shards each request's K/V "
            "over ranks and merges partial attention across them; routed layers write K/V "
            "and build the kept tokens' attention metadata without DCP's per-rank sequence "
            "lengths, so attention would read the wrong cache slice. Drop the flag (use "
            "--decode-context-parallel-size 1) and scale with --tensor-parallel-size."
        ),
    ),
    Refusal(
        name="prefill-context-parallel",
        engine_arg="prefill_context_parallel_size",
        config_field="parallel_config.prefill_context_parallel_size",
        refused=_above_one,
        message=(
            "prefill context parallelism is not supported. PCP splits a prompt's tokens "
            "over ranks, while routing decides from the whole prompt at once (the last "
            "token's query, score ranks, length-normalised positions). Drop the flag (use "
            "--prefill-context-parallel-size 1) and scale with --tensor-parallel-size."
        ),
    ),
    Refusal(
        name="kv-connector",
        engine_arg="kv_transfer_config",
        config_field="kv_transfer_config",
        refused=_is_set,
        message=(
            "KV connectors (disaggregated prefill, KV transfer) are not supported. Routed "
            "layers write K/V and run attention themselves, outside vLLM's attention op "
            "where maybe_transfer_kv_layer hands each layer's cache to the connector, so a "
            "connector would send or load incomplete caches. Drop --kv-transfer-config, or "
            "serve without routing (ftp-vllm serve --no-routing)."
        ),
    ),
    Refusal(
        name="kv-offloading",
        engine_arg="kv_offloading_size",
        config_field="cache_config.kv_offloading_size",
        refused=_is_set,
        message=(
            "KV-cache offloading is not supported. vLLM implements it as a KV connector "
            "(bypassed by routed layers), and it reuses cached prefixes whose K/V were "
            "computed under another prompt's routing decisions, the reason prefix caching "
            "is switched off with routing. Drop --kv-offloading-size."
        ),
    ),
    Refusal(
        name="quantized-kv-cache",
        engine_arg="kv_cache_dtype",
        config_field="cache_config.cache_dtype",
        refused=_quantized,
        message=(
            "quantized KV caches (fp8, nvfp4, int8/int4 per token-head, turboquant, "
            "ultraquant) are not supported. vLLM's attention layer quantizes queries and "
            "applies the K/V scales around the backend call; routed layers call the backend "
            "directly, without that step. Use --kv-cache-dtype auto (and a checkpoint whose "
            "quantization config does not quantize the KV cache)."
        ),
    ),
)


def refusals_for_config(vllm_config: Any) -> list[tuple[Refusal, Any]]:
    """The rules a VllmConfig breaks, each with the offending value."""
    return [(r, r.config_value(vllm_config)) for r in REFUSALS if r.check(vllm_config)]


def check_config(vllm_config: Any) -> None:
    """Raise ValueError naming every refused setting of this engine config (routed serving)."""
    broken = refusals_for_config(vllm_config)
    if broken:
        raise ValueError("\n".join(r.describe(value) for r, value in broken))


def parse_engine_namespace(argv: Sequence[str]) -> Any:
    """vLLM's engine-argument namespace of a serve command line, parsed by vLLM's own parser
    (other flags, e.g. --port, are ignored; nothing is resolved or downloaded)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(exit_on_error=False, add_help=False))
    try:
        namespace, _ = parser.parse_known_args(list(argv))
    except (Exception, SystemExit) as e:  # argparse reports bad values by exiting
        raise ValueError(f"cannot parse vLLM engine arguments {list(argv)}: {e}") from None
    return namespace


def parse_engine_args(argv: Sequence[str]) -> Any:
    """vLLM's EngineArgs from a serve command line (resolves the model: tests build real
    VllmConfigs from it)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs.from_cli_args(parse_engine_namespace(argv))


def refusals_for_namespace(namespace: Any) -> list[tuple[Refusal, Any]]:
    """The rules parsed engine arguments break (with routing on), each with its value: an
    argparse namespace of vLLM's engine flags (``ftp-vllm serve``'s own parsed args too)."""
    out = []
    for rule in REFUSALS:
        value = getattr(namespace, rule.engine_arg)
        if rule.refused(value):
            out.append((rule, value))
    return out


def refusals_for_args(argv: Sequence[str]) -> list[tuple[Refusal, Any]]:
    """The rules a serve command line breaks (with routing on), each with its value."""
    return refusals_for_namespace(parse_engine_namespace(argv))


def refused_flags(argv: Sequence[str]) -> list[str]:
    """The flags of a routed serve command line that FTP routing refuses at start-up."""
    return [rule.cli_flag for rule, _ in refusals_for_args(argv)]


__all__ = [
    "PLAIN_KV_CACHE_DTYPES", "REFUSALS", "Refusal", "check_config", "parse_engine_args",
    "parse_engine_namespace",
    "refusals_for_args", "refusals_for_config", "refusals_for_namespace", "refused_flags",
]
