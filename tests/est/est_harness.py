"""An EST service over the in-memory fleet, and the same behind the gateway app on real TLS."""
from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from zerotouch.pki.keys import (cert_der, cert_pem, generate_p256, load_cert, load_private_key,
                                save_cert, save_private_key)
from zerotouch.protocol import est as codec
from zerotouch.services.est import ClientIdentity, EstPolicy, EstService
from zerotouch.services.vault import load_owner_ca
from zerotouch.transport.http.est_app import est_server_ssl_context
from zerotouch.transport.http.gateway_app import gateway_app
from zerotouch.transport.http.server import start_site

from fleet import Fleet

HOST = "127.0.0.1"


def make_csr(key=None, *, subject: str = "x", attrs: dict | None = None,
             extensions: list | None = None) -> tuple[bytes, object]:
    """(CSR DER, key). `subject` is a CN or an x509.Name."""
    key = key or generate_p256()
    name = subject if isinstance(subject, x509.Name) else \
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = x509.CertificateSigningRequestBuilder().subject_name(name)
    for oid, value in (attrs or {}).items():
        b = b.add_attribute(oid, value)
    for ext in extensions or []:
        b = b.add_extension(ext, critical=False)
    # Ed25519 signs without a separate hash
    csr = b.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER), key


def ident(*ders: bytes, **kw) -> ClientIdentity:
    return ClientIdentity(chain=tuple(ders), **kw)


@dataclass
class EstEnv:
    fleet: Fleet
    est: EstService
    policy: EstPolicy

    @property
    def store(self):
        return self.fleet.store

    async def device(self, **kw):
        """A manufactured, claimed device in the owner's inventory: (dev, IDevID DER, IDevID key)."""
        dev = await self.fleet.make(**kw)
        return dev, cert_der(load_cert(dev.device_dir / "idevid.pem")), \
            load_private_key(dev.device_dir / "idevid.key")

    async def ldevid(self, idevid_der: bytes) -> tuple[bytes, object]:
        """Enroll an LDevID with the IDevID: (LDevID DER, its key)."""
        csr, key = make_csr()
        return await self.est.enroll("simpleenroll", "", csr, ident(idevid_der)), key

    async def certs_of(self, serial: str):
        return await self.store.certs.records_for_device(serial)


def make_env(fleet: Fleet, policy: EstPolicy | None = None, **kw) -> EstEnv:
    policy = policy or EstPolicy()
    est = EstService(fleet.store, fleet.vault, policy,
                     manufacturer_cas=[fleet.manufacturer.ca.cert], **kw)
    return EstEnv(fleet, est, policy)


@dataclass
class EstServer:
    env: EstEnv
    url: str
    port: int
    ca_file: Path                   # the owner CA (issuer of the server's TLS certificate)
    tmp: Path
    runner: web.AppRunner
    session: aiohttp.ClientSession = field(default_factory=lambda: aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=20)))

    def ssl(self, cert_der_: bytes | None = None, key=None, *, tls12: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if cert_der_ is not None:
            n = len(list(self.tmp.glob("client-*.pem")))
            cf, kf = self.tmp / f"client-{n}.pem", self.tmp / f"client-{n}.key"
            save_cert(cf, x509.load_der_x509_certificate(cert_der_))
            save_private_key(kf, key)
            ctx.load_cert_chain(str(cf), str(kf))
        return ctx

    async def call(self, method: str, path: str, *, cert: bytes | None = None, key=None,
                   body: bytes | None = None, ctype: str | None = codec.PKCS10,
                   headers: dict | None = None) -> tuple[int, dict, bytes]:
        h = dict(headers or {})
        if body is not None and ctype:
            h["Content-Type"] = ctype
        async with self.session.request(method, self.url + path, data=body, headers=h,
                                        ssl=self.ssl(cert, key)) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def enroll(self, path: str, csr_der: bytes, cert: bytes | None = None, key=None,
                     **kw) -> tuple[int, dict, bytes]:
        return await self.call("POST", codec.WELL_KNOWN + path, cert=cert, key=key,
                               body=codec.encode_body(csr_der), **kw)

    async def close(self) -> None:
        await self.session.close()
        await self.runner.cleanup()


async def start_est_server(env: EstEnv, tmp: Path, *, trusted_proxies=()) -> EstServer:
    tmp.mkdir(parents=True, exist_ok=True)
    fleet = env.fleet
    owner = load_owner_ca(fleet.tmp / "vault")
    key = generate_p256()
    save_private_key(tmp / "tls.key", key)
    save_cert(tmp / "tls.pem", owner.issue_server(key.public_key(), common_name=HOST, hosts=[HOST]))
    (tmp / "owner-ca.pem").write_bytes(cert_pem(owner.cert))
    app = gateway_app(fleet.gateway, admin_token="t" * 32, est_service=env.est,
                      trusted_proxies=list(trusted_proxies))
    ctx = est_server_ssl_context(tmp / "tls.pem", tmp / "tls.key",
                                 [owner.cert, fleet.manufacturer.ca.cert])
    runner = await start_site(app, HOST, 0, ctx)
    port = runner.addresses[0][1]
    return EstServer(env=env, url=f"https://{HOST}:{port}", port=port,
                     ca_file=tmp / "owner-ca.pem", tmp=tmp, runner=runner)
