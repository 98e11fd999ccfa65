"""`ftp-vllm serve`: vLLM's own OpenAI-compatible server with the plugin active.

Start-up is vLLM's single-API-server path (``vllm.entrypoints.launchers``: ``setup_server``,
``build_async_engine_client``, ``build_app``, ``init_app_state``, ``serve_http``) with one
step added between building the app and serving it (``FTPServer.attach``):

- the per-request sparsity check (ASGI middleware, HTTP 400; ``server.validation``);
- the ``ftp_`` metrics on vLLM's ``/metrics`` registry, fed by ``StatsPoller``
  (``server.metrics``), refreshed before each scrape;
- the start-up self-benchmark (``server.selfbench``), before connections are accepted;
- ``/ftp/...`` routes (``server.routes``).

The OpenAI protocol, ``/health``, ``/v1/models``, streaming, errors: all vLLM's own.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ftp_vllm.plugin.memory import KVCacheChoice
from ftp_vllm.server.route_threshold import AUTO, parse_min_tokens
from ftp_vllm.server.settings import (
    ENV_ROUTER,
    ENV_SPARSITY,
    Routing,
    ServeConfigError,
    resolve_routing,
)

FTP_GROUP_DOC = (
    "FTP routing. Without --router the default model uses its shipped router artifact "
    f"(env {ENV_ROUTER}); the default target sparsity is 0.3 (env {ENV_SPARSITY}). Clients "
    'pick their own per request: {"vllm_xargs": {"ftp_sparsity": 0.2}}.'
)


def add_ftp_args(parser: Any) -> None:
    g = parser.add_argument_group("FTP routing (ftp-vllm)", FTP_GROUP_DOC)
    g.add_argument("--router", default=None, metavar="DIR",
                   help=f"router artifact folder (default: ${ENV_ROUTER}, else the shipped "
                        "artifact when serving the default model)")
    g.add_argument("--sparsity", type=float, default=None, metavar="S",
                   help=f"default target sparsity in [0, artifact max] (default: "
                        f"${ENV_SPARSITY}, else 0.3); 0 = dense unless a request asks")
    g.add_argument("--no-routing", action="store_true",
                   help="serve the model dense with vanilla vLLM (ftp_ metrics stay at 0)")
    g.add_argument("--no-self-benchmark", action="store_true",
                   help="skip the start-up dense-vs-routed prefill self-benchmark "
                        "(ftp_measured_prefill_speedup stays 0 until POST /ftp/benchmark)")
    g.add_argument("--self-benchmark-tokens", type=int, default=256, metavar="N",
                   help="self-benchmark prompt length in tokens (default 256)")
    g.add_argument("--self-benchmark-prompts", type=int, default=2, metavar="N",
                   help="self-benchmark prompts per timed batch (default 2)")
    g.add_argument("--self-benchmark-repeats", type=int, default=3, metavar="N",
                   help="timed batches per mode (default 3)")
    g.add_argument("--route-min-tokens", type=parse_min_tokens, default=AUTO, metavar="N",
                   help="serve prompts shorter than N tokens dense unless they set "
                        "ftp_sparsity (default auto: the shortest length at which the "
                        "start-up self-benchmark measured routing faster; 0 routes every "
                        "prompt)")
    g.add_argument("--stats-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often the API server reads the workers' routing stats "
                        "(default 1; also read before every /metrics scrape)")


def build_parser() -> Any:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="ftp-vllm serve",
        description="vLLM's OpenAI-compatible server with FTP token routing. Every vLLM "
                    "server flag is accepted; with no model it serves SmolLM2-135M-Instruct "
                    "(prepared locally) with its shipped router. On the CPU, with no "
                    "VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes or "
                    "--gpu-memory-utilization, the KV cache is sized from the free memory "
                    "(logged at start).",
    )
    add_ftp_args(parser)
    parser = make_arg_parser(parser)
    # None tells "not given" apart from vLLM's defaults: no model -> the default model; no
    # --gpu-memory-utilization -> size_kv_cache picks the CPU KV cache (then vLLM's default).
    parser.set_defaults(model=None, gpu_memory_utilization=None)
    return parser


def prepare_args(argv: Sequence[str]) -> tuple[argparse.Namespace, Routing]:
    """Parse, pick the model and routing, fill ``args.model`` and ``args.hf_overrides``.
    ``args.gpu_memory_utilization`` stays None when not given: ``size_kv_cache`` next."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    from pathlib import Path

    from ftp_vllm.model import default_model_dir, ensure_model

    if args.model is None:
        args.model = str(ensure_model())
    # The default model, named or not, gets the shipped router.
    default = Path(args.model).expanduser().resolve() == default_model_dir().resolve()
    routing, overrides = resolve_routing(
        model_given=not default, router=args.router, sparsity=args.sparsity,
        no_routing=args.no_routing, hf_overrides=args.hf_overrides,
    )
    if overrides is not None:  # else vLLM's own default (an empty dict) stays
        args.hf_overrides = overrides
    if not args.served_model_name and Path(args.model).expanduser().is_dir():
        # Clients see a local model by its folder's name, not by this machine's path.
        args.served_model_name = [Path(args.model).expanduser().resolve().name]
    for name, low in (("self_benchmark_tokens", 2), ("self_benchmark_prompts", 1),
                      ("self_benchmark_repeats", 1)):
        if getattr(args, name) < low:
            raise ServeConfigError(f"--{name.replace('_', '-')} must be at least {low}")
    if args.stats_interval <= 0:
        raise ServeConfigError("--stats-interval must be positive")
    if routing.enabled:  # the plugin's own refusals, said now in one line each, not mid-start
        from ftp_vllm.plugin.refusals import refusals_for_namespace

        broken = refusals_for_namespace(args)
        if broken:
            raise ServeConfigError("\n".join(rule.describe(value) for rule, value in broken))
    return args, routing


def size_kv_cache(args: argparse.Namespace) -> KVCacheChoice | None:
    """On the CPU, with no KV-cache size given, choose one from the free memory
    (``ftp_vllm.plugin.memory``) into ``--kv-cache-memory-bytes``; fill vLLM's default
    ``--gpu-memory-utilization`` when it was not given."""
    from vllm.engine.arg_utils import EngineArgs

    from ftp_vllm.plugin.memory import auto_kv_cache

    given = args.gpu_memory_utilization
    if given is None:
        args.gpu_memory_utilization = EngineArgs.gpu_memory_utilization
    choice = auto_kv_cache(
        args.model, gpu_memory_utilization=given,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size_local or args.data_parallel_size,
    )
    if choice is not None:
        args.kv_cache_memory_bytes = choice.kv_bytes
    return choice


def main(argv: Sequence[str]) -> int:
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    from ftp_vllm.allocator import preload_for_engines
    from ftp_vllm.artifact import ArtifactError
    from ftp_vllm.cpu_bf16 import bf16_advice, native_bf16
    from ftp_vllm.plugin.memory import checkpoint_dtype, served_dtype

    cli_env_setup()
    try:
        args, routing = prepare_args(argv)
        kv_cache = size_kv_cache(args)
    except (ServeConfigError, ArtifactError, ValueError) as e:
        raise SystemExit(f"ftp-vllm serve: error: {e}") from None
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    logger = _logger()
    for note in routing.notes:
        logger.warning("%s", note)
    logger.info("%s", routing.describe())
    if kv_cache is not None:
        logger.info("%s", kv_cache.describe())
    allocator = preload_for_engines()
    if allocator is not None:
        found, message = allocator
        (logger.info if found else logger.warning)("%s", message)
        advice = bf16_advice(served_dtype(args.dtype, checkpoint_dtype(args.model)),
                             native_bf16())
        if advice is not None:
            logger.warning("%s", advice)

    if args.headless:  # multi-node data-parallel workers: no API server, vLLM's own path
        from vllm.entrypoints.cli.serve import ServeSubcommand

        ServeSubcommand.cmd(args)
        return 0
    if (args.api_server_count or 1) > 1 or getattr(args, "grpc", False):
        raise SystemExit(
            "ftp-vllm serve: error: it runs one API server (the process that owns the ftp_ "
            "metrics); drop --api-server-count/--grpc, or run `vllm serve` for those modes")
    args.api_server_count = None

    import uvloop

    uvloop.run(run_server(args, routing))
    return 0


def _logger():
    from vllm.logger import init_logger

    return init_logger("vllm.ftp_vllm.server")  # the one server logger (metrics.py uses it too)


async def run_server(args: argparse.Namespace, routing: Routing, **uvicorn_kwargs) -> None:
    """vLLM's ``run_server`` + ``run_server_worker`` with ``build_and_serve`` below."""
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.launcher import setup_server
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager
    from vllm.utils.system_utils import decorate_logs

    decorate_logs("APIServer", skip_if_decorated=True)

    def _interrupt_init(*_: Any) -> None:
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _interrupt_init)
    listen_address, sock = setup_server(args, reuse_port=False)
    if args.tool_parser_plugin and len(args.tool_parser_plugin) > 3:
        ToolParserManager.import_tool_parser(args.tool_parser_plugin)
    if args.reasoning_parser_plugin and len(args.reasoning_parser_plugin) > 3:
        ReasoningParserManager.import_reasoning_parser(args.reasoning_parser_plugin)
    ftp = FTPServer(args, routing)
    async with build_async_engine_client(args) as engine_client:
        shutdown_task = await build_and_serve(engine_client, listen_address, sock, args, ftp,
                                              **uvicorn_kwargs)
    try:
        await shutdown_task
    finally:
        await ftp.stop()
        sock.close()


async def build_and_serve(engine_client: Any, listen_address: str, sock: Any,
                          args: argparse.Namespace, ftp: FTPServer,
                          **uvicorn_kwargs) -> asyncio.Task:
    """vLLM's ``build_and_serve`` with ``ftp.attach`` between app state and serving."""
    import vllm.envs as envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        uvicorn_kwargs["log_config"] = log_config
    supported_tasks = await engine_client.get_supported_tasks()
    app = build_app(args, supported_tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, supported_tasks)
    await ftp.attach(app, engine_client)
    _logger().info("Starting vLLM server on %s", listen_address)
    return await serve_http(
        app, sock=sock, enable_ssl_refresh=args.enable_ssl_refresh, host=args.host,
        port=args.port, log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
        ssl_ciphers=args.ssl_ciphers,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        h11_max_header_count=args.h11_max_header_count,
        **uvicorn_kwargs,
    )


class FTPServer:
    """This project's additions to one API server: metrics, poller, validation, routes."""

    def __init__(self, args: argparse.Namespace, routing: Routing):
        self.args = args
        self.routing = routing
        self.metrics = None
        self.poller = None
        self.engine_client = None
        self.bench_lock = asyncio.Lock()
        self.last_bench = None
        self.dense_below = None  # route_threshold.DenseBelow, once attached
        self.break_even: dict[int, float] = {}  # prompt tokens -> measured prefill speedup

    def limits(self) -> tuple[float, bool]:
        return self.routing.max_sparsity, self.routing.enabled

    async def attach(self, app: Any, engine_client: Any) -> None:
        from starlette.middleware import Middleware

        from ftp_vllm.server.metrics import FTPMetrics, StatsPoller, engine_stats_rpc
        from ftp_vllm.server.routes import MetricsRefreshMiddleware, add_routes
        from ftp_vllm.server.validation import SparsityValidationMiddleware

        log = _logger()
        self.engine_client = engine_client
        hf = engine_client.model_config.hf_config
        text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        self.metrics = FTPMetrics(int(text.num_hidden_layers))
        self.metrics.target_sparsity.set(self.routing.sparsity if self.routing.enabled else 0)
        self.metrics.max_sparsity.set(self.routing.max_sparsity if self.routing.enabled else 0)
        # Innermost: after vLLM's auth, request-id and HTTP-metrics middleware.
        app.user_middleware.append(Middleware(SparsityValidationMiddleware,
                                              get_limits=self.limits))
        if self.routing.enabled:
            self.poller = StatsPoller(engine_stats_rpc(engine_client), self.metrics,
                                      interval=self.args.stats_interval)
            app.user_middleware.append(Middleware(MetricsRefreshMiddleware,
                                                  poller=self.poller))
        add_routes(app, self)  # and the X-FTP-Replica header middleware
        # vLLM's SageMaker bootstrap builds the middleware stack eagerly: build it again.
        if getattr(app, "middleware_stack", None) is not None:
            app.middleware_stack = app.build_middleware_stack()
        if self.poller is None:
            return
        try:
            await self.poller.poll(count=False)  # baseline (warm-up runs are not recorded)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(
                f"FTP routing is on but the workers' routing stats cannot be read ({e!r}); "
                "is --worker-extension-cls set to something else?") from e
        measure = not self.args.no_self_benchmark and self.routing.sparsity > 0
        if not measure:
            log.info("FTP self-benchmark skipped (%s): ftp_measured_prefill_speedup = 0",
                     "--no-self-benchmark" if self.args.no_self_benchmark
                     else "default sparsity is 0")
        else:
            await self.run_benchmark(startup=True)
        await self.set_route_threshold(engine_client, measure)
        self.poller.start()

    async def set_route_threshold(self, engine_client: Any, measured: bool) -> None:
        """Prompts shorter than the threshold are served dense (``server.route_threshold``):
        fixed by --route-min-tokens, else measured now (a sweep of prompt lengths)."""
        from ftp_vllm.server.route_threshold import (
            BREAK_EVEN_LENGTHS,
            DenseBelow,
            threshold_from_speedups,
        )

        log = _logger()
        self.dense_below = DenseBelow(on_dense=self.metrics.short_prompt_dense.inc)
        self.dense_below.install(engine_client)
        n = self.args.route_min_tokens
        how = "--route-min-tokens"
        if n == AUTO and not measured:
            n, how = 0, "not measured (no self-benchmark)"
        elif n == AUTO:
            limit = int(engine_client.model_config.max_model_len) - 1
            for tokens in BREAK_EVEN_LENGTHS:
                if tokens > limit:
                    break
                res = (self.last_bench if self.last_bench is not None
                       and self.last_bench.tokens == tokens else
                       await self.run_benchmark(startup=True, tokens=tokens, gauge=False))
                if res is None:
                    break
                self.break_even[tokens] = res.speedup
            n = threshold_from_speedups(self.break_even)
            how = "measured: " + ", ".join(
                f"{k} tokens {v:.2f}x" for k, v in sorted(self.break_even.items()))
        self.dense_below.min_tokens = int(n)
        self.metrics.route_min_tokens.set(int(n))
        log.info("FTP routing: prompts shorter than %d tokens are served dense unless they "
                 "set ftp_sparsity (%s)", int(n), how)

    async def run_benchmark(self, startup: bool = False, tokens: int | None = None,
                            prompts: int | None = None, repeats: int | None = None,
                            gauge: bool = True):
        """One self-benchmark; ``gauge``: it sets ftp_measured_prefill_speedup (the
        break-even sweep's other lengths do not)."""
        from ftp_vllm.server.selfbench import self_benchmark

        log = _logger()
        a = self.args
        async with self.bench_lock:
            try:
                res = await self_benchmark(
                    self.engine_client, self.routing.sparsity,
                    tokens=tokens or a.self_benchmark_tokens,
                    prompts=prompts or a.self_benchmark_prompts,
                    repeats=repeats or a.self_benchmark_repeats,
                )
            except Exception as e:  # noqa: BLE001 - a failed benchmark must not stop serving
                log.warning("FTP self-benchmark failed: %r (ftp_measured_prefill_speedup "
                            "unchanged)", e)
                if not startup:
                    raise
                return None
            res.during_traffic = not startup
            if startup and self.poller is not None:
                await self.poller.poll(count=False)  # its requests are the new baseline
            log.info("FTP self-benchmark: %d x %d-token prompts, sparsity %g: dense %s s, "
                     "routed %s s, measured prefill speedup %.3fx (%.1f s)",
                     res.prompts, res.tokens, res.sparsity,
                     [round(x, 3) for x in res.dense_s], [round(x, 3) for x in res.routed_s],
                     res.speedup, res.elapsed_s)
            if not gauge:
                return res
            self.last_bench = res
            self.metrics.measured_speedup.set(res.speedup)
            if res.dense_s:
                import statistics

                self.metrics.bench_seconds.labels(mode="dense").set(
                    statistics.median(res.dense_s))
                self.metrics.bench_seconds.labels(mode="routed").set(
                    statistics.median(res.routed_s))
            return res

    async def stop(self) -> None:
        if self.poller is not None:
            await self.poller.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
