"""``/ftp/...`` routes and the middleware that refreshes the ftp_ metrics before a scrape.

- ``GET /ftp/stats``: routing settings, the workers' running totals (summed over
  data-parallel engines, and per engine), the last self-benchmark, this replica's name.
- ``GET /ftp/requests/{id}``: routing records of a recent request by the id its response
  carried (``cmpl-...``, ``chatcmpl-...``): prompt tokens, target and measured sparsity,
  FLOP-model speedup, one record per prompt. Standard OpenAI clients never call it. Each
  server keeps only the requests it served itself: behind a load balancer with several
  replicas, ask the replica named in the response's ``X-FTP-Replica`` header (every response
  carries it; the host name, which is the pod name on Kubernetes).
- ``POST /ftp/benchmark``: re-run the self-benchmark now (query ``tokens``, ``prompts``,
  ``repeats``); 409 while one runs. With ``--api-key`` it needs the same bearer token.
"""

from __future__ import annotations

import hmac
import socket
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

REPLICA_HEADER = "X-FTP-Replica"


def replica_name() -> str:
    """This server's name in responses: the host name (a pod's name on Kubernetes)."""
    return socket.gethostname()


class ReplicaHeaderMiddleware:
    """ASGI: every HTTP response names the replica that served it (``X-FTP-Replica``), so a
    client behind a load balancer knows where to ask ``/ftp/requests/<id>``."""

    def __init__(self, app: Any, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica.encode("latin-1", "replace"))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class MetricsRefreshMiddleware:
    """ASGI: before ``GET /metrics`` is answered, read the workers' stats (bounded wait)."""

    def __init__(self, app: Any, poller: Any, max_wait: float = 2.0):
        self.app = app
        self.poller = poller
        self.max_wait = max_wait

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "GET":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if path.rstrip("/") == "/metrics":
                await self.poller.refresh(self.max_wait)
        await self.app(scope, receive, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError"
                                   if status < 500 else "InternalServerError",
                                   "param": None, "code": status}}, status_code=status)


def _api_keys(args: Any) -> list[str]:
    import os

    keys = getattr(args, "api_key", None) or os.environ.get("VLLM_API_KEY")
    if not keys:
        return []
    return list(keys) if isinstance(keys, list | tuple) else [keys]


def not_here_message(request_id: str, replica: str, kept: int) -> str:
    """The 404 of ``/ftp/requests/<id>``: why a record can be missing, and where to ask."""
    return (f"no routing record for {request_id!r}: not on this replica ({replica}), which "
            f"keeps the records of the last {kept} routed requests it served itself; dense "
            "requests (ftp_sparsity 0) leave none. Behind a load balancer with several "
            "replicas, ask the replica that served the request: its response carried the "
            f"header {REPLICA_HEADER}.")


def add_routes(app: FastAPI, ftp: Any) -> None:
    """The ``/ftp/...`` routes, and the ``X-FTP-Replica`` header on every response."""
    from starlette.middleware import Middleware

    from ftp_vllm.server.metrics import MAX_RECENT

    routing = ftp.routing
    replica = replica_name()
    # The caller (FTPServer.attach) rebuilds a middleware stack vLLM built already.
    app.user_middleware.append(Middleware(ReplicaHeaderMiddleware, replica=replica))

    @app.get("/ftp/stats")
    async def ftp_stats() -> JSONResponse:
        poller = ftp.poller
        if poller is not None:
            await poller.refresh(2.0)
        return JSONResponse({
            "routing": {"enabled": routing.enabled,
                        "router": str(routing.router) if routing.router else None,
                        "kind": routing.kind, "source": routing.source,
                        "default_sparsity": routing.sparsity if routing.enabled else 0.0,
                        "max_sparsity": routing.max_sparsity,
                        "route_min_tokens": (ftp.dense_below.min_tokens
                                             if ftp.dense_below is not None else 0),
                        "break_even_speedups": {str(k): v
                                                for k, v in sorted(ftp.break_even.items())}},
            "totals": None if poller is None else poller.last,  # summed over engines
            "engines": None if poller is None else  # data parallel: each engine's totals
            [poller.last_per_engine[k] for k in sorted(poller.last_per_engine)],
            "replica": replica,
            "self_benchmark": None if ftp.last_bench is None else ftp.last_bench.to_dict(),
        })

    @app.get("/ftp/requests/{request_id}")
    async def ftp_request(request_id: str) -> JSONResponse:
        poller = ftp.poller
        if poller is None:
            return _error(404, "FTP routing is off on this server: no routing records")
        await poller.refresh(2.0)
        records = poller.recent.get(request_id)
        if records is None:
            return _error(404, not_here_message(request_id, replica, MAX_RECENT))
        return JSONResponse({"id": request_id, "records": records})

    @app.post("/ftp/benchmark")
    async def ftp_benchmark(request: Request, tokens: int | None = None,
                            prompts: int | None = None,
                            repeats: int | None = None) -> JSONResponse:
        keys = _api_keys(ftp.args)
        if keys:
            auth = request.headers.get("authorization", "")
            token = auth.removeprefix("Bearer ").strip()
            if not any(hmac.compare_digest(token, k) for k in keys):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
        if not routing.enabled or routing.sparsity <= 0:
            return _error(400, "nothing to measure: FTP routing is off or the default "
                               "sparsity is 0")
        for name, value, low, high in (("tokens", tokens, 2, 1 << 20),
                                       ("prompts", prompts, 1, 256),
                                       ("repeats", repeats, 1, 100)):
            if value is not None and not low <= value <= high:
                return _error(400, f"{name} must lie in [{low}, {high}], got {value}")
        if ftp.bench_lock.locked():
            return _error(409, "a self-benchmark is already running")
        try:
            res = await ftp.run_benchmark(tokens=tokens, prompts=prompts, repeats=repeats)
        except Exception as e:  # noqa: BLE001
            return _error(500, f"self-benchmark failed: {e!r}")
        return JSONResponse(res.to_dict())
