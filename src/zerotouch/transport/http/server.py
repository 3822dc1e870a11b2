"""Run an aiohttp app on a TLS socket until cancelled."""
from __future__ import annotations

import asyncio
import ssl

from aiohttp import web


async def start_site(app: web.Application, host: str, port: int,
                     ssl_context: ssl.SSLContext | None, *, reuse_port: bool = False) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    # reuse_port: several processes accept on one port and the kernel spreads connections.
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True,
                       reuse_port=reuse_port or None, backlog=1024)
    await site.start()
    return runner


async def serve_forever(app: web.Application, host: str, port: int,
                        ssl_context: ssl.SSLContext | None, on_ready=None, *,
                        reuse_port: bool = False) -> None:
    runner = await start_site(app, host, port, ssl_context, reuse_port=reuse_port)
    if on_ready is not None:
        on_ready()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
