"""CoAP/UDP with EDHOC + OSCORE: raw public keys (P-256 CCS) pinned by fingerprint."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("lakers")

import aiocoap  # noqa: E402
import aiocoap.resource as resource  # noqa: E402
from aiocoap.numbers import codes  # noqa: E402

from zerotouch.transport.coap.common import CBOR_CF  # noqa: E402
from zerotouch.transport.coap.edhoc import (  # noqa: E402
    EdhocIdentity, EdhocPinMismatch, KnownDevices, ccs_fingerprint, edhoc_peer, pin_server,
    start_edhoc_coap_server)
from zerotouch.transport.coap.server import CborEndpoint  # noqa: E402

HOST = "127.0.0.1"
TIMEOUT = 10


class _WhoAmI(resource.Resource):
    """Answers with the fingerprint of the EDHOC peer the request came from."""

    async def render_post(self, request):
        peer = edhoc_peer(request)
        return aiocoap.Message(code=codes.CHANGED, payload=(peer or b"") + request.payload)


def _site(seen: list):
    async def echo(body: bytes) -> bytes:
        seen.append(body)
        return b"\xa1\x61a" + body[-1:]  # any CBOR-ish bytes back

    site = resource.Site()
    site.add_resource(("zt", "hello"), CborEndpoint(echo, name="/zt/hello"))
    site.add_resource(("who",), _WhoAmI())
    site.add_resource((".well-known", "core"),
                      resource.WKCResource(site.get_resources_as_linkheader, impl_info=None))
    return site


@pytest.fixture
async def server_env():
    server_id, device = EdhocIdentity.generate("gateway"), EdhocIdentity.generate("device-1")
    known = KnownDevices([device.fingerprint])
    seen: list = []
    server = await start_edhoc_coap_server(_site(seen), identity=server_id, known=known,
                                           bind=(HOST, 0))
    yield server, server_id, device, seen
    await server.shutdown()


@pytest.fixture
async def client_ctx():
    ctx = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
    yield ctx
    await ctx.shutdown()


async def _post(ctx, url, payload=b"\x01", cf=CBOR_CF):
    req = aiocoap.Message(code=codes.POST, uri=url, payload=payload, content_format=cf)
    return await asyncio.wait_for(ctx.request(req).response, TIMEOUT)


def test_identity_ccs_and_fingerprint():
    ident = EdhocIdentity.generate("x")
    assert ccs_fingerprint(ident.ccs) == ident.fingerprint
    assert ccs_fingerprint(ident.credential) == ident.fingerprint
    assert len(ident.fingerprint) == 32
    assert ident.fingerprint != EdhocIdentity.generate("x").fingerprint


async def test_request_over_edhoc_oscore_reaches_resource(server_env, client_ctx):
    server, server_id, device, seen = server_env
    creds = pin_server(client_ctx, server.url, device, server_id.fingerprint)

    resp = await _post(client_ctx, f"{server.url}/zt/hello", b"\x82\x01\x02")
    assert resp.code == codes.CHANGED, resp
    assert bytes(resp.payload) == b"\xa1\x61a\x02"
    assert seen == [b"\x82\x01\x02"]
    # it really was OSCORE: the answer came back through the security context
    assert isinstance(resp.remote, aiocoap.transports.oscore.OSCOREAddress)

    # the resource learns which device spoke; the context is reused (one handshake)
    resp = await _post(client_ctx, f"{server.url}/who", b"!")
    assert resp.code == codes.CHANGED
    assert bytes(resp.payload) == device.fingerprint + b"!"
    for i in range(3):
        assert (await _post(client_ctx, f"{server.url}/zt/hello", bytes([i]))).code == codes.CHANGED
    assert creds.handshakes == 1


async def test_client_refuses_server_with_other_fingerprint(server_env, client_ctx):
    server, _server_id, device, seen = server_env
    impostor_pin = EdhocIdentity.generate("someone else").fingerprint
    pin_server(client_ctx, server.url, device, impostor_pin)

    with pytest.raises(EdhocPinMismatch):
        await _post(client_ctx, f"{server.url}/zt/hello", b"secret")
    assert seen == []


async def test_server_refuses_unknown_device(server_env, client_ctx):
    server, server_id, _device, seen = server_env
    stranger = EdhocIdentity.generate("not in inventory")
    pin_server(client_ctx, server.url, stranger, server_id.fingerprint)

    # The server aborts EDHOC at message_3 (riding on the first request) with an unprotected
    # 4.00; aiocoap's client raises on an unprotected answer to an OSCORE request.
    with pytest.raises(aiocoap.error.Error):
        await _post(client_ctx, f"{server.url}/zt/hello", b"secret")
    assert seen == []


async def test_device_added_to_known_list_while_serving(server_env, client_ctx):
    server, server_id, _device, seen = server_env
    late = EdhocIdentity.generate("late")
    server.site.known.add(late.fingerprint)
    pin_server(client_ctx, server.url, late, server_id.fingerprint)
    assert (await _post(client_ctx, f"{server.url}/zt/hello", b"\x07")).code == codes.CHANGED
    assert seen == [b"\x07"]


async def test_plain_coap_to_protected_resource_is_refused(server_env, client_ctx):
    server, _server_id, _device, seen = server_env
    # no credentials for this origin: aiocoap sends plain CoAP
    resp = await _post(client_ctx, f"{server.url}/zt/hello", b"\x01")
    assert resp.code == codes.UNAUTHORIZED
    assert seen == []
    # discovery stays open
    req = aiocoap.Message(code=codes.GET, uri=f"{server.url}/.well-known/core")
    resp = await asyncio.wait_for(client_ctx.request(req).response, TIMEOUT)
    assert resp.code == codes.CONTENT and b"</zt/hello>" in resp.payload


async def test_many_devices_do_not_exhaust_server_contexts(server_env):
    """aiocoap alone keeps every responder context and runs out of C_R values after 47."""
    server, server_id, _device, seen = server_env
    for i in range(60):
        dev = EdhocIdentity.generate(f"d{i}")
        server.site.known.add(dev.fingerprint)
        ctx = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
        try:
            pin_server(ctx, server.url, dev, server_id.fingerprint)
            resp = await _post(ctx, f"{server.url}/zt/hello", bytes([i]))
            assert resp.code == codes.CHANGED, (i, resp)
        finally:
            await ctx.shutdown()
    assert len(seen) == 60


async def test_revoked_device_loses_its_context(server_env, client_ctx):
    server, server_id, device, seen = server_env
    creds = pin_server(client_ctx, server.url, device, server_id.fingerprint)
    assert (await _post(client_ctx, f"{server.url}/zt/hello", b"\x01")).code == codes.CHANGED
    assert server.site.revoke(device.fingerprint) == 1
    with pytest.raises(aiocoap.error.Error):  # old context gone
        await _post(client_ctx, f"{server.url}/zt/hello", b"\x02")
    creds.reset()
    with pytest.raises(aiocoap.error.Error):  # and a new handshake is refused
        await _post(client_ctx, f"{server.url}/zt/hello", b"\x03")
    assert seen == [b"\x01"]


async def test_evicted_context_recovers_after_reset():
    site_seen: list = []
    server_id, a = EdhocIdentity.generate("gw"), EdhocIdentity.generate("a")
    known = KnownDevices([a.fingerprint])
    server = await start_edhoc_coap_server(_site(site_seen), identity=server_id, known=known,
                                           bind=(HOST, 0), max_contexts=3)
    ctx = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
    try:
        creds = pin_server(ctx, server.url, a, server_id.fingerprint)
        assert (await _post(ctx, f"{server.url}/zt/hello", b"\x01")).code == codes.CHANGED
        for i in range(4):  # push A's context out
            d = EdhocIdentity.generate()
            known.add(d.fingerprint)
            other = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
            try:
                pin_server(other, server.url, d, server_id.fingerprint)
                assert (await _post(other, f"{server.url}/zt/hello", b"\x09")).code == codes.CHANGED
            finally:
                await other.shutdown()
        with pytest.raises(aiocoap.error.Error):
            await _post(ctx, f"{server.url}/zt/hello", b"\x02")
        creds.reset()
        assert (await _post(ctx, f"{server.url}/zt/hello", b"\x03")).code == codes.CHANGED
        assert creds.handshakes == 2
    finally:
        await ctx.shutdown()
        await server.shutdown()


async def test_agent_onboards_over_edhoc_oscore(fleet):
    """The real rendezvous + gateway served through start_coap_server(edhoc_identity=...), the
    agent's CoapDeviceTransport pinning the server's key; a wrong pin gets nothing."""
    import random

    from zerotouch.agent.backoff import Backoff
    from zerotouch.agent.runtime import Agent
    from zerotouch.transport.coap.client import CoapDeviceTransport
    from zerotouch.transport.coap.server import start_coap_server

    from zerotouch.pki.keys import load_private_key

    server_id = EdhocIdentity.generate("owner")
    known = KnownDevices()
    server = await start_coap_server(fleet.rendezvous, fleet.gateway, bind=(HOST, 0),
                                     edhoc_identity=server_id, edhoc_known=known)
    try:
        dev = await fleet.make(claim=False)
        # The device's EDHOC key is its IDevID key (binding.py: channel identity = message identity).
        device = EdhocIdentity(load_private_key(dev.device_dir / "idevid.key"), dev.serial)
        known.add(device.fingerprint)
        await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip=HOST,
                                     cport=server.port, cfingerprint=fleet.owner_fp_hex)
        # A device pinning another key refuses the server before sending anything.
        wrong = CoapDeviceTransport(rendezvous_url=server.url, edhoc_identity=device,
                                    edhoc_pins={server.url: bytes(32)})
        report = await Agent(dev.device_dir, transport=wrong, backoff=Backoff(rand=random.Random(1)),
                             max_attempts=1, operational=False).run(telemetry=0)
        assert not report.onboarded and report.error
        assert (await fleet.store.inventory.get(dev.serial)).state.value == "expected"

        t = CoapDeviceTransport(rendezvous_url=server.url, edhoc_identity=device,
                                edhoc_pins={server.url: server_id.fingerprint})
        agent = Agent(dev.device_dir, transport=t, backoff=Backoff(rand=random.Random(1)),
                      max_attempts=1, operational=False)
        report = await agent.run(telemetry=0)
        assert report.onboarded, report.error
        assert t.requests == 4 and t._edhoc_creds[server.url].handshakes == 1
        await t.close()
    finally:
        await server.shutdown()
