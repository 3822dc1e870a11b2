"""Datagrams on the wire for one whole onboarding over CoAP/UDP with EDHOC + OSCORE (the
handshakes, OSCORE overhead, block-wise and Echo included), next to plain CoAP's figures
printed by test_coap_onboarding.py."""
from __future__ import annotations

import random

import pytest

pytest.importorskip("lakers")

from zerotouch.agent.backoff import Backoff  # noqa: E402
from zerotouch.agent.runtime import Agent  # noqa: E402
from zerotouch.pki.keys import load_private_key  # noqa: E402
from zerotouch.transport.coap.client import CoapDeviceTransport  # noqa: E402
from zerotouch.transport.coap.edhoc import AnyDeviceKey, EdhocIdentity  # noqa: E402
from zerotouch.transport.coap.server import start_coap_server  # noqa: E402

from coap_harness import HOST, UdpRelay  # noqa: E402

IPV6_MIN_MTU_PAYLOAD = 1232


async def test_edhoc_onboarding_datagrams(fleet, capsys):
    server_id = EdhocIdentity.generate("owner")
    server = await start_coap_server(fleet.rendezvous, fleet.gateway, bind=(HOST, 0),
                                     edhoc_identity=server_id, edhoc_known=AnyDeviceKey())
    relay = await UdpRelay((HOST, server.port)).start()
    try:
        dev = await fleet.make(claim=False)
        await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip=HOST,
                                     cport=relay.port, cfingerprint=fleet.owner_fp_hex,
                                     cedhoc=server_id.fingerprint.hex())
        key = EdhocIdentity(load_private_key(dev.device_dir / "idevid.key"), dev.serial)
        t = CoapDeviceTransport(rendezvous_url=relay.url, edhoc_identity=key,
                                edhoc_pins={relay.url: server_id.fingerprint})
        report = await Agent(dev.device_dir, transport=t, backoff=Backoff(rand=random.Random(1)),
                             max_attempts=1, operational=False).run(telemetry=0)
        assert report.onboarded, report.error
        assert relay.up.largest <= IPV6_MIN_MTU_PAYLOAD and relay.down.largest <= IPV6_MIN_MTU_PAYLOAD
        assert relay.up.bytes < 4096 + 1024  # the handshake costs a few hundred bytes, not KBs
        with capsys.disabled():
            print(f"\n[coap/udp edhoc+oscore onboarding] datagrams: up {relay.up.datagrams} / "
                  f"{relay.up.bytes} B (largest {relay.up.largest} B), down {relay.down.datagrams} / "
                  f"{relay.down.bytes} B (largest {relay.down.largest} B); payload {t.bytes_sent} / "
                  f"{t.bytes_received} B")
    finally:
        relay.close()
        await server.shutdown()
