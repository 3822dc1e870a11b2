"""CoAP servers on real loopback sockets for the CoAP adapter tests, and a counting UDP relay.

The relay sits between a client and a CoAP/UDP server and counts every datagram in each
direction (CoAP headers, options, block-wise round trips, ACKs and retransmissions included):
the number a radio link would carry above UDP.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sqlalchemy import func, select

from zerotouch.storage.schema import gw_certificates, gw_inventory, gw_sessions, rv_devices, vault_secrets

HOST = "127.0.0.1"
TABLES = (rv_devices, gw_inventory, gw_sessions, vault_secrets, gw_certificates)


async def snapshot(store) -> dict[str, list[str]]:
    out = {}
    async with store.engine.connect() as c:
        for table in TABLES:
            out[table.name] = sorted(repr(tuple(r)) for r in (await c.execute(select(table))).all())
    return out


async def count(store, table) -> int:
    async with store.engine.connect() as c:
        return (await c.execute(select(func.count()).select_from(table))).scalar_one()


@dataclass
class Direction:
    datagrams: int = 0
    bytes: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)

    def add(self, n: int) -> None:
        self.datagrams += 1
        self.bytes += n
        self.largest = max(self.largest, n)
        self.sizes.append(n)


class UdpRelay:
    """One client at a time: client → relay port → server, answers back to that client."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.up = Direction()     # device → server
        self.down = Direction()   # server → device
        self._front = self._back = None
        self._client = None
        self.port = 0

    async def start(self) -> "UdpRelay":
        loop = asyncio.get_running_loop()
        relay = self

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                relay._client = addr
                relay.up.add(len(data))
                relay._back.sendto(data)

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                relay.down.add(len(data))
                if relay._client is not None:
                    relay._front.sendto(data, relay._client)

        self._front, _ = await loop.create_datagram_endpoint(Front, local_addr=(HOST, 0))
        self._back, _ = await loop.create_datagram_endpoint(Back, remote_addr=self.target)
        self.port = self._front.get_extra_info("sockname")[1]
        return self

    @property
    def url(self) -> str:
        return f"coap://{HOST}:{self.port}"

    def reset(self) -> None:
        self.up, self.down = Direction(), Direction()

    def close(self) -> None:
        for t in (self._front, self._back):
            if t is not None:
                t.close()
