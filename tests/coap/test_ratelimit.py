"""Per-source rate limiting in the CoAP server: 4.29 + Max-Age for a flooding source, while
another source still gets through (transport/coap/ratelimit.py)."""
from __future__ import annotations

import asyncio
import socket

import aiocoap
import pytest
from aiocoap.numbers import codes

from zerotouch.transport.coap import start_coap_server
from zerotouch.transport.coap.ratelimit import RateLimit, TokenBuckets, is_handshake, source_of

from coap_harness import HOST

OTHER_SOURCE = "127.0.0.2"  # loopback answers on all of 127/8 on Linux


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_token_bucket_spends_refills_and_says_how_long_to_wait():
    clock = _Clock()
    b = TokenBuckets(rate=2, burst=3, clock=clock)
    assert [b.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("a") == pytest.approx(0.5)   # one token back after 1/rate seconds
    assert b.take("b") == 0.0                   # another key has its own bucket
    clock.t += 0.5
    assert b.take("a") == 0.0 and b.take("a") > 0


def test_token_buckets_are_bounded():
    clock = _Clock()
    b = TokenBuckets(rate=1, burst=2, clock=clock, max_keys=10)
    for i in range(100):
        b.take(f"10.0.0.{i}")
    assert len(b) <= 10


def test_source_is_the_address_not_the_port():
    class R:
        def __init__(self, sockaddr=None, hostinfo=None):
            self.sockaddr, self.hostinfo = sockaddr, hostinfo
    assert source_of(R(("::ffff:192.0.2.7", 5683, 0, 0))) == "192.0.2.7"
    assert source_of(R(("2001:db8::1", 1, 0, 0))) == "2001:db8::1"
    assert source_of(R(hostinfo="192.0.2.7:61616")) == "192.0.2.7"
    assert source_of(R(hostinfo="[2001:db8::1]:5684")) == "2001:db8::1"


def test_edhoc_messages_count_as_handshakes():
    assert is_handshake(aiocoap.Message(code=codes.POST, uri_path=(".well-known", "edhoc")))
    m = aiocoap.Message(code=codes.POST, uri_path=("zt", "hello"))
    assert not is_handshake(m)
    m.opt.edhoc = True
    assert is_handshake(m)


def _raw_get(source: str, port: int, mid: int) -> aiocoap.Message:
    """A CoAP GET /.well-known/core sent from `source` with a plain socket."""
    req = aiocoap.Message(code=codes.GET, uri_path=(".well-known", "core"))
    req.mtype, req.mid, req.token = aiocoap.CON, mid, b"\x01\x02"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(5)
        s.sendto(req.encode(), (HOST, port))
        data, _ = s.recvfrom(2048)
    return aiocoap.Message.decode(data)


async def test_flood_from_one_source_is_limited_another_source_gets_through(fleet):
    server = await start_coap_server(fleet.rendezvous, fleet.gateway, bind=(HOST, 0),
                                     rate_limit=RateLimit(rate=1, burst=5, handshake_rate=0))
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        async def get():
            req = aiocoap.Message(code=codes.GET, uri=f"{server.url}/.well-known/core")
            return await asyncio.wait_for(ctx.request(req).response, 10)
        answers = [await get() for _ in range(20)]
        ok = [a for a in answers if a.code == codes.CONTENT]
        limited = [a for a in answers if a.code == codes.TOO_MANY_REQUESTS]
        assert 5 <= len(ok) <= 7 and len(ok) + len(limited) == 20
        assert all(a.opt.max_age >= 1 for a in limited)
        assert server.limiter.limited == len(limited)

        # Meanwhile another source address still gets answers.
        other = await asyncio.to_thread(_raw_get, OTHER_SOURCE, server.port, 0x4242)
        assert other.code == codes.CONTENT and b"</zt/hello>" in other.payload
    finally:
        await ctx.shutdown()
        await server.shutdown()


async def test_limited_protocol_request_reaches_nothing(fleet):
    """A limited request never gets to the core: a flood of find-owner bodies costs no
    signature checks or database reads beyond the burst."""
    calls = []
    real = fleet.rendezvous.find_owner

    async def counting(body):
        calls.append(body)
        return await real(body)
    fleet.rendezvous.find_owner = counting
    server = await start_coap_server(fleet.rendezvous, None, bind=(HOST, 0),
                                     rate_limit=RateLimit(rate=0.5, burst=2, handshake_rate=0))
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        for _ in range(6):
            req = aiocoap.Message(code=codes.POST, uri=f"{server.url}/rv/find-owner",
                                  payload=b"\xa0", content_format=60)
            await asyncio.wait_for(ctx.request(req).response, 10)
        assert len(calls) == 2
    finally:
        await ctx.shutdown()
        await server.shutdown()


async def test_edhoc_handshake_flood_is_limited(fleet):
    pytest.importorskip("lakers")
    from zerotouch.transport.coap.edhoc import EdhocIdentity, KnownDevices
    server_id = EdhocIdentity.generate("gw")
    server = await start_coap_server(fleet.rendezvous, fleet.gateway, bind=(HOST, 0),
                                     edhoc_identity=server_id, edhoc_known=KnownDevices(),
                                     rate_limit=RateLimit(rate=100, burst=100, handshake_rate=0.1,
                                                          handshake_burst=2))
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        codes_seen = []
        for _ in range(5):  # junk message_1s: each would cost the server EDHOC work
            req = aiocoap.Message(code=codes.POST, uri=f"{server.url}/.well-known/edhoc",
                                  payload=b"\xf5\x03\x02\x58\x20" + bytes(32) + b"\x37")
            codes_seen.append((await asyncio.wait_for(ctx.request(req).response, 10)).code)
        assert codes_seen.count(codes.TOO_MANY_REQUESTS) == 3
        # ordinary requests from the same source are not handshakes: still answered
        req = aiocoap.Message(code=codes.GET, uri=f"{server.url}/.well-known/core")
        assert (await asyncio.wait_for(ctx.request(req).response, 10)).code == codes.CONTENT
    finally:
        await ctx.shutdown()
        await server.shutdown()
