"""Message 6, the controller notice, and the gateway's admission policy."""
from __future__ import annotations

import json

import pytest

from zerotouch.pki.ca import load_der_cert
from zerotouch.pki.keys import cert_fingerprint
from zerotouch.protocol.errors import NotAuthorized, TryLater
from zerotouch.services.gateway import GatewayService
from zerotouch.services.gateway_inventory import rendezvous_status_client

from http_harness import ADMIN_TOKEN, snapshot


async def _claimed(f):
    dev = await f.make(claim=True, inventory=False)
    rec = await f.store.rendezvous.get(dev.serial)
    return dev, cert_fingerprint(load_der_cert(rec.idevid_der)).hex()


def _notice(dev, fp, desc="BLD30/2/361 - Thermostat") -> dict:
    return {"urn": dev.urn, "fingerprint": fp, "otp": dev.label.otp, "devid": dev.label.devid,
            "description": desc}


async def test_forged_notice_without_the_admin_token_is_401_and_changes_nothing(sq_servers):
    """The attack: someone on the network tells the gateway to expect their device."""
    s = sq_servers
    dev, fp = await _claimed(s.fleet)
    before = await snapshot(s.store)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"}):
        status, _h, body = await s.request("POST", f"{s.gw_url}/zt/v1/notice", json=_notice(dev, fp),
                                           headers=headers)
        assert status == 401 and json.loads(body)["error"] == "unauthorized"
    assert await snapshot(s.store) == before


async def test_notice_registers_the_device_which_then_onboards(sq_servers):
    s = sq_servers
    dev, fp = await _claimed(s.fleet)
    status, _h, body = await s.request("POST", f"{s.gw_url}/zt/v1/notice", json=_notice(dev, fp),
                                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 201, body
    inv = await s.store.inventory.get(dev.serial)
    assert inv.description == "BLD30/2/361 - Thermostat" and inv.idevid_fp.hex() == fp
    await s.fleet.onboard(s.fleet.core(dev))
    assert (await s.store.inventory.get(dev.serial)).state.value == "onboarded"
    # the same notice again: 409, nothing overwritten
    status, _h, _b = await s.request("POST", f"{s.gw_url}/zt/v1/notice", json=_notice(dev, fp, "x"),
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 409


async def test_notice_as_label_url(sq_servers):
    s = sq_servers
    dev, _fp = await _claimed(s.fleet)
    status, _h, _b = await s.request("POST", f"{s.gw_url}/zt/v1/notice",
                                     json={"label_url": dev.label.url, "description": "lobby"},
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 201
    assert (await s.store.inventory.get(dev.serial)).description == "lobby"


@pytest.mark.parametrize("bad", [
    {"otp": "zz" * 8}, {"devid": "123"}, {"fingerprint": "00" * 31}, {"urn": "urn:dev:zerotouch:ffffffff"},
    {"description": "d" * 257},
])
async def test_malformed_notices_are_400(sq_servers, bad):
    s = sq_servers
    dev, fp = await _claimed(s.fleet)
    status, _h, body = await s.request("POST", f"{s.gw_url}/zt/v1/notice", json={**_notice(dev, fp), **bad},
                                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 400, body
    assert await s.store.inventory.get(dev.serial) is None


async def test_device_with_another_certificate_than_noticed_is_refused(fleet):
    """The attack: a device id reused on another (cloned) certificate after the notice."""
    dev, _fp = await _claimed(fleet)
    await fleet.gateway.notice(_notice(dev, "ab" * 32))
    core = fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    with pytest.raises(NotAuthorized, match="introducer reported"):
        await fleet.gateway.hello(core.hello_request())


def _gateway(fleet, admission: str) -> GatewayService:
    import dataclasses
    cfg = dataclasses.replace(fleet.gateway.cfg, admission=admission)
    return GatewayService(fleet.store, fleet.vault, cfg, notify_rendezvous=fleet.rendezvous.registered,
                          query_rendezvous=fleet.rendezvous.owner_statuses)


async def test_admission_introduced_refuses_devices_not_in_the_inventory(fleet):
    gw = _gateway(fleet, "introduced")
    dev = await fleet.make(claim=True, inventory=False)
    core = fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    with pytest.raises(NotAuthorized) as exc:
        await gw.hello(core.hello_request())
    assert exc.value.code == "not_in_inventory"


async def test_admission_any_holds_a_device_mapped_to_us_until_its_otp_arrives(fleet):
    gw = _gateway(fleet, "any")
    dev = await fleet.make(claim=True, inventory=False)
    core = fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    with pytest.raises(TryLater) as exc:
        await gw.hello(core.hello_request())
    assert exc.value.retry_after == 60
    # once the notice brings the OTP the same device onboards
    await gw.notice({"label_url": dev.label.url, "description": "late notice"})
    fleet.gateway = gw
    await fleet.onboard(fleet.core(dev))
    assert (await fleet.store.inventory.get(dev.serial)).state.value == "onboarded"


async def test_admission_any_still_refuses_devices_mapped_to_another_owner(fleet, tmp_path):
    gw = _gateway(fleet, "any")
    dev = await fleet.make(claim=False, inventory=False)
    await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip="127.0.0.1",
                                 cport=8444, cfingerprint="ab" * 32)
    core = fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    with pytest.raises(NotAuthorized):
        await gw.hello(core.hello_request())


def test_unknown_admission_policy_is_refused(fleet):
    with pytest.raises(ValueError):
        _gateway(fleet, "everyone")


async def test_query_client_reports_refusals(sq_servers):
    from zerotouch.protocol.errors import ProtocolError
    q = rendezvous_status_client(sq_servers.rv_url, sq_servers.rv_ca_pem)
    with pytest.raises(ProtocolError, match="refused"):
        await q(b"not cose")
