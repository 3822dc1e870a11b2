"""HTTPS bytes on the wire for one whole onboarding: what the device's TCP sockets moved (TLS
handshakes and records carrying HTTP), counted by the transport itself and, independently, by
a TCP relay between the device and both servers that also splits the stream into TLS records.

Run with `-s` to print the figures (compare tests/coap/test_edhoc_wire_bytes.py for CoAP)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from zerotouch.agent.runtime import Agent
from zerotouch.transport.http.client import HttpDeviceTransport

from http_harness import HOST

TLS_HANDSHAKE, TLS_APPLICATION_DATA = 22, 23


@dataclass
class Direction:
    bytes: int = 0
    by_type: dict[int, int] = field(default_factory=dict)   # TLS content type -> record bytes
    _buf: bytes = b""

    def add(self, data: bytes) -> None:
        self.bytes += len(data)
        self._buf += data
        while len(self._buf) >= 5:     # TLS record: type, version (2), length (2), fragment
            length = int.from_bytes(self._buf[3:5], "big")
            if len(self._buf) < 5 + length:
                break
            kind = self._buf[0]
            self.by_type[kind] = self.by_type.get(kind, 0) + 5 + length
            self._buf = self._buf[5 + length:]


class TcpRelay:
    """client → relay port → target; counts each direction of every connection."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.up: list[Direction] = []
        self.down: list[Direction] = []
        self._tasks: set[asyncio.Task] = set()
        self._server = None
        self.port = 0

    async def start(self) -> "TcpRelay":
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer):
        t_reader, t_writer = await asyncio.open_connection(HOST, self.target_port)
        up, down = Direction(), Direction()
        self.up.append(up)
        self.down.append(down)

        async def pump(src, dst, counter):
            try:
                while data := await src.read(65536):
                    counter.add(data)
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                try:
                    dst.close()
                except Exception:
                    pass
        tasks = [asyncio.ensure_future(pump(reader, t_writer, up)),
                 asyncio.ensure_future(pump(t_reader, writer, down))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks)

    async def idle(self, timeout: float = 5.0) -> None:
        """Wait until every relayed connection has closed both ways."""
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), timeout)

    def total(self, direction: str, kind: int | None = None) -> int:
        dirs = self.up if direction == "up" else self.down
        return sum(d.bytes if kind is None else d.by_type.get(kind, 0) for d in dirs)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._server.close()
        await self._server.wait_closed()


async def test_https_onboarding_wire_bytes(sq_servers):
    s, f = sq_servers, sq_servers.fleet
    rv_relay = await TcpRelay(int(s.rv_url.rsplit(":", 1)[1])).start()
    gw_relay = await TcpRelay(s.gw_port).start()
    try:
        dev = await f.make(claim=False, inventory=True)
        # the owner claims with the relay's port: the signed redirect sends the device through it
        await f.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip=HOST,
                                 cport=gw_relay.port, cfingerprint=f.owner_fp_hex)
        transport = HttpDeviceTransport(rendezvous_ca_pem=s.rv_ca_pem)
        agent = Agent(dev.device_dir, transport=transport, max_attempts=1, operational=False)
        agent.factory["rendezvous_url"] = f"https://{HOST}:{rv_relay.port}"
        report = await agent.run(telemetry=0)
        assert report.onboarded and not report.error, report
        await rv_relay.idle()
        await gw_relay.idle()

        relays = (rv_relay, gw_relay)
        up = sum(r.total("up") for r in relays)
        down = sum(r.total("down") for r in relays)
        # the transport counts exactly what crossed its sockets (the relay saw the same bytes;
        # the report is taken as the transport closes, so a closing alert may come after it)
        assert (transport.wire_bytes_sent, transport.wire_bytes_received) == (up, down)
        assert 0 <= up - report.wire_bytes_sent <= 64 and 0 <= down - report.wire_bytes_received <= 64
        assert transport.wire.connections == 2     # one kept-alive connection per server

        # larger than the payload, and plausibly so: a TLS handshake per connection ...
        assert report.wire_bytes_sent > report.bytes_sent > 0
        assert report.wire_bytes_received > report.bytes_received > 0
        for relay in relays:
            assert relay.total("up", TLS_HANDSHAKE) >= 200           # a ClientHello at least
            # the server's certificate travels in its handshake (TLS 1.3: encrypted, so in
            # application-data records; TLS 1.2: handshake records)
            assert relay.total("down") - relay.total("down", TLS_APPLICATION_DATA) > 90
        assert down >= report.bytes_received + len(s.gw_cert_der) + 500
        # ... every payload byte inside an application-data record, and not absurdly more
        app_up = sum(r.total("up", TLS_APPLICATION_DATA) for r in relays)
        app_down = sum(r.total("down", TLS_APPLICATION_DATA) for r in relays)
        assert app_up > report.bytes_sent and app_down > report.bytes_received
        assert up < report.bytes_sent + 4 * 4096 and down < report.bytes_received + 4 * 8192
        print(f"\n[https onboarding] payload: sent {report.bytes_sent} B, received "
              f"{report.bytes_received} B; on the wire (TCP payload, TLS + HTTP): sent {up} B, "
              f"received {down} B over {transport.wire.connections} connections; "
              f"TLS records up {[r.by_type for r in rv_relay.up + gw_relay.up]}, "
              f"down {[r.by_type for r in rv_relay.down + gw_relay.down]}")
    finally:
        await rv_relay.close()
        await gw_relay.close()


def test_wire_bytes_are_not_claimed_where_they_cannot_be_counted():
    """uvloop does its socket I/O in C, past the counting socket: report None, never 0."""
    uvloop = pytest.importorskip("uvloop")

    async def under_uvloop():
        t = HttpDeviceTransport(rendezvous_ca_pem=None)
        t._session = t._new_session()
        try:
            return t.wire_bytes_sent, t.wire_bytes_received
        finally:
            await t.close()
    assert uvloop.run(under_uvloop()) == (None, None)
