"""TTE §3.2 statuses: the OTP maps a device once and keeps answering status queries; and
messages 7/8: the owner asks the rendezvous, signed with its key, about its own devices only."""
from __future__ import annotations

import json
import time

import pytest

from zerotouch.protocol import cose
from zerotouch.protocol.errors import MalformedMessage, NotAuthorized, StaleMessage
from zerotouch.protocol.messages import RvRegistered
from zerotouch.services.gateway_inventory import STATUS_QUERY_TYPE, rendezvous_status_client
from zerotouch.services.vault import LocalVault, init_vault_dir

TTE = "/.well-known/tte"


async def _status_json(s, dev) -> dict:
    status, _h, body = await s.request("GET", f"{s.rv_url}{TTE}",
                                       params={"otp": dev.label.otp, "devid": dev.label.devid},
                                       headers={"Accept": "application/json"})
    assert status == 200, body
    return json.loads(body)


async def test_all_four_statuses_are_reachable_with_the_otp(sq_servers):
    s = sq_servers
    f = s.fleet
    fresh = await f.make(claim=False, inventory=False)
    mapped = await f.make(claim=True, inventory=True)
    registered = await f.make(claim=True, inventory=True)
    await f.onboard(f.core(registered))
    revoked = await f.make(claim=True, inventory=False)
    await f.rendezvous.revoke(revoked.serial)
    got = {name: (await _status_json(s, d))["status"] for name, d in
           (("fresh", fresh), ("mapped", mapped), ("registered", registered), ("revoked", revoked))}
    assert got == {"fresh": "not_mapped", "mapped": "mapped", "registered": "registered",
                   "revoked": "revoked"}
    body = await _status_json(s, mapped)
    assert body["urn"].endswith(mapped.serial) and len(body["fingerprint"]) == 64
    assert body["owner_fingerprint"] == f.owner_fp_hex


async def test_the_otp_maps_once_then_still_answers_status(sq_servers):
    s = sq_servers
    dev = await s.fleet.make(claim=False, inventory=False)
    claim = {"cip": "127.0.0.1", "cport": s.gw_port, "cfingerprint": s.fleet.owner_fp_hex}
    params = {"otp": dev.label.otp, "devid": dev.label.devid}
    first, _h, _b = await s.request("POST", f"{s.rv_url}{TTE}", params=params, json=claim)
    again, _h, body = await s.request("POST", f"{s.rv_url}{TTE}", params=params,
                                      json={**claim, "cip": "198.51.100.66"})
    assert (first, again) == (200, 409) and b"already used" in body
    st = await _status_json(s, dev)
    assert st["status"] == "mapped" and st["gateway_url"] == f"https://127.0.0.1:{s.gw_port}"


# --- messages 7/8: owner status queries ----------------------------------------------------
def _query(serials, *, t=None, kind=STATUS_QUERY_TYPE) -> bytes:
    return json.dumps({"type": kind, "time": int(t if t is not None else time.time()),
                       "serials": serials}).encode()


async def test_owner_sees_the_status_of_its_own_devices(fleet):
    mine = await fleet.make(claim=True, inventory=True)
    await fleet.onboard(fleet.core(mine))
    waiting = await fleet.make(claim=True, inventory=True)
    answer = await fleet.rendezvous.owner_statuses(
        await fleet.vault.sign(_query([mine.serial, waiting.serial])))
    assert {d["serial"]: d["status"] for d in answer["devices"]} == {
        mine.serial: "registered", waiting.serial: "mapped"}
    assert answer["unknown"] == []


async def test_another_owner_asking_for_my_devices_learns_nothing(fleet, tmp_path):
    """The attack: a second owner (any key can sign) asks about devices it does not own."""
    mine = await fleet.make(claim=True, inventory=True)
    unclaimed = await fleet.make(claim=False, inventory=False)
    init_vault_dir(tmp_path / "thief-vault")
    thief = LocalVault(tmp_path / "thief-vault", fleet.store.secrets, fleet.store.certs)
    answer = await fleet.rendezvous.owner_statuses(
        await thief.sign(_query([mine.serial, unclaimed.serial, "0badc0de"])))
    # mine, unmapped and non-existent serials all look the same to it
    assert answer == {"devices": [], "unknown": [mine.serial, unclaimed.serial, "0badc0de"]}


async def test_unsigned_stale_or_foreign_payloads_are_refused(fleet):
    dev = await fleet.make(claim=True, inventory=True)
    with pytest.raises(MalformedMessage):          # not COSE at all
        await fleet.rendezvous.owner_statuses(_query([dev.serial]))
    from zerotouch.pki.keys import generate_p256
    from zerotouch.protocol.cose import SoftwareSigner
    bare = cose.sign1(_query([dev.serial]), SoftwareSigner(generate_p256()))
    with pytest.raises(NotAuthorized):             # no certificate: whose key is it?
        await fleet.rendezvous.owner_statuses(bare)
    with pytest.raises(StaleMessage):              # a recorded query replayed an hour later
        await fleet.rendezvous.owner_statuses(await fleet.vault.sign(_query([dev.serial], t=time.time() - 3600)))
    # another owner-signed message (a registration report) is not a status query
    report = await fleet.vault.sign(RvRegistered(serial=dev.serial, time=int(time.time())).encode())
    with pytest.raises(MalformedMessage):
        await fleet.rendezvous.owner_statuses(report)
    with pytest.raises(MalformedMessage):
        await fleet.rendezvous.owner_statuses(await fleet.vault.sign(_query([dev.serial], kind="other")))
    with pytest.raises(MalformedMessage):
        await fleet.rendezvous.owner_statuses(await fleet.vault.sign(_query(["x" * 8] * 2)))


async def test_gateway_query_statuses_over_https_records_and_returns(sq_servers):
    s = sq_servers
    f = s.fleet
    f.gateway.query_rendezvous = rendezvous_status_client(s.rv_url, s.rv_ca_pem)
    waiting = await f.make(claim=True, inventory=True)          # mapped, never heard from
    not_claimed = await f.make(claim=False, inventory=False)
    await f.gateway.register_label(not_claimed.label.url, "in the box still")
    done = await f.make(claim=True, inventory=True)
    await f.onboard(f.core(done))
    rows = await f.gateway.query_statuses()
    got = {r["serial"]: r["rendezvous_status"] for r in rows}
    # onboarded devices are not asked about; an unclaimed device is not mapped to us: unknown
    assert got == {waiting.serial: "mapped", not_claimed.serial: "unknown"}
    inv = await f.store.inventory.get(waiting.serial)
    assert inv.last_error.startswith("rendezvous status: mapped")


async def test_status_endpoint_over_https_refuses_garbage(sq_servers):
    s = sq_servers
    status, _h, body = await s.post_cbor(f"{s.rv_url}/rv/v1/status", b"\xa0")
    assert 400 <= status < 500
