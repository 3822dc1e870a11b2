"""Run an aiohttp app on a TLS socket until cancelled."""
from __future__ import annotations

import asyncio
import ssl

from aiohttp import web


async def start_site(app: web.Application, host: str, port: int,
                     ssl_context: ssl.SSLContext | None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True,
                       backlog=1024)
    await site.start()
    return runner


async def serve_forever(app: web.Application, host: str, port: int,
                        ssl_context: ssl.SSLContext | None, on_ready=None) -> None:
    runner = await start_site(app, host, port, ssl_context)
    if on_ready is not None:
        on_ready()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
