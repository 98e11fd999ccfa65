"""Per-request sparsity, checked in the API process before vLLM sees the request.

Clients ask for their own target with vLLM's per-request extra arguments:
``{"vllm_xargs": {"ftp_sparsity": 0.2}}`` (0 or null: dense). The rule is
``ftp_vllm.contract.validate_sparsity``, the same function the worker applies. vLLM copies
``vllm_xargs`` into ``SamplingParams.extra_args`` and validates it only as "str, int, float
or list", and a streaming request would only fail after its 200 response has started. So a
pure ASGI middleware reads the JSON body of POST requests that mention ``ftp_sparsity``,
answers HTTP 400 (OpenAI error format) for a malformed or out-of-range value, and otherwise
replays the body unchanged to vLLM's app. It never reads bodies that do not mention the key,
and leaves malformed JSON to vLLM's own 400. The receive channel is handed on after the body,
so vLLM still sees a client that disconnects.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from ftp_vllm.contract import SPARSITY_KEY, XARGS_KEY, validate_sparsity

KEY = SPARSITY_KEY
XARGS = XARGS_KEY
MAX_BODY = 64 * 1024 * 1024  # larger bodies are passed on unchecked (vLLM limits them)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def check_request_sparsity(value: Any, max_sparsity: float, routing_on: bool) -> str | None:
    """None if `value` is an acceptable ``ftp_sparsity``, else the reason it is not.

    The rule is ``ftp_vllm.contract.validate_sparsity``, the function the worker applies too.
    """
    try:
        validate_sparsity(value, max_sparsity if routing_on else 0.0)
    except ValueError as e:
        return f"{XARGS}.{e}"
    return None


def find_error(body: bytes, max_sparsity: float, routing_on: bool) -> str | None:
    """The reason the request body's ``ftp_sparsity`` is refused, or None."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # vLLM answers malformed JSON itself
    if not isinstance(data, dict):
        return None
    xargs = data.get(XARGS)
    if not isinstance(xargs, dict) or KEY not in xargs:
        return None
    return check_request_sparsity(xargs[KEY], max_sparsity, routing_on)


def error_body(message: str, param: str = f"{XARGS}.{KEY}") -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError",
                                 "param": param, "code": 400}}).encode()


class SparsityValidationMiddleware:
    """ASGI middleware: HTTP 400 for a bad ``vllm_xargs.ftp_sparsity`` (see module doc)."""

    def __init__(self, app: Any, get_limits: Callable[[], tuple[float, bool]]):
        self.app = app
        self.get_limits = get_limits  # -> (max sparsity, routing on)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        first: list[dict[str, Any]] = []
        while more:
            message = await receive()
            if message["type"] != "http.request":  # disconnect before the body ended
                first.append(message)
                break
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
            if size > MAX_BODY:
                break
        body = b"".join(chunks)
        if not first and not more and KEY.encode() in body:
            reason = find_error(body, *self.get_limits())
            if reason is not None:
                payload = error_body(reason)
                await send({"type": "http.response.start", "status": 400, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode())]})
                await send({"type": "http.response.body", "body": payload})
                return
        replay: list[dict[str, Any]] = []
        if chunks:
            replay.append({"type": "http.request", "body": body, "more_body": more})
        replay.extend(first)

        async def replay_receive() -> dict[str, Any]:
            if replay:
                return replay.pop(0)
            return await receive()

        await self.app(scope, replay_receive, send)
