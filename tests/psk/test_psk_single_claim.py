"""Single PSK-profile devices claimed over real HTTPS (TLS): `introducer claim --device-psk`
derives K_rv locally and sends only it as `cpsk`; the phone page takes K_rv in an optional
field. A wrong key is refused with a clear message and nothing is stored; no key is echoed
in a page, an answer, the command's output or the logs."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging

import pytest

from zerotouch.identity.psk import PskIdentity
from zerotouch.introducer.claim import ClaimRefused, Owner, claim_device, read_device_psk
from zerotouch.protocol.errors import MalformedMessage
from zerotouch.protocol.psk import rendezvous_key

from http_harness import ADMIN_TOKEN, HOST, snapshot, start_servers
from psk_support import PskFleet

TTE = "/.well-known/tte"
BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


@pytest.fixture
async def s(tmp_path, sqlite_url):
    servers = await start_servers(tmp_path, sqlite_url)
    servers.pskf = PskFleet(servers.fleet)
    yield servers
    await servers.close()


def _owner(s) -> Owner:
    return Owner(address=HOST, port=s.gw_port, fingerprint=s.fleet.owner_fp_hex)


class _Recorder:
    """Wraps the rendezvous' claim to see what reached it."""

    def __init__(self, rv):
        self.rv, self.calls, self._claim = rv, [], rv.claim

        async def claim(**kw):
            self.calls.append(kw)
            return await self._claim(**kw)
        rv.claim = claim


async def _psk_device(s):
    dev = await s.pskf.make(claim=False, inventory=False, gateway_psk=False)
    return dev, PskIdentity(dev.device_dir).psk()


async def test_introducer_claim_with_the_device_psk_sends_only_k_rv(s):
    dev, psk = await _psk_device(s)
    rec = _Recorder(s.fleet.rendezvous)
    result = await claim_device(dev.label.url.replace("https://127.0.0.1:8443", s.rv_url),
                                _owner(s), rendezvous_ca_pem=s.rv_ca_pem,
                                device_psk=read_device_psk(str(dev.device_dir / "psk.secret")))
    assert result["devid"] == dev.serial and result["claim"]["status"] == "mapped"
    k_rv = rendezvous_key(psk, dev.serial)
    assert rec.calls[0]["cpsk"] == k_rv.hex() and psk.hex() not in json.dumps(rec.calls[0])
    assert await s.fleet.rendezvous.psk_keys.key(dev.serial) == k_rv   # kept (encrypted) for the redirect
    assert psk.hex() not in json.dumps(result) and k_rv.hex() not in json.dumps(result)


async def test_a_wrong_device_psk_is_refused_clearly_and_nothing_is_stored(s, caplog):
    dev, psk = await _psk_device(s)
    other = bytes(b ^ 0x5A for b in psk)
    url = dev.label.url.replace("https://127.0.0.1:8443", s.rv_url)
    before = await snapshot(s.store)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ClaimRefused) as exc:
            await claim_device(url, _owner(s), rendezvous_ca_pem=s.rv_ca_pem, device_psk=other)
    assert exc.value.status == 403
    assert "cpsk is not this device's rendezvous key" in exc.value.message
    assert "the PSK given with --device-psk is not this device's" in exc.value.message
    assert await snapshot(s.store) == before
    assert await s.fleet.rendezvous.psk_keys.key(dev.serial) is None
    for key in (other, rendezvous_key(other, dev.serial)):
        assert key.hex() not in exc.value.message and key.hex() not in caplog.text
    # no key at all: the rendezvous says what the claim needs and how to get it
    with pytest.raises(ClaimRefused, match="needs cpsk.*--device-psk"):
        await claim_device(url, _owner(s), rendezvous_ca_pem=s.rv_ca_pem)
    assert await snapshot(s.store) == before
    # the right one still claims
    await claim_device(url, _owner(s), rendezvous_ca_pem=s.rv_ca_pem, device_psk=psk)
    assert (await s.store.rendezvous.get(dev.serial)).status.value == "mapped"


def test_read_device_psk_takes_a_file_or_hex_and_never_repeats_it(tmp_path):
    key = bytes(range(32))
    f = tmp_path / "psk.secret"
    f.write_text(key.hex() + "\n")
    assert read_device_psk(str(f)) == key and read_device_psk(key.hex().upper()) == key
    bad = tmp_path / "bad.secret"
    bad.write_text("zz" + key.hex()[2:])
    for value in (str(bad), "not-a-file-and-not-hex", "ab" * 8 + "q"):
        with pytest.raises(MalformedMessage) as exc:
            read_device_psk(value)
        assert key.hex()[2:] not in exc.value.message


async def test_phone_page_takes_k_rv_and_never_echoes_it(s, caplog):
    dev, psk = await _psk_device(s)
    k_rv = rendezvous_key(psk, dev.serial).hex()
    _st, _h, body = await s.request("GET", f"{s.rv_url}{TTE}", headers=BROWSER,
                                    params={"otp": dev.label.otp, "devid": dev.label.devid})
    page = body.decode()
    assert 'name="cpsk" type="password"' in page and 'autocomplete="off"' in page
    form = {"otp": dev.label.otp, "devid": dev.label.devid, "page": "1", "cip": HOST,
            "cport": str(s.gw_port), "cfingerprint": s.fleet.owner_fp_hex}
    before = await snapshot(s.store)
    wrong = "cd" * 32
    with caplog.at_level(logging.DEBUG):
        # malformed, wrong, missing: each an HTML page naming the problem, the store untouched
        for cpsk, status, text in (("12" * 31, 400, "cpsk (the device&#x27;s rendezvous key K_rv) "
                                                    "must be 64 hex digits"),
                                   (wrong, 403, "cpsk is not this device&#x27;s rendezvous key"),
                                   ("", 400, "this is a PSK device: the claim needs cpsk")):
            st, headers, body = await s.request("POST", f"{s.rv_url}{TTE}",
                                                data={**form, "cpsk": cpsk})
            page = body.decode()
            assert st == status and headers["Content-Type"].startswith("text/html"), page
            assert text in page, page
            assert cpsk == "" or cpsk not in page
            assert await snapshot(s.store) == before
        st, _h, body = await s.request("POST", f"{s.rv_url}{TTE}", data={**form, "cpsk": k_rv.upper()})
    assert st == 200 and "Device claimed" in body.decode()
    assert k_rv not in body.decode().lower()
    for key in (k_rv, wrong, psk.hex()):
        assert key not in caplog.text.lower()
    assert await s.fleet.rendezvous.psk_keys.key(dev.serial) == bytes.fromhex(k_rv)


def _cli(argv) -> tuple[int, str, str]:
    from zerotouch.cli.main import build_parser
    args = build_parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = args.func(args)
    return rc, out.getvalue(), err.getvalue()


async def test_cli_claim_with_device_psk_adds_it_to_the_gateways_psk_json(s, tmp_path):
    dev, psk = await _psk_device(s)
    gw_dir = tmp_path / "gw"
    (gw_dir / "vault").mkdir(parents=True)
    (gw_dir / "config.json").write_text(json.dumps({
        "host": HOST, "port": s.gw_port, "owner_fingerprint": s.fleet.owner_fp_hex, "url": s.gw_url}))
    (gw_dir / "admin.token").write_text(ADMIN_TOKEN)
    (gw_dir / "vault" / "owner-ca.pem").write_text(s.gw_ca_pem)
    rv_ca = tmp_path / "rv-ca.pem"
    rv_ca.write_text(s.rv_ca_pem)
    url = dev.label.url.replace("https://127.0.0.1:8443", s.rv_url)
    # a wrong PSK: exit 1, the clear message, nothing in psk.json
    wrong = tmp_path / "wrong.secret"
    wrong.write_text(bytes(32).hex())
    rc, out, err = await asyncio.to_thread(
        _cli, ["introducer", "claim", url, "--gateway-dir", str(gw_dir), "--rendezvous-ca", str(rv_ca),
               "--device-psk", str(wrong)])
    assert rc == 1 and "not this device's" in err and not (gw_dir / "psk.json").exists()
    rc, out, err = await asyncio.to_thread(
        _cli, ["introducer", "claim", url, "--gateway-dir", str(gw_dir), "--rendezvous-ca", str(rv_ca),
               "--device-psk", str(dev.device_dir / "psk.secret"), "--description", "psk sensor"])
    assert rc == 0, err
    assert "1 device PSK(s) added" in err
    psk_json = gw_dir / "psk.json"
    assert oct(psk_json.stat().st_mode & 0o777) == "0o600"
    assert json.loads(psk_json.read_text())["devices"] == {dev.serial: psk.hex()}
    for key in (psk.hex(), rendezvous_key(psk, dev.serial).hex()):
        assert key not in out + err
    assert (await s.store.inventory.get(dev.serial)).description == "psk sensor"
