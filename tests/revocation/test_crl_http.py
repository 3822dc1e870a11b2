"""GET /crl and /crl.pem on a real socket; openssl parses what we serve; the terminus-side
fetcher over HTTPS; `gateway revoke` on a real gateway directory."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import time

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from zerotouch.pki.keys import cert_pem, generate_p256, save_cert, save_private_key
from zerotouch.services.revocation import RevocationService
from zerotouch.services.terminus_crl import CrlWatcher, url_source
from zerotouch.transport.http.common import server_ssl_context
from zerotouch.transport.http.crl_app import CRL_DER, CRL_PEM, add_crl_routes
from zerotouch.transport.http.server import start_site

from revocation_harness import make_csr, onboard, owner_ca
from support import need


@pytest.fixture
async def served(fleet):
    """(fleet, service, base URL, A revoked, B not) with the CRL routes on plain HTTP."""
    a, b = await onboard(fleet), await onboard(fleet)
    svc = RevocationService(fleet.store, fleet.vault)
    await svc.revoke_device(a.serial, "keyCompromise")
    app = web.Application()
    add_crl_routes(app, svc)
    runner = await start_site(app, "127.0.0.1", 0, None)
    try:
        yield fleet, svc, f"http://127.0.0.1:{runner.addresses[0][1]}", a, b
    finally:
        await runner.cleanup()


async def test_crl_is_served_as_der_with_a_short_cache_lifetime(served, tmp_path):
    fleet, _, base, a, b = served
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/crl") as resp:
            assert resp.status == 200 and resp.content_type == CRL_DER
            body, headers = await resp.read(), resp.headers
        async with s.get(f"{base}/crl", headers={"If-None-Match": headers["ETag"]}) as resp:
            assert resp.status == 304  # a poller that already has it downloads nothing
        async with s.head(f"{base}/crl") as resp:
            assert resp.status == 200 and resp.content_type == CRL_DER
        async with s.get(f"{base}/crl.pem") as resp:
            assert resp.status == 200 and resp.content_type == CRL_PEM
            pem = await resp.read()
    crl = x509.load_der_x509_crl(body)
    assert crl.is_signature_valid(owner_ca(fleet).cert.public_key())
    assert [r.serial_number for r in crl] == [a.ldevid.serial_number]
    assert x509.load_pem_x509_crl(pem).public_bytes(Encoding.DER) == body
    max_age = int(headers["Cache-Control"].split("max-age=")[1])
    left = crl.next_update_utc.timestamp() - time.time()
    assert 0 < max_age <= left / 10  # well before nextUpdate, a cache refetches

    if shutil.which("openssl") is None:
        need("openssl", "apt-get install openssl")
    (tmp_path / "crl.der").write_bytes(body)
    out = subprocess.run(["openssl", "crl", "-inform", "DER", "-noout", "-text",
                          "-in", str(tmp_path / "crl.der")], capture_output=True, text=True,
                         check=True).stdout
    assert "Certificate Revocation List (CRL)" in out
    assert format(a.ldevid.serial_number, "X") in out.replace(":", "").upper()
    assert format(b.ldevid.serial_number, "X") not in out.replace(":", "").upper()


async def test_terminus_fetches_the_crl_over_https(fleet, tmp_path):
    a = await onboard(fleet)
    svc = RevocationService(fleet.store, fleet.vault)
    ca = owner_ca(fleet)
    key = generate_p256()  # the gateway's TLS certificate comes from the owner CA
    save_private_key(tmp_path / "tls.key", key)
    save_cert(tmp_path / "tls.pem", ca.issue_server(key.public_key(), common_name="127.0.0.1",
                                                    hosts=["127.0.0.1"]))
    app = web.Application()
    add_crl_routes(app, svc)
    runner = await start_site(app, "127.0.0.1", 0, server_ssl_context(tmp_path / "tls.pem",
                                                                       tmp_path / "tls.key"))
    try:
        url = f"https://127.0.0.1:{runner.addresses[0][1]}/crl"
        watcher = CrlWatcher(tmp_path / "t" / "crl.pem", url_source(url, cert_pem(ca.cert)),
                             ca_cert=ca.cert)
        await watcher.prime()
        assert list(x509.load_pem_x509_crl((tmp_path / "t" / "crl.pem").read_bytes())) == []
        await svc.revoke_device(a.serial)
        assert await watcher.check() == "written"  # no broker here: only the file
        crl = x509.load_pem_x509_crl((tmp_path / "t" / "crl.pem").read_bytes())
        assert [r.serial_number for r in crl] == [a.ldevid.serial_number]
        assert await watcher.check() == "unchanged"
    finally:
        await runner.cleanup()


# --- `zerotouch gateway revoke` ----------------------------------------------------------------
def _cli(argv):
    from zerotouch.cli.revoke import add_revoke_parser
    p = argparse.ArgumentParser(prog="zerotouch gateway")
    sub = p.add_subparsers(dest="action", required=True)
    add_revoke_parser(sub)
    p.set_defaults(func=lambda _a: 99)  # like main.py's `gateway` parser: must be overridden
    args = p.parse_args(argv)
    return args.func(args)


def test_gateway_revoke_command(tmp_path, capsys):
    import asyncio

    from zerotouch.pki.ca import CertificateAuthority, make_root
    from zerotouch.services.roles import build_gateway, init_gateway
    from zerotouch.storage.base import InventoryRecord

    mkey = generate_p256()
    save_cert(tmp_path / "mca.pem", CertificateAuthority(mkey, make_root(mkey, "m")).cert)
    gw_dir = tmp_path / "gw"
    init_gateway(gw_dir, host="127.0.0.1", port=1, manufacturer_cas=[str(tmp_path / "mca.pem")])

    async def setup():
        gw = await build_gateway(gw_dir)
        try:
            await gw.store.inventory.add(InventoryRecord(serial="SN-1", created_at=time.time()))
            der = await gw.service.vault.issue_ldevid(make_csr("SN-1"), "SN-1", "urn:dev:zerotouch:SN-1", 1)
            return x509.load_der_x509_certificate(der).serial_number
        finally:
            await gw.close()
    serial = asyncio.run(setup())

    assert _cli(["revoke", "--dir", str(gw_dir), "--device", "SN-1"]) == 0
    out = capsys.readouterr().out
    assert "device SN-1: revoked (cessationOfOperation)" in out and "CRL lists 1" in out
    crl = x509.load_pem_x509_crl((gw_dir / "crl.pem").read_bytes())
    assert [r.serial_number for r in crl] == [serial]

    assert _cli(["revoke", "--dir", str(gw_dir), "--cert", format(serial, "X")]) == 0
    assert "already revoked, nothing changed" in capsys.readouterr().out
    assert _cli(["revoke", "--dir", str(gw_dir), "--device", "SN-404"]) == 1
    assert "not in the inventory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        _cli(["revoke", "--dir", str(gw_dir), "--device", "SN-1", "--reason", "stolen"])
    assert info.value.code == 2
    assert "invalid choice: 'stolen'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["revoke", "--dir", str(gw_dir), "--device", "SN-1", "--cert", "ab"])
