"""Channel identity = message identity (transport/coap/binding.py): under an OSCORE context
tied to one device (its PSK, or EDHOC with its key) only that device's messages pass."""
from __future__ import annotations

import os
import random

import pytest

pytest.importorskip("aiocoap.oscore_sitewrapper")

from zerotouch.agent.backoff import Backoff  # noqa: E402
from zerotouch.agent.runtime import Agent  # noqa: E402
from zerotouch.pki.keys import load_private_key  # noqa: E402
from zerotouch.transport.coap import binding  # noqa: E402
from zerotouch.transport.coap.oscore_psk import OscorePskTransport, PskContextStore, start_oscore_psk_server  # noqa: E402
from zerotouch.transport.http.client import PeerRefused  # noqa: E402

HOST = "127.0.0.1"


def _agent(dev, transport):
    return Agent(dev.device_dir, transport=transport, backoff=Backoff(rand=random.Random(1)),
                 max_attempts=1, operational=False)


async def test_psk_device_cannot_send_another_devices_messages(fleet):
    a, b = await fleet.make(), await fleet.make()
    psk_a = os.urandom(32)
    store = PskContextStore()
    store.add(a.serial, psk_a)
    server = await start_oscore_psk_server(fleet.rendezvous, fleet.gateway, store=store, bind=(HOST, 0))
    try:
        core_b = fleet.core(b)
        async with OscorePskTransport(devid=a.serial, psk=psk_a, rendezvous_url=server.url,
                                      gateway_url=server.url) as t:
            # B's genuine, signed find-owner and hello, sent under A's PSK context: refused.
            with pytest.raises(PeerRefused) as info:
                await t.find_owner("https://rv.example", core_b.find_owner_request())
            assert info.value.status == 403 and info.value.code == "channel_identity"
            core_b.reset()
            core_b.find_owner_request()
            core_b.state = core_b.state.__class__.REDIRECTED  # hello without asking the rendezvous
            with pytest.raises(PeerRefused) as info:
                await t.gateway("https://gw.example", "hello", core_b.hello_request())
            assert info.value.code == "channel_identity"
            seq = t.sequence_numbers

        # A onboards under its own PSK: its messages (and the kid-signed prove/done) pass.
        # (Sequence numbers go on from where they were: restarting them is a replay.)
        t = OscorePskTransport(devid=a.serial, psk=psk_a, rendezvous_url=server.url,
                               gateway_url=server.url, sequence_numbers=seq)
        report = await _agent(a, t).run(telemetry=0)
        assert report.onboarded, report.error
        # B was never touched.
        assert (await fleet.store.inventory.get(b.serial)).state.value == "expected"
    finally:
        await server.shutdown()


async def test_edhoc_channel_carries_only_its_own_devices_messages(fleet):
    pytest.importorskip("lakers")
    from zerotouch.transport.coap.client import CoapDeviceTransport
    from zerotouch.transport.coap.edhoc import EdhocIdentity, KnownDevices
    from zerotouch.transport.coap.server import start_coap_server

    a, b = await fleet.make(), await fleet.make()
    key_a = EdhocIdentity(load_private_key(a.device_dir / "idevid.key"), a.serial)
    stranger = EdhocIdentity.generate("not an IDevID key")
    server_id = EdhocIdentity.generate("gateway")
    server = await start_coap_server(fleet.rendezvous, fleet.gateway, bind=(HOST, 0),
                                     edhoc_identity=server_id,
                                     edhoc_known=KnownDevices([key_a.fingerprint, stranger.fingerprint]))
    pins = {server.url: server_id.fingerprint}
    try:
        t = CoapDeviceTransport(rendezvous_url=server.url, gateway_url=server.url,
                                edhoc_identity=key_a, edhoc_pins=pins)
        with pytest.raises(PeerRefused) as info:  # B's find-owner over A's EDHOC channel
            await t.find_owner("https://rv.example", fleet.core(b).find_owner_request())
        assert info.value.code == "channel_identity"
        await t.close()

        # An EDHOC key that is not the device's IDevID key cannot speak for the device.
        t = CoapDeviceTransport(rendezvous_url=server.url, gateway_url=server.url,
                                edhoc_identity=stranger, edhoc_pins=pins)
        with pytest.raises(PeerRefused) as info:
            await t.find_owner("https://rv.example", fleet.core(a).find_owner_request())
        assert info.value.code == "channel_identity"
        await t.close()

        t = CoapDeviceTransport(rendezvous_url=server.url, gateway_url=server.url,
                                edhoc_identity=key_a, edhoc_pins=pins)
        report = await _agent(a, t).run(telemetry=0)
        assert report.onboarded, report.error
        assert (await fleet.store.inventory.get(b.serial)).state.value == "expected"
    finally:
        await server.shutdown()


def test_claim_prefixes_match_the_contexts():
    from zerotouch.transport.coap.oscore_psk import server_context
    ctx = server_context(bytes(32), "0a000001", "gateway")
    assert ctx.authenticated_claims == [binding.PSK_CLAIM + "0a000001"]
    try:
        from zerotouch.transport.coap.edhoc import CLAIM_PREFIX
    except ImportError:
        return
    assert CLAIM_PREFIX == binding.EDHOC_CLAIM
