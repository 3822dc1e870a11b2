"""Loopback helpers: free ports, waiting for a listener, a round-robin TCP balancer."""
from __future__ import annotations

import asyncio
import itertools
import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _r, w = await asyncio.open_connection(host, port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s") from None
            await asyncio.sleep(0.05)


class RoundRobinBalancer:
    """Layer-4 load balancer: each new connection goes to the next backend (TLS passes through).

    Stands in for the load balancer in front of gateway replicas, so a device's consecutive
    requests land on different processes.
    """

    def __init__(self, host: str, port: int, backends: list[tuple[str, int]]):
        self.host, self.port = host, port
        self.backends = backends
        self.connections = {b: 0 for b in backends}
        self._next = itertools.cycle(backends)
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = next(self._next)
        self.connections[backend] += 1
        try:
            br, bw = await asyncio.open_connection(*backend)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                try:
                    dst.close()
                except Exception:
                    pass

        await asyncio.gather(pipe(reader, bw), pipe(br, writer))
