"""EST as `gateway serve` runs it (config.json "est", the CERT_OPTIONAL TLS context), and the
`gateway est list|approve|reject` commands."""
from __future__ import annotations

import argparse
import asyncio
import ssl
from pathlib import Path

import aiohttp

from zerotouch.cli.est import add_est_parser
from zerotouch.pki.keys import generate_p256, public_key_pem
from zerotouch.protocol import est as codec
from zerotouch.services import roles, servers
from zerotouch.services.est import est_admin
from zerotouch.services.manufacturer import Manufacturer, RendezvousInfo
from zerotouch.util.files import atomic_write_json, read_json
from zerotouch.util.net import free_port

from est_harness import make_csr


def gateway_dir(tmp_path: Path, est_config: dict) -> tuple[Path, Manufacturer, RendezvousInfo]:
    factory = Manufacturer(tmp_path / "factory-ca")
    gw = tmp_path / "gw"
    roles.init_gateway(gw, host="127.0.0.1", port=free_port(),
                       manufacturer_cas=[str(factory.dir / "manufacturer-ca.pem")])
    cfg = read_json(gw / "config.json")
    atomic_write_json(gw / "config.json", {**cfg, "est": est_config})
    info = RendezvousInfo(url="https://127.0.0.1:1", tls_ca_pem="",
                          key_pem=public_key_pem(generate_p256().public_key()).decode())
    return gw, factory, info


async def test_serve_gateway_enrolls_with_idevid_after_approval(tmp_path):
    gw_dir, factory, info = gateway_dir(tmp_path, {"default": {"manual_approval": True},
                                                   "retry_after": 5})
    dev = factory.make_device(tmp_path / "factory", info)
    gw = await roles.build_gateway(gw_dir)
    try:
        await gw.service.register_label(dev.label.url, "EST device")
    finally:
        await gw.close()
    port = free_port()
    ready = asyncio.Event()
    serving = asyncio.create_task(servers.serve_gateway(gw_dir, port=port, on_ready=ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        ctx = ssl.create_default_context(cafile=str(gw_dir / "vault" / "owner-ca.pem"))
        ctx.load_cert_chain(str(dev.device_dir / "idevid.pem"), str(dev.device_dir / "idevid.key"))
        plain = ssl.create_default_context(cafile=str(gw_dir / "vault" / "owner-ca.pem"))
        url = f"https://127.0.0.1:{port}{codec.WELL_KNOWN}/simpleenroll"
        body = codec.encode_body(make_csr()[0])
        async with aiohttp.ClientSession() as http:
            async def enroll(context):
                async with http.post(url, data=body, ssl=context,
                                     headers={"Content-Type": codec.PKCS10}) as r:
                    return r.status, r.headers.get("Retry-After"), await r.read()
            assert (await enroll(ctx))[:2] == (202, "5")
            status, _, text = await enroll(plain)            # no certificate: TLS still works
            assert status == 403 and b"client certificate" in text
            async with http.get(f"https://127.0.0.1:{port}/healthz", ssl=plain) as r:
                assert r.status == 200

            lines: list[str] = []
            assert await est_admin(gw_dir, "list", out=lines.append) == 0
            [line] = lines
            request_id = line.split()[0]
            assert dev.serial in line and "pending" in line
            assert await est_admin(gw_dir, "approve", request_id, out=lines.append) == 0
            assert await est_admin(gw_dir, "reject", "ab" * 32, out=lines.append) == 1
            assert "no enrollment request" in lines[-1]

            status, _, text = await enroll(ctx)
            assert status == 200
            [cert] = codec.parse_certs_only(codec.decode_body(text))
            assert dev.serial in cert.subject.rfc4514_string()

            # The same process serves the CRL; revoking the new certificate shows up in it.
            from cryptography import x509 as _x509
            from zerotouch.services.revocation import gateway_revoke
            await gateway_revoke(gw_dir, cert=format(cert.serial_number, "x"), reason="keyCompromise")
            for _ in range(40):  # the serving process notices other writers within seconds
                async with http.get(f"https://127.0.0.1:{port}/crl", ssl=plain) as r:
                    assert r.status == 200 and r.content_type == "application/pkix-crl"
                    crl = _x509.load_der_x509_crl(await r.read())
                if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                    break
                await asyncio.sleep(0.25)
            assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    lines = []
    assert await est_admin(gw_dir, "list", show_all=True, out=lines.append) == 0
    assert "issued" in lines[0]


def test_cli_parser_under_gateway():
    """As main.py wires it: `add_est_parser(gs)` under the gateway's subparsers."""
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gateway")
    gs = g.add_subparsers(dest="action", required=True)
    add_est_parser(gs)
    g.set_defaults(func="cmd_gateway")
    args = p.parse_args(["gateway", "est", "approve", "--dir", "gw", "ab12"])
    assert (args.est_action, args.dir, args.request_id) == ("approve", Path("gw"), "ab12")
    assert args.func.__name__ == "cmd_est"
    args = p.parse_args(["gateway", "est", "list", "--dir", "gw", "--all"])
    assert args.all and args.est_action == "list"
