"""Boxes and PSK mode: `box make` gives every device its derived `psk.secret`, `box claim
--gateway-dir` sends the gateway's EDHOC fingerprint (cedhoc) and adds the claimed devices' PSKs
to the gateway's `psk.json`, which a running gateway follows without a restart."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os

import pytest

from zerotouch.cli.box import add_box_parser
from zerotouch.services.bulk import derive_psk, make_box
from zerotouch.transport.coap.security import (PskFileError, add_device_psks, edhoc_fingerprint,
                                               load_psk_store)

from http_harness import ADMIN_TOKEN, HOST, start_servers

MASTER = bytes(range(16))


def _cli(argv) -> tuple[int, str, str]:
    p = argparse.ArgumentParser(prog="zerotouch")
    add_box_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = args.func(args)
    return rc, out.getvalue(), err.getvalue()


def test_add_device_psks_merges_atomically_and_privately(tmp_path):
    psks = {"0a000001": bytes([1]) * 32, "0a000002": bytes([2]) * 32}
    assert add_device_psks(tmp_path, psks) == 2
    assert add_device_psks(tmp_path, psks) == 0                  # nothing new: not rewritten
    assert add_device_psks(tmp_path, {"0A000003": bytes([3]) * 32}) == 1
    path = tmp_path / "psk.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert json.loads(path.read_text())["devices"] == {
        "0a000001": "01" * 32, "0a000002": "02" * 32, "0a000003": "03" * 32}
    with pytest.raises(PskFileError):
        add_device_psks(tmp_path, {"xyz": bytes(32)})
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_gateway_follows_psk_json_and_never_logs_a_key(tmp_path, caplog):
    pytest.importorskip("aiocoap.oscore_sitewrapper")
    store = load_psk_store(tmp_path)             # no psk.json yet: no devices
    assert store._lookup("0a000001") is None
    add_device_psks(tmp_path, {"0a000001": bytes([7]) * 32})
    assert store._lookup("0a000001") == bytes([7]) * 32          # picked up at the next lookup
    loads = store.psk_file.loads
    assert store._lookup("0a000001") and store.psk_file.loads == loads   # unchanged: not re-read
    # a broken file (a bad hand edit): reported, naming no key; the PSKs loaded before stay
    secret = "ee" * 31 + "e"
    (tmp_path / "psk.json").write_text(json.dumps({"devices": {"0a000002": secret}}))
    with caplog.at_level(logging.WARNING, logger="zerotouch.coap"):
        assert store._lookup("0a000001") == bytes([7]) * 32
    assert "not usable" in caplog.text and secret not in caplog.text
    # SIGHUP's reload reads the file unconditionally
    (tmp_path / "psk.json").write_text(json.dumps({"devices": {"0a000002": "ab" * 32}}))
    store.psk_file.reload()
    assert store._lookup("0a000002") == bytes.fromhex("ab" * 32) and store._lookup("0a000001") is None


def test_box_make_writes_each_devices_psk(tmp_path):
    from zerotouch.pki.keys import generate_p256, public_key_pem
    from zerotouch.services.manufacturer import Manufacturer, RendezvousInfo
    info = RendezvousInfo(url="https://rv.example:8443",
                          key_pem=public_key_pem(generate_p256().public_key()).decode(), tls_ca_pem="")
    made = make_box(Manufacturer(tmp_path / "f"), tmp_path / "f", info, 3, master=MASTER)
    for dev in made.devices:
        f = dev.device_dir / "psk.secret"
        assert f.read_text() == derive_psk(MASTER, dev.serial).hex()
        assert oct(f.stat().st_mode & 0o777) == "0o600"


async def test_box_device_onboards_over_oscore_psk_after_box_claim_without_gateway_restart(
        tmp_path, sqlite_url):
    pytest.importorskip("aiocoap.oscore_sitewrapper")
    from zerotouch.agent.runtime import Agent
    from zerotouch.services.manufacturer import read_factory
    from zerotouch.transport.coap.security import device_coap_transport, start_role_coap_server
    from zerotouch.transport.coap.server import start_coap_server

    s = await start_servers(tmp_path, sqlite_url)
    f = s.fleet
    gw_dir = tmp_path / "gateway"
    # The gateway's CoAP side runs in oscore-psk mode from before the box exists: no psk.json.
    gw_coap = await start_role_coap_server(gw_dir, HOST, 0, gateway=f.gateway, security="oscore-psk")
    rv_coap = await start_coap_server(f.rendezvous, None, bind=(HOST, 0))   # the plain leg
    try:
        assert not (gw_dir / "psk.json").exists()
        cedhoc = edhoc_fingerprint(gw_dir)
        # what `gateway init` leaves for the introducer: address (the CoAP port here), owner
        # fingerprint, EDHOC fingerprint, admin URL and token, owner CA
        (gw_dir / "config.json").write_text(json.dumps({
            "host": HOST, "port": gw_coap.port, "owner_fingerprint": f.owner_fp_hex,
            "url": s.gw_url, "edhoc_fingerprint": cedhoc}))
        (gw_dir / "admin.token").write_text(ADMIN_TOKEN)
        (gw_dir / "vault").mkdir()
        (gw_dir / "vault" / "owner-ca.pem").write_text(s.gw_ca_pem)
        rv_ca = tmp_path / "rv-ca.pem"
        rv_ca.write_text(s.rv_ca_pem)

        made = make_box(f.manufacturer, tmp_path / "factory", dataclasses.replace(f.info, url=s.rv_url), 3)
        for dev in made.devices:
            await f.rendezvous.register(dev.registration)
        dev = made.devices[1]
        assert gw_coap.psk_file.psk_for(dev.serial) is None

        rc, out, err = await asyncio.to_thread(
            _cli, ["box", "claim", made.label.url, "--gateway-dir", str(gw_dir),
                   "--rendezvous-ca", str(rv_ca)])
        assert rc == 0, err
        assert "3 device PSK(s) added" in err
        psks = {d.serial: derive_psk(made.label.master_bytes, d.serial) for d in made.devices}
        for psk in psks.values():     # no key in anything the command printed
            assert psk.hex() not in out + err
        psk_json = gw_dir / "psk.json"
        assert oct(psk_json.stat().st_mode & 0o777) == "0o600"
        assert json.loads(psk_json.read_text())["devices"] == {k: v.hex() for k, v in psks.items()}
        assert made.label.master not in psk_json.read_text()   # only the claimed devices' keys
        for d in made.devices:   # cedhoc went with the box claim: every redirect carries it
            rec = await f.store.rendezvous.get(d.serial)
            assert rec.gateway_edhoc_fp == bytes.fromhex(cedhoc)

        # The same gateway process, never restarted: the box device onboards over OSCORE-PSK.
        factory = read_factory(dev.device_dir)
        factory["rendezvous_url"] = f"https://{HOST}:{rv_coap.port}"   # https:// maps to coap://
        transport = device_coap_transport(factory, security="oscore-psk", device_dir=dev.device_dir)
        agent = Agent(dev.device_dir, transport=transport, max_attempts=1, operational=False)
        agent.factory["rendezvous_url"] = factory["rendezvous_url"]
        report = await agent.run(telemetry=0)
        assert report.onboarded and not report.error, report
        assert gw_coap.psk_file.loads == 1
        assert (gw_dir / "oscore-seq.json").exists() is False   # device state stays in its dir
        assert (dev.device_dir / "oscore-seq.json").exists()
    finally:
        await gw_coap.shutdown()
        await rv_coap.shutdown()
        await s.close()


async def test_box_claim_with_a_malformed_cedhoc_claims_nothing(fleet):
    from zerotouch.protocol.errors import MalformedMessage
    from zerotouch.services.bulk import claim_box
    made = make_box(fleet.manufacturer, fleet.tmp / "factory", fleet.info, 2)
    for dev in made.devices:
        await fleet.rendezvous.register(dev.registration)
    with pytest.raises(MalformedMessage, match="cedhoc"):
        await claim_box(fleet.rendezvous, made.label, HOST, 8444, fleet.owner_fp_hex, cedhoc="abc")
    for dev in made.devices:
        assert (await fleet.store.rendezvous.get(dev.serial)).status.value == "not_mapped"
    good = "cd" * 32
    result = await claim_box(fleet.rendezvous, made.label, HOST, 8444, fleet.owner_fp_hex, cedhoc=good)
    assert len(result.claimed) == 2
    assert (await fleet.store.rendezvous.get(made.devices[0].serial)).gateway_edhoc_fp == bytes.fromhex(good)


async def test_gateway_serve_rereads_psk_json_on_sighup(fleet, tmp_path):
    pytest.importorskip("aiocoap.oscore_sitewrapper")
    import signal
    from zerotouch.services.servers import coap_alongside
    add_device_psks(tmp_path, {"0a000001": bytes([1]) * 32})
    async with coap_alongside(HOST, 0, gateway=fleet.gateway, directory=tmp_path,
                              security="oscore-psk") as server:
        loads = server.psk_file.loads
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if server.psk_file.loads > loads:
                break
            await asyncio.sleep(0.01)
        assert server.psk_file.loads == loads + 1
