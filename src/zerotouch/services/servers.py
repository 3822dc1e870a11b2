"""Long-running servers for each role (what `zerotouch <role> serve` runs)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..transport.http.common import server_ssl_context
from ..transport.http.gateway_app import gateway_app
from ..transport.http.rendezvous_app import rendezvous_app
from ..transport.http.server import serve_forever
from .roles import build_gateway, build_rendezvous

log = logging.getLogger("zerotouch.serve")


async def serve_rendezvous(directory: Path, *, port: int | None = None, on_ready=None) -> None:
    rv = await build_rendezvous(directory)
    d = Path(directory)
    app = rendezvous_app(rv.service, public_info={"url": rv.config["url"]})
    ctx = server_ssl_context(d / "tls.pem", d / "tls.key")
    try:
        await serve_forever(app, rv.config["host"], port or rv.config["port"], ctx, on_ready)
    finally:
        await rv.store.close()


async def serve_gateway(directory: Path, *, port: int | None = None, on_ready=None) -> None:
    gw = await build_gateway(directory)
    d = Path(directory)
    app = gateway_app(gw.service, admin_token=gw.admin_token)
    ctx = server_ssl_context(d / "tls.pem", d / "tls.key")
    try:
        await serve_forever(app, gw.config["host"], port or gw.config["port"], ctx, on_ready)
    finally:
        await gw.close()
