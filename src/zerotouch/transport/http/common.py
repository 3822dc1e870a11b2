"""Shared pieces of the HTTP adapters: body limits, error → status mapping, TLS contexts.

Adapters are thin: read bytes, call the service, write bytes. A ProtocolError becomes its
4xx/503 status with a readable message; anything else becomes a bare 500 (logged, never
echoed, so no secret can leak into a response).
"""
from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path
from typing import Awaitable, Callable

from aiohttp import web

from ...protocol.codec import MAX_MESSAGE
from ...protocol.errors import MessageTooLarge, ProtocolError
from ...protocol.messages import ErrorReply

log = logging.getLogger("zerotouch.http")
CBOR = "application/cbor"


def _error_response(exc: ProtocolError, as_json: bool) -> web.Response:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(int(exc.retry_after))
    if as_json:
        body = {"error": exc.code, "message": exc.message}
        return web.json_response(body, status=exc.status, headers=headers)
    reply = ErrorReply(code=exc.code[:64], message=exc.message[:512], retry_after=exc.retry_after)
    return web.Response(body=reply.encode(), status=exc.status, content_type=CBOR, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler):
    # Devices speak CBOR and get CBOR errors; people and scripts get JSON.
    as_json = request.content_type != CBOR
    try:
        return await handler(request)
    except ProtocolError as exc:
        log.info("%s %s -> %s %s", request.method, request.path, exc.status, exc.code)
        return _error_response(exc, as_json)
    except web.HTTPException as exc:
        if exc.status == 413:
            return _error_response(MessageTooLarge("request body is too large"), as_json)
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return web.json_response({"error": "internal", "message": "internal error"}, status=500)


async def read_cbor(request: web.Request, max_size: int = MAX_MESSAGE) -> bytes:
    if request.content_length is not None and request.content_length > max_size:
        raise MessageTooLarge(f"request body of {request.content_length} bytes exceeds {max_size}")
    ctype = request.content_type
    if ctype not in (CBOR, "application/cose", "application/octet-stream"):
        raise ProtocolError(f"send {CBOR}, not {ctype}", status=415, code="media_type")
    body = await request.content.read(max_size + 1)
    if len(body) > max_size:
        raise MessageTooLarge(f"request body exceeds {max_size} bytes")
    return body


def cbor_route(fn: Callable[[bytes], Awaitable[bytes]]):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=await fn(await read_cbor(request)), content_type=CBOR)
    return handler


def server_ssl_context(cert_file: Path, key_file: Path, *, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no system CA store: anchors are pinned
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if client_ca is not None:
        ctx.load_verify_locations(str(client_ca))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def make_app(*, max_size: int = MAX_MESSAGE) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=max(max_size, 1 << 20))

    async def healthz(_request):
        return web.json_response({"ok": True})

    app.router.add_get("/healthz", healthz)
    return app


def json_error(message: str, status: int = 400, code: str = "bad_request") -> web.Response:
    return web.Response(text=json.dumps({"error": code, "message": message}), status=status,
                        content_type="application/json")
