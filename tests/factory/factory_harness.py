"""The factory EST service on real TLS, station credentials, and device CSRs."""
from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from zerotouch.pki.keys import generate_p256
from zerotouch.protocol import est as codec
from zerotouch.services.factory_est import (FactoryEstService, StationCredential,
                                            factory_est_app, factory_est_ssl_context,
                                            issue_station, provisioning_ca)
from zerotouch.services.manufacturer import Manufacturer
from zerotouch.transport.http.server import start_site

HOST = "127.0.0.1"
EST = codec.WELL_KNOWN + "/idevid"


def device_csr(serial: str | None, key=None, *, cn: str = "device", san: str | None = None,
               extensions: list | None = None) -> tuple[bytes, object]:
    """(CSR DER, key): what a device makes, naming its serial in the subject."""
    key = key or generate_p256()
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if serial is not None:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]),
                            critical=False)
    for ext in extensions or []:
        b = b.add_extension(ext, critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER), key


@dataclass
class FactoryServer:
    manufacturer: Manufacturer
    service: FactoryEstService
    station: StationCredential
    url: str
    tmp: Path
    runner: web.AppRunner
    session: aiohttp.ClientSession = field(default_factory=lambda: aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=20)))

    @property
    def ca_pem(self) -> bytes:
        return self.manufacturer.ca_pem

    def ssl(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.station.ca_file))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx

    async def call(self, method: str, path: str, *, body: bytes | None = None,
                   ctype: str = codec.PKCS10, cert: Path | None = None,
                   key: Path | None = None, station: bool = True) -> tuple[int, str]:
        """(status, body text); the station's credential unless `cert` or station=False."""
        if cert is None and station:
            cert, key = self.station.cert_file, self.station.key_file
        headers = {"Content-Type": ctype} if body is not None else {}
        async with self.session.request(method, self.url + path, data=body, headers=headers,
                                        ssl=self.ssl(cert, key)) as resp:
            return resp.status, (await resp.read()).decode("latin-1")

    async def enroll(self, csr_der: bytes, path: str = EST + "/simpleenroll", **kw):
        return await self.call("POST", path, body=codec.encode_body(csr_der), **kw)

    async def close(self) -> None:
        await self.session.close()
        await self.runner.cleanup()


async def start_factory_server(manufacturer_dir: Path, tmp: Path) -> FactoryServer:
    manufacturer = Manufacturer(manufacturer_dir)
    prov = provisioning_ca(manufacturer)
    service = FactoryEstService(manufacturer, provisioning_ca=prov)
    station = issue_station(manufacturer, "line-1", tmp / "station")
    runner = await start_site(factory_est_app(service), HOST, 0,
                              factory_est_ssl_context(manufacturer, prov, HOST))
    port = runner.addresses[0][1]
    return FactoryServer(manufacturer=manufacturer, service=service, station=station,
                         url=f"https://{HOST}:{port}", tmp=tmp, runner=runner)


from support import sh  # noqa: E402,F401
