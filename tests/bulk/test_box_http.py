"""POST /.well-known/tte/box on a real rendezvous app over TLS (JSON and HTML form), and the
introducer's box claim that also fills the owner's inventory."""
from __future__ import annotations

import json

import pytest

from zerotouch.introducer.claim import Owner
from zerotouch.protocol.states import RendezvousStatus
from zerotouch.services.bulk import BOX_PATH, BoxLabel, claim_box_remote, make_box
from zerotouch.transport.http.common import server_ssl_context
from zerotouch.transport.http.rendezvous_app import rendezvous_app

from http_harness import ADMIN_TOKEN, _serve, start_servers


@pytest.fixture
async def box_servers(tmp_path, sqlite_url):
    """The harness' servers plus a second rendezvous app (it serves the box route) on the same
    service, behind the same rendezvous TLS certificate."""
    s = await start_servers(tmp_path, sqlite_url)
    app = rendezvous_app(s.fleet.rendezvous, public_info={"url": "test"})
    tls = tmp_path / "tls"
    runner, port = await _serve(app, server_ssl_context(tls / "rendezvous.pem", tls / "rendezvous.key"))
    s.runners.append(runner)
    s.box_url = f"https://127.0.0.1:{port}"
    yield s
    await s.close()


async def _made_box(s, n=4):
    f = s.fleet
    made = make_box(f.manufacturer, f.tmp / "factory", f.info, n)
    for dev in made.devices:
        await f.rendezvous.register(dev.registration)
    return made


def _fields(s, box: BoxLabel, **over) -> dict:
    d = {"master": box.master, "first": box.first, "last": box.last, "cip": "127.0.0.1",
         "cport": s.gw_port, "cfingerprint": s.fleet.owner_fp_hex}
    d.update(over)
    return d


async def test_box_claim_json(box_servers):
    s = box_servers
    made = await _made_box(s)
    status, _h, body = await s.request("POST", s.box_url + BOX_PATH, json=_fields(s, made.label))
    assert status == 200, body
    data = json.loads(body)
    assert data["claimed"] == 4 and data["failed"] == 0
    assert [d["devid"] for d in data["devices"]] == made.label.devids()
    assert {d["urn"] for d in data["devices"]} == {d.urn for d in made.devices}
    for devid in made.label.devids():
        assert (await s.store.rendezvous.get(devid)).status is RendezvousStatus.MAPPED
    # again: every device reports 409, still a 200 with per-device results
    status, _h, body = await s.request("POST", s.box_url + BOX_PATH, json=_fields(s, made.label))
    assert status == 200 and json.loads(body)["conflicts"] == 4


async def test_box_claim_form(box_servers):
    s = box_servers
    made = await _made_box(s, 2)
    form = {k: str(v) for k, v in _fields(s, made.label).items()}
    status, _h, body = await s.request("POST", s.box_url + BOX_PATH, data=form)
    assert status == 200, body
    assert json.loads(body)["claimed"] == 2


@pytest.mark.parametrize("over, code, status", [
    ({"master": "00" * 16}, "forbidden", 403),
    ({"last": "ffffffff", "first": "fffff000"}, "not_found", 404),
    ({"first": "00000002", "last": "00000001"}, "malformed", 400),
    ({"first": "00000001", "last": "00002711"}, "malformed", 400),
    ({"master": "xyz"}, "malformed", 400),
    ({"cfingerprint": "12"}, "malformed", 400),
    ({"master": 5}, "malformed", 400),
])
async def test_box_claim_refusals_are_clear_and_claim_nothing(box_servers, over, code, status):
    s = box_servers
    made = await _made_box(s, 2)
    got, _h, body = await s.request("POST", s.box_url + BOX_PATH, json=_fields(s, made.label, **over))
    data = json.loads(body)
    assert got == status and data["error"] == code and len(data["message"]) > 10, data
    for devid in made.label.devids():
        assert (await s.store.rendezvous.get(devid)).status is RendezvousStatus.NOT_MAPPED


async def test_box_claim_body_is_bounded(box_servers):
    s = box_servers
    made = await _made_box(s, 1)
    big = _fields(s, made.label, pad="x" * 5000)
    status, _h, body = await s.request("POST", s.box_url + BOX_PATH, json=big)
    assert status == 400 and b"too large" in body
    status, _h, body = await s.request("POST", s.box_url + BOX_PATH, data=b"x",
                                       headers={"Content-Type": "text/plain"})
    assert status == 415


async def test_introducer_claims_box_and_fills_inventory(box_servers):
    s = box_servers
    made = await _made_box(s, 3)
    box = BoxLabel(s.box_url, made.label.master, made.label.first, made.label.last)
    owner = Owner(address="127.0.0.1", port=s.gw_port, fingerprint=s.fleet.owner_fp_hex,
                  gateway_url=s.gw_url, admin_token=ADMIN_TOKEN, gateway_ca_pem=s.gw_ca_pem)
    result = await claim_box_remote(box.url, owner, rendezvous_ca_pem=s.rv_ca_pem)
    assert result["claim"]["claimed"] == 3 and result["inventory"]["added"] == 3
    inv = {r.serial: r for r in await s.store.inventory.list()}
    assert set(made.label.devids()) <= set(inv)
    assert all(inv[d].description == f"box {box.first}-{box.last}" for d in made.label.devids())
    # the devices then onboard against the real gateway's store (in memory here)
    for dev in made.devices:
        await s.fleet.onboard(s.fleet.core(dev))
        assert (await s.store.rendezvous.get(dev.serial)).status is RendezvousStatus.REGISTERED
