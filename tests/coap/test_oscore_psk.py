"""PSK mode over CoAP: OSCORE contexts from the per-device PSK (transport/coap/oscore_psk.py)."""
from __future__ import annotations

import pytest

pytest.importorskip("aiocoap.oscore_sitewrapper")  # aiocoap's OSCORE extra: filelock, lakers

import aiocoap  # noqa: E402
import cbor2  # noqa: E402
from aiocoap import oscore  # noqa: E402
from aiocoap.numbers import codes  # noqa: E402

from zerotouch.services.bulk import derive_psk  # noqa: E402
from zerotouch.transport.coap.client import CoapDeviceTransport  # noqa: E402
from zerotouch.transport.coap.oscore_psk import (  # noqa: E402
    MASTER_SALT, OscorePskTransport, PskContextStore, device_context, start_oscore_psk_server)
from zerotouch.transport.http.client import PeerRefused  # noqa: E402

HOST = "127.0.0.1"
MASTER = bytes(range(32))
FIRST, LAST = 0x0A000000, 0x0A00000F
DEVID = "0a000003"
PSK = derive_psk(MASTER, DEVID)


class Services:
    """Stands in for the rendezvous and the gateway: answers what it was sent, per step."""

    def __init__(self):
        self.seen: list[tuple[str, bytes]] = []

    def _step(name):
        async def handler(self, body: bytes) -> bytes:
            self.seen.append((name, body))
            return cbor2.dumps({"step": name, "echo": body})
        return handler

    find_owner = _step("find-owner")
    hello = _step("hello")
    prove = _step("prove")
    done = _step("done")


@pytest.fixture
async def served():
    svc = Services()
    store = PskContextStore.from_box(MASTER, FIRST, LAST)
    # Stand-in services echo any bytes: the identity binding (test_channel_binding.py) is off.
    server = await start_oscore_psk_server(svc, svc, store=store, bind=(HOST, 0),
                                           channel_binding=False)
    yield server, svc, store
    await server.shutdown()


@pytest.fixture
async def plain_client():
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    yield ctx
    await ctx.shutdown()


def _outer(protected: aiocoap.Message, base: str) -> aiocoap.Message:
    """A protected request as a plain client sends it (fresh message ID and token each time)."""
    m = protected.copy(mid=None, token=b"")
    m.set_request_uri(base, set_uri_host=False)
    return m


def _post(url: str, body: bytes, **opts) -> aiocoap.Message:
    return aiocoap.Message(code=codes.POST, uri=url, payload=body, content_format=60, **opts)


async def test_right_psk_reaches_the_resources(served):
    server, svc, _ = served
    async with OscorePskTransport(devid=DEVID, psk=PSK, rendezvous_url=server.url,
                                  gateway_url=server.url) as t:
        rv = await t.find_owner("https://rv.example", b"\xa1\x01\x02")
        hello = await t.gateway("https://gw.example:8443", "hello", b"\x43abc")
        big = bytes(range(256)) * 8  # 2 KB: block-wise inside OSCORE
        done = await t.gateway("https://gw.example:8443", "done", cbor2.dumps(big))
        seq = t.sequence_numbers
    assert cbor2.loads(rv) == {"step": "find-owner", "echo": b"\xa1\x01\x02"}
    assert cbor2.loads(hello) == {"step": "hello", "echo": b"\x43abc"}
    assert cbor2.loads(cbor2.loads(done)["echo"]) == big
    assert [s for s, _ in svc.seen] == ["find-owner", "hello", "done"]
    # One context per role; the first request of each also answered the server's Echo.
    assert seq["rendezvous"] >= 2 and seq["gateway"] >= 3


async def test_answer_is_protected_on_the_wire_and_replay_is_refused(served, plain_client):
    server, svc, _ = served
    secctx = device_context(PSK, DEVID, "gateway")
    url = f"{server.url}/zt/hello"
    body = b"\x44ping"

    async def send(protected):
        return await plain_client.request(_outer(protected, server.url)).response

    # First request: the server does not know the replay window yet → protected 4.01 + Echo.
    protected, seqno = secctx.protect(_post(url, body))
    resp = await send(protected)
    assert resp.opt.oscore is not None
    inner, _ = secctx.unprotect(resp, seqno)
    assert inner.code == codes.UNAUTHORIZED and inner.opt.echo
    assert svc.seen == []

    protected, seqno = secctx.protect(_post(url, body, echo=inner.opt.echo))
    assert body not in bytes(protected.payload) and not protected.opt.uri_path  # path is inner
    resp = await send(protected)
    # Outer: 2.04 with the OSCORE option and a ciphertext; inner: the resource's answer.
    assert resp.code == codes.CHANGED and resp.opt.oscore is not None
    assert b"hello" not in bytes(resp.payload) and body not in bytes(resp.payload)
    inner, _ = secctx.unprotect(resp, seqno)
    assert inner.code == codes.CHANGED
    assert cbor2.loads(inner.payload) == {"step": "hello", "echo": body}
    assert svc.seen == [("hello", body)]

    # The same protected request again (new message ID and token): the replay window refuses.
    replay = await send(protected)
    assert replay.code == codes.UNAUTHORIZED and replay.opt.oscore is None
    assert b"Replay" in replay.payload
    assert svc.seen == [("hello", body)]

    # A fresh sequence number goes through again.
    protected, seqno = secctx.protect(_post(url, body))
    inner, _ = secctx.unprotect(await send(protected), seqno)
    assert inner.code == codes.CHANGED and len(svc.seen) == 2


async def test_wrong_psk_fails_with_an_oscore_error(served):
    server, svc, _ = served
    wrong = derive_psk(b"\x01" * 32, DEVID)
    async with OscorePskTransport(devid=DEVID, psk=wrong, rendezvous_url=server.url,
                                  gateway_url=server.url) as t:
        with pytest.raises(PeerRefused) as info:
            await t.gateway("https://gw.example", "hello", b"\x40")
    assert info.value.code == "oscore_refused" and info.value.status == 400  # "Decryption failed"
    assert svc.seen == []


async def test_wrong_psk_answer_is_plaintext_error_without_content(served, plain_client):
    server, svc, _ = served
    secctx = device_context(derive_psk(b"\x01" * 32, DEVID), DEVID, "gateway")
    protected, _ = secctx.protect(_post(f"{server.url}/zt/hello", b"\x40"))
    resp = await plain_client.request(_outer(protected, server.url)).response
    assert resp.opt.oscore is None and resp.code == codes.BAD_REQUEST
    assert b"step" not in resp.payload and svc.seen == []
    with pytest.raises(oscore.NotAProtectedMessage):
        oscore.verify_start(resp)


async def test_unknown_device_and_role_mixup_are_refused(served, plain_client):
    server, svc, _ = served
    async with OscorePskTransport(devid="0b000000", psk=derive_psk(MASTER, "0b000000"),
                                  rendezvous_url=server.url, gateway_url=server.url) as t:
        with pytest.raises(PeerRefused) as info:  # outside the box: no context for its KID
            await t.find_owner("https://rv.example", b"\x40")
    assert info.value.status == 401

    # On a combined server, a rendezvous-role context does not open the gateway's paths
    # (checked after unprotect: the path is encrypted) — a protected 4.03.
    secctx = device_context(PSK, DEVID, "rendezvous")
    send = lambda p: plain_client.request(_outer(p, server.url)).response  # noqa: E731
    protected, seqno = secctx.protect(_post(f"{server.url}/zt/hello", b"\x40"))
    inner, _ = secctx.unprotect(await send(protected), seqno)
    assert inner.code == codes.UNAUTHORIZED and inner.opt.echo  # Echo first
    protected, seqno = secctx.protect(_post(f"{server.url}/zt/hello", b"\x40", echo=inner.opt.echo))
    resp = await send(protected)
    assert resp.opt.oscore is not None
    inner, _ = secctx.unprotect(resp, seqno)
    assert inner.code == codes.FORBIDDEN
    assert svc.seen == []
    # A gateway-only server knows no rendezvous-role KID at all.
    gw_only = PskContextStore.from_box(MASTER, FIRST, LAST, roles=("gateway",))
    with pytest.raises(KeyError):
        gw_only.find_oscore({oscore.COSE_KID: b"\x01" + bytes.fromhex(DEVID)})
    assert gw_only.find_oscore({oscore.COSE_KID: b"\x02" + bytes.fromhex(DEVID)})


async def test_unprotected_requests_are_refused(served, plain_client):
    server, svc, _ = served
    async with CoapDeviceTransport(rendezvous_url=server.url, gateway_url=server.url) as t:
        with pytest.raises(PeerRefused) as info:
            await t.gateway("https://gw.example", "hello", b"\x40")
        assert info.value.status == 401
        with pytest.raises(PeerRefused):
            await t.find_owner("https://rv.example", b"\x40")
    assert svc.seen == []
    # Discovery stays open.
    resp = await plain_client.request(aiocoap.Message(code=codes.GET,
                                                      uri=f"{server.url}/.well-known/core")).response
    assert resp.code == codes.CONTENT and b"</zt/hello>" in resp.payload


async def test_store_add_remove_and_parameters():
    store = PskContextStore()
    store.add(DEVID, PSK)
    kid = b"\x02" + bytes.fromhex(DEVID)
    ctx = store.find_oscore({oscore.COSE_KID: kid})
    assert ctx is store.find_oscore({oscore.COSE_KID: kid})  # one replay window per device
    assert ctx.authenticated_claims == [f"zt-psk:{DEVID}"]
    dev = device_context(PSK, DEVID, "gateway")
    assert (dev.sender_key, dev.recipient_key, dev.common_iv) == (ctx.recipient_key, ctx.sender_key, ctx.common_iv)
    assert device_context(PSK, DEVID, "rendezvous").sender_key != dev.sender_key
    assert MASTER_SALT == b"zerotouch oscore-psk v1"
    store.remove(DEVID)
    with pytest.raises(KeyError):
        store.find_oscore({oscore.COSE_KID: kid})
    with pytest.raises(KeyError):
        store.find_oscore({oscore.COSE_KID: kid, oscore.COSE_KID_CONTEXT: b"x"})


async def test_sequence_numbers_resume_and_are_reported(served):
    server, _, _ = served
    seen = []
    async with OscorePskTransport(devid=DEVID, psk=PSK, gateway_url=server.url,
                                  sequence_numbers={"gateway": 1000},
                                  on_sequence=lambda role, n: seen.append((role, n))) as t:
        await t.gateway("https://gw.example", "hello", b"\x40")
    assert seen[0] == ("gateway", 1001) and t.sequence_numbers["gateway"] >= 1001
