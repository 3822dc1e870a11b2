"""The gateway's EDHOC key travels in the signed redirect (claim field `cedhoc`, Redirect
key 7), and a device using EDHOC pins the gateway by it."""
from __future__ import annotations

import random

import pytest

pytest.importorskip("lakers")

from zerotouch.agent.backoff import Backoff  # noqa: E402
from zerotouch.agent.runtime import Agent  # noqa: E402
from zerotouch.pki.keys import load_private_key  # noqa: E402
from zerotouch.protocol.errors import MalformedMessage, NotAuthorized  # noqa: E402
from zerotouch.transport.coap.client import CoapDeviceTransport  # noqa: E402
from zerotouch.transport.coap.edhoc import AnyDeviceKey, EdhocIdentity  # noqa: E402
from zerotouch.transport.coap.server import start_coap_server  # noqa: E402

HOST = "127.0.0.1"


async def _claim(fleet, dev, port, cedhoc):
    return await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip=HOST,
                                        cport=port, cfingerprint=fleet.owner_fp_hex, cedhoc=cedhoc)


async def test_redirect_carries_the_claimed_gateway_edhoc_key(fleet):
    gw_id = EdhocIdentity.generate("gw")
    dev = await fleet.make(claim=False)
    await _claim(fleet, dev, 5683, gw_id.fingerprint.hex())
    core = fleet.core(dev)
    redirect = core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    assert redirect.gateway_edhoc_fp == gw_id.fingerprint
    # signed with the rest: the device verified it with the pinned rendezvous key
    other = await fleet.make(claim=True)   # claimed without cedhoc: no field at all
    core = fleet.core(other)
    assert core.receive_redirect(
        await fleet.rendezvous.find_owner(core.find_owner_request())).gateway_edhoc_fp is None


async def test_claim_refuses_a_malformed_cedhoc(fleet):
    dev = await fleet.make(claim=False)
    with pytest.raises(MalformedMessage, match="cedhoc"):
        await _claim(fleet, dev, 5683, "abc")
    assert (await fleet.rendezvous.repo.get(dev.serial)).status.value == "not_mapped"


def test_transport_without_a_pin_refuses_an_edhoc_gateway():
    t = CoapDeviceTransport(edhoc_identity=EdhocIdentity.generate("d"), edhoc_pins={})
    with pytest.raises(NotAuthorized, match="cedhoc"):
        t.pin_gateway("https://gw.example:8444", None)
    t.pin_gateway("https://gw.example:8444", bytes(32))
    assert t._edhoc_pins["coap://gw.example:8444"] == bytes(32)
    CoapDeviceTransport().pin_gateway("https://gw.example:8444", None)  # no EDHOC: nothing to pin


async def test_device_refuses_a_gateway_with_another_edhoc_key(fleet):
    rv_id, gw_id, impostor_id = (EdhocIdentity.generate(n) for n in ("rv", "gw", "impostor"))
    rv = await start_coap_server(fleet.rendezvous, None, bind=(HOST, 0), edhoc_identity=rv_id,
                                 edhoc_known=AnyDeviceKey())
    hellos = []
    real_hello = fleet.gateway.hello

    async def counting_hello(body):
        hellos.append(body)
        return await real_hello(body)
    fleet.gateway.hello = counting_hello
    # Someone else answers at the gateway's address, with the real gateway code but its own key.
    impostor = await start_coap_server(None, fleet.gateway, bind=(HOST, 0), edhoc_identity=impostor_id,
                                       edhoc_known=AnyDeviceKey())
    port = impostor.port
    dev = await fleet.make(claim=False)
    await _claim(fleet, dev, port, gw_id.fingerprint.hex())
    device_key = EdhocIdentity(load_private_key(dev.device_dir / "idevid.key"), dev.serial)

    def agent():
        t = CoapDeviceTransport(rendezvous_url=rv.url, edhoc_identity=device_key,
                                edhoc_pins={rv.url: rv_id.fingerprint})
        return Agent(dev.device_dir, transport=t, backoff=Backoff(rand=random.Random(1)),
                     max_attempts=1, operational=False), t
    try:
        a, t = agent()
        report = await a.run(telemetry=0)
        assert not report.onboarded
        assert "pinned" in report.error or "EdhocPinMismatch" in report.error or "fingerprint" in report.error, report.error
        assert hellos == []                                  # nothing reached the gateway core
        assert (await fleet.store.inventory.get(dev.serial)).state.value == "expected"
        await impostor.shutdown()

        # The real gateway, at the same address with the claimed key: onboarding completes.
        real = await start_coap_server(None, fleet.gateway, bind=(HOST, port), edhoc_identity=gw_id,
                                       edhoc_known=AnyDeviceKey())
        try:
            a, t = agent()
            report = await a.run(telemetry=0)
            assert report.onboarded, report.error
            assert len(hellos) == 1
        finally:
            await real.shutdown()
    finally:
        await rv.shutdown()
