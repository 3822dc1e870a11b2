"""Real aiohttp apps on real loopback sockets with real TLS, for the HTTP adapter tests.

`start_servers()` wraps a `fleet.make_fleet` fleet: the rendezvous app behind a certificate from
its own TLS CA, the gateway app behind a certificate issued by the owner CA (what the agent
checks once the owner has proved itself), and one kept-alive aiohttp client session.
"""
from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from sqlalchemy import select

from zerotouch.pki.ca import CertificateAuthority, make_root
from zerotouch.pki.keys import cert_der, cert_pem, generate_p256, save_cert, save_private_key
from zerotouch.protocol.codec import MAX_MESSAGE
from zerotouch.protocol.errors import ProtocolError
from zerotouch.protocol.messages import ErrorReply
from zerotouch.services.vault import load_owner_ca
from zerotouch.storage.schema import (gw_certificates, gw_inventory, gw_sessions, rv_devices,
                                      vault_secrets)
from zerotouch.transport.http.client import client_ssl_context
from zerotouch.transport.http.common import server_ssl_context
from zerotouch.transport.http.gateway_app import gateway_app
from zerotouch.transport.http.rendezvous_app import rendezvous_app
from zerotouch.transport.http.server import start_site

from fleet import Fleet, make_fleet

CBOR = "application/cbor"
ADMIN_TOKEN = "admin-tok-7f3c9b2e-DO-NOT-LEAK-5a1d"
HOST = "127.0.0.1"
TABLES = (rv_devices, gw_inventory, gw_sessions, vault_secrets, gw_certificates)


def _tls_files(directory: Path, ca: CertificateAuthority, name: str) -> tuple[Path, Path, bytes]:
    key = generate_p256()
    cert = ca.issue_server(key.public_key(), common_name=HOST, hosts=[HOST])
    directory.mkdir(parents=True, exist_ok=True)
    save_private_key(directory / f"{name}.key", key)
    save_cert(directory / f"{name}.pem", cert)
    return directory / f"{name}.pem", directory / f"{name}.key", cert_der(cert)


async def _serve(app: web.Application, ctx: ssl.SSLContext) -> tuple[web.AppRunner, int]:
    # Port 0: the kernel picks a free port, so parallel runs cannot race for one.
    runner = await start_site(app, HOST, 0, ctx)
    port = runner.addresses[0][1]
    return runner, port


@dataclass
class Servers:
    fleet: Fleet
    rv_app: web.Application
    gw_app: web.Application
    rv_url: str
    gw_url: str
    gw_port: int
    rv_ca_pem: str          # trust anchor of the rendezvous TLS certificate
    gw_ca_pem: str          # issuer of the gateway TLS certificate (normally the owner CA)
    gw_cert_der: bytes      # the gateway's TLS certificate
    session: aiohttp.ClientSession
    runners: list[web.AppRunner] = field(default_factory=list)

    @property
    def store(self):
        return self.fleet.store

    def ssl_for(self, url: str) -> ssl.SSLContext:
        return client_ssl_context(self.gw_ca_pem if url.startswith(self.gw_url) else self.rv_ca_pem)

    async def request(self, method: str, url: str, *, data: Any = None, json: Any = None,
                      headers: dict | None = None, **kw) -> tuple[int, dict, bytes]:
        async with self.session.request(method, url, data=data, json=json, headers=headers,
                                        ssl=self.ssl_for(url), **kw) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def post_cbor(self, url: str, body: Any, ctype: str = CBOR) -> tuple[int, dict, bytes]:
        return await self.request("POST", url, data=body, headers={"Content-Type": ctype})

    async def healthy(self) -> bool:
        for base in (self.rv_url, self.gw_url):
            status, _h, body = await self.request("GET", f"{base}/healthz")
            if status != 200 or b'"ok": true' not in body:
                return False
        return True

    async def close(self) -> None:
        await self.session.close()
        for r in self.runners:
            await r.cleanup()
        await self.fleet.store.close()


async def start_servers(tmp_path: Path, db_url: str, *, notify: bool = True,
                        foreign_gateway_cert: bool = False) -> Servers:
    """`foreign_gateway_cert`: the gateway's TLS certificate comes from a CA that is not the
    owner's (an impostor or a misconfigured load balancer in front of the real gateway)."""
    fleet = await make_fleet(tmp_path, db_url, notify=notify)
    tls_dir = tmp_path / "tls"
    rv_ca_key = generate_p256()
    rv_ca = CertificateAuthority(rv_ca_key, make_root(rv_ca_key, "test rendezvous TLS CA"))
    rv_cert, rv_key, _ = _tls_files(tls_dir, rv_ca, "rendezvous")
    owner_ca = load_owner_ca(tmp_path / "vault")
    gw_issuer = owner_ca
    if foreign_gateway_cert:
        other_key = generate_p256()
        gw_issuer = CertificateAuthority(other_key, make_root(other_key, "not the owner CA"))
    gw_cert, gw_key, gw_der = _tls_files(tls_dir, gw_issuer, "gateway")

    rv_app = rendezvous_app(fleet.rendezvous, public_info={"url": "test"})
    gw_app = gateway_app(fleet.gateway, admin_token=ADMIN_TOKEN)
    rv_runner, rv_port = await _serve(rv_app, server_ssl_context(rv_cert, rv_key))
    gw_runner, gw_port = await _serve(gw_app, server_ssl_context(gw_cert, gw_key))
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    return Servers(fleet=fleet, rv_app=rv_app, gw_app=gw_app, rv_url=f"https://{HOST}:{rv_port}",
                   gw_url=f"https://{HOST}:{gw_port}", gw_port=gw_port,
                   rv_ca_pem=cert_pem(rv_ca.cert).decode(), gw_ca_pem=cert_pem(gw_issuer.cert).decode(),
                   gw_cert_der=gw_der, session=session, runners=[rv_runner, gw_runner])


async def snapshot(store, *, ignore: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Every row of every table, in a comparable form (order-independent).

    `ignore` names "table.column"s left out (diagnostics a refusal is meant to record).
    """
    out = {}
    async with store.engine.connect() as c:
        for table in TABLES:
            cols = [col for col in table.c if f"{table.name}.{col.name}" not in ignore]
            rows = (await c.execute(select(*cols))).all()
            out[table.name] = sorted(repr(tuple(r)) for r in rows)
    return out


def error_reply(body: bytes) -> ErrorReply:
    """A CBOR ErrorReply with a readable message (raises if the body is anything else)."""
    reply = ErrorReply.decode(body, max_size=MAX_MESSAGE)
    assert reply.code and len(reply.message) >= 8, reply
    return reply


def is_error_reply(body: bytes) -> bool:
    try:
        error_reply(body)
        return True
    except (ProtocolError, AssertionError):
        return False


async def raw_https(port: int, ca_pem: str, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send hand-made request bytes over TLS (for what aiohttp's client refuses to send)."""
    ctx = client_ssl_context(ca_pem)
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


# --- valid protocol messages for every CBOR endpoint ---------------------------------------
RV_FIND_OWNER = "/rv/v1/find-owner"
RV_DEVICES = "/rv/v1/devices"
RV_REGISTERED = "/rv/v1/registered"
GW_HELLO = "/zt/v1/hello"
GW_PROVE = "/zt/v1/prove"
GW_DONE = "/zt/v1/done"
CBOR_ENDPOINTS = (RV_FIND_OWNER, RV_DEVICES, RV_REGISTERED, GW_HELLO, GW_PROVE, GW_DONE)


@dataclass
class ValidSet:
    """One valid body per CBOR endpoint, and a way to sign any payload as its real signer."""
    bodies: dict[str, bytes]
    resign: dict[str, Any]      # path -> fn(payload bytes) -> COSE_Sign1 by that endpoint's signer
    serials: dict[str, str]     # path -> device serial the valid body is about

    def url(self, s: Servers, path: str) -> str:
        return (s.rv_url if path.startswith("/rv/") else s.gw_url) + path


async def claim_for(s: Servers, dev) -> None:
    """Claim `dev` for this fleet's owner, pointing at the real gateway socket."""
    await s.fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip=HOST,
                                   cport=s.gw_port, cfingerprint=s.fleet.owner_fp_hex)


async def valid_set(s: Servers) -> ValidSet:
    """Build (in memory, before any snapshot) a valid message for each endpoint."""
    import time as _time

    from zerotouch.identity.software import SoftwareIdentity
    from zerotouch.protocol import cose
    from zerotouch.protocol.cose import SoftwareSigner
    from zerotouch.protocol.messages import RvRegistered

    f = s.fleet
    rv, gw = f.rendezvous, f.gateway
    devs = []
    for _ in range(3):
        dev = await f.make(claim=False, inventory=True)
        await claim_for(s, dev)
        devs.append(dev)
    a, b, c = devs
    # A: find-owner and hello (nothing sent for it yet: no session)
    core_a = f.core(a)
    find_owner = core_a.find_owner_request()
    core_a.receive_redirect(await rv.find_owner(find_owner))
    hello = core_a.hello_request()
    # B: a session waiting for prove
    core_b = f.core(b)
    core_b.receive_redirect(await rv.find_owner(core_b.find_owner_request()))
    core_b.receive_challenge(await gw.hello(core_b.hello_request()))
    prove = core_b.prove_request()
    # C: a session waiting for done
    core_c = f.core(c)
    core_c.receive_redirect(await rv.find_owner(core_c.find_owner_request()))
    core_c.receive_challenge(await gw.hello(core_c.hello_request()))
    core_c.receive_credentials(await gw.prove(core_c.prove_request()))
    done = core_c.done_request()
    # a factory registration not yet sent, and an owner's report about A
    new = f.manufacturer.make_device(f.tmp / "factory", f.info)
    owner = load_owner_ca(f.tmp / "vault")
    owner_der = cert_der(owner.cert)
    report = cose.sign1(RvRegistered(serial=a.serial, time=int(_time.time())).encode(),
                        SoftwareSigner(owner.key), x5chain=[owner_der])

    def device_signer(dev):
        ident = SoftwareIdentity(dev.device_dir)
        signer, der = ident.idevid_signer(), ident.idevid_cert_der()
        return lambda payload: cose.sign1(payload, signer, x5chain=[der])

    mca = f.manufacturer.ca
    return ValidSet(
        bodies={RV_FIND_OWNER: find_owner, RV_DEVICES: new.registration, RV_REGISTERED: report,
                GW_HELLO: hello, GW_PROVE: prove, GW_DONE: done},
        resign={RV_FIND_OWNER: device_signer(a), GW_HELLO: device_signer(a),
                GW_PROVE: device_signer(b), GW_DONE: device_signer(c),
                RV_DEVICES: lambda p: cose.sign1(p, SoftwareSigner(mca.key), x5chain=[cert_der(mca.cert)]),
                RV_REGISTERED: lambda p: cose.sign1(p, SoftwareSigner(owner.key), x5chain=[owner_der])},
        serials={RV_FIND_OWNER: a.serial, GW_HELLO: a.serial, GW_PROVE: b.serial, GW_DONE: c.serial,
                 RV_DEVICES: new.serial, RV_REGISTERED: a.serial})
