"""The agent's EST client against a small fake RFC 7030 server on a real TLS socket that
authenticates the device by its client certificate."""
from __future__ import annotations

import base64
import email.utils
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from zerotouch.agent.est_client import (MAX_BODY, EstClient, EstRefused, Pending, decode_base64,
                                        decode_certs, parse_retry_after)
from zerotouch.pki.ca import CertificateAuthority, device_identity, make_root
from zerotouch.pki.keys import cert_pem, generate_p256, public_key_der, save_cert, save_private_key
from zerotouch.protocol.errors import MalformedMessage, NotAuthorized, TryLater
from zerotouch.transport.http.common import server_ssl_context
from zerotouch.transport.http.server import start_site

HOST = "127.0.0.1"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
SERIAL = "ZT-EST-0001"


def make_ca(name: str) -> CertificateAuthority:
    key = generate_p256()
    return CertificateAuthority(key, make_root(key, name))


def certs_only(*certs: x509.Certificate, wrap: int | None = 64) -> bytes:
    """base64 certs-only PKCS#7, wrapped with CRLF as many EST servers do."""
    b64 = base64.b64encode(pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER))
    if wrap is None:
        return b64
    return b"\r\n".join(b64[i:i + wrap] for i in range(0, len(b64), wrap)) + b"\r\n"


def make_csr(serial: str = SERIAL, key=None) -> tuple[bytes, object]:
    key = key or generate_p256()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial),
                                    x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.DER), key


@dataclass
class FakeEst:
    """RFC 7030 as the gateway will speak it; `mode` makes it misbehave on purpose."""
    ca: CertificateAuthority
    url: str = ""
    mode: str = "ok"
    pending: int = 0                  # answer 202 this many times first
    retry_after: str = "7"
    seen: list[tuple[str, str | None, str | None, bytes]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        for prefix in ("/.well-known/est", "/.well-known/est/{label}"):
            app.router.add_get(f"{prefix}/cacerts", self.cacerts)
            app.router.add_post(f"{prefix}/simpleenroll", self.enroll)
            app.router.add_post(f"{prefix}/simplereenroll", self.enroll)
        return app

    async def cacerts(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, certs_only(self.ca.cert))

    async def enroll(self, request: web.Request) -> web.StreamResponse:
        ssl_obj = request.transport.get_extra_info("ssl_object")
        peer_der = ssl_obj.getpeercert(binary_form=True) if ssl_obj else None
        if peer_der is None:
            return web.Response(status=401, text="client certificate required")
        peer_serial, urn = device_identity(x509.load_der_x509_certificate(peer_der))
        if request.content_type != "application/pkcs10":
            return web.Response(status=415, text="send application/pkcs10")
        csr_der = base64.b64decode(await request.read(), validate=True)
        op = request.path.rsplit("/", 1)[-1]
        self.seen.append((op, request.match_info.get("label"), peer_serial, csr_der))
        if self.mode == "refuse":
            return web.Response(status=403, text="key type P-256 not allowed for\x1b[31m this label")
        if self.mode == "json_error":   # what the gateway's generic error middleware sends
            return web.json_response({"error": "forbidden", "message": "device is revoked"},
                                     status=403)
        if self.mode == "redirect":
            raise web.HTTPTemporaryRedirect("https://203.0.113.9/.well-known/est/simpleenroll")
        if self.mode == "busy":
            return web.Response(status=503, text="CA is busy", headers={"Retry-After": "11"})
        if self.pending > 0:
            self.pending -= 1
            return web.Response(status=202, headers={"Retry-After": self.retry_after})
        csr = x509.load_der_x509_csr(csr_der)
        key = generate_p256().public_key() if self.mode == "other_key" else csr.public_key()
        cert = self.ca.issue_device(key, serial=peer_serial, urn=urn, days=1)
        return await self._answer(request, certs_only(self.ca.cert, cert))  # chain first

    async def _answer(self, request: web.Request, body: bytes) -> web.StreamResponse:
        ctype = CERTS_ONLY
        if self.mode == "malformed":
            body = body[:40] + b"-_*" + body[40:]        # url-safe and junk characters
        elif self.mode == "not_pkcs7":
            body = base64.b64encode(b"\x30\x03\x02\x01\x05" * 10)
        elif self.mode == "wrong_type":
            ctype = "text/html"
        elif self.mode == "oversized":
            body = b"QUFB\r\n" * (MAX_BODY // 4)
        elif self.mode == "oversized_chunked":
            resp = web.StreamResponse(headers={"Content-Type": ctype})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for _ in range(MAX_BODY // 4096 + 2):
                await resp.write(b"QUFB" * 1024)
            await resp.write_eof()
            return resp
        return web.Response(body=body, headers={"Content-Type": ctype,
                                                "Content-Transfer-Encoding": "base64"})


@dataclass
class Env:
    server: FakeEst
    ca_pem: str
    cert_file: Path
    key_file: Path

    def client(self, *, authenticated: bool = True, **kw) -> EstClient:
        return EstClient(self.server.url, ca_pem=self.ca_pem,
                         client_cert_file=self.cert_file if authenticated else None,
                         client_key_file=self.key_file if authenticated else None, **kw)


async def serve(tmp_path: Path, ca: CertificateAuthority, *, tls_ca: CertificateAuthority | None = None):
    tls_ca = tls_ca or ca
    key = generate_p256()
    save_private_key(tmp_path / "tls.key", key)
    save_cert(tmp_path / "tls.pem", tls_ca.issue_server(key.public_key(), common_name=HOST, hosts=[HOST]))
    save_cert(tmp_path / "client-ca.pem", ca.cert)
    ctx = server_ssl_context(tmp_path / "tls.pem", tmp_path / "tls.key",
                             client_ca=tmp_path / "client-ca.pem")
    server = FakeEst(ca)
    runner = await start_site(server.app(), HOST, 0, ctx)
    server.url = f"https://{HOST}:{runner.addresses[0][1]}"
    return server, runner


@pytest.fixture
async def env(tmp_path):
    ca = make_ca("owner CA")
    server, runner = await serve(tmp_path, ca)
    dev_key = generate_p256()
    save_private_key(tmp_path / "ldevid.key", dev_key)
    save_cert(tmp_path / "ldevid.pem", ca.issue_device(dev_key.public_key(), serial=SERIAL,
                                                       urn=f"urn:dev:zerotouch:{SERIAL}"))
    try:
        yield Env(server, cert_pem(ca.cert).decode(), tmp_path / "ldevid.pem", tmp_path / "ldevid.key")
    finally:
        await runner.cleanup()


# --- the happy paths --------------------------------------------------------------------------
async def test_cacerts_returns_the_ca_and_counts_bytes(env):
    async with env.client(authenticated=False) as est:
        certs = await est.cacerts()
        assert certs == [env.server.ca.cert]
        assert est.bytes_sent == 0 and est.bytes_received > 300


async def test_simpleenroll_with_label_returns_the_certificate_for_our_key(env):
    csr, key = make_csr()
    async with env.client() as est:
        cert = await est.simpleenroll(csr, label="operational")
        assert est.bytes_sent == len(base64.b64encode(csr)) and est.bytes_received > 0
    # the answer carried the CA first: the client picked the certificate of the CSR's key
    assert public_key_der(cert.public_key()) == public_key_der(key.public_key())
    cert.verify_directly_issued_by(env.server.ca.cert)
    # the server authenticated the device by its TLS client certificate and saw the label
    assert env.server.seen == [("simpleenroll", "operational", SERIAL, csr)]


async def test_simplereenroll_without_label(env):
    csr, _ = make_csr()
    async with env.client() as est:
        await est.simplereenroll(csr)
    assert [(op, label) for op, label, *_ in env.server.seen] == [("simplereenroll", None)]


async def test_202_then_success_with_the_same_csr(env):
    env.server.pending = 2
    csr, key = make_csr()
    async with env.client() as est:
        for _ in range(2):
            with pytest.raises(Pending) as info:
                await est.simpleenroll(csr, label="operational")
            assert info.value.retry_after == 7 and info.value.status == 202
            assert isinstance(info.value, TryLater)
        cert = await est.simpleenroll(csr, label="operational")
    assert public_key_der(cert.public_key()) == public_key_der(key.public_key())
    assert [c for *_, c in env.server.seen] == [csr, csr, csr]


async def test_202_with_an_http_date_retry_after(env):
    env.server.pending = 1
    env.server.retry_after = email.utils.formatdate(1_000_120, usegmt=True)
    async with env.client(clock=lambda: 1_000_000.0) as est:
        with pytest.raises(Pending) as info:
            await est.simpleenroll(make_csr()[0])
    assert info.value.retry_after == 120


# --- refusals and broken answers ----------------------------------------------------------------
async def test_4xx_reason_is_surfaced_without_control_characters(env):
    env.server.mode = "refuse"
    async with env.client() as est:
        with pytest.raises(EstRefused) as info:
            await est.simpleenroll(make_csr()[0], label="operational")
    assert info.value.status == 403
    assert "key type P-256 not allowed for" in info.value.message
    assert "HTTP 403" in info.value.message and "\x1b" not in info.value.message


@pytest.mark.parametrize("mode,status,text", [("json_error", 403, "device is revoked"),
                                              ("redirect", 307, "Temporary Redirect")])
async def test_json_errors_and_redirects(env, mode, status, text):
    env.server.mode = mode
    async with env.client() as est:
        with pytest.raises(EstRefused) as info:
            await est.simpleenroll(make_csr()[0])
    assert info.value.status == status and text in info.value.message


async def test_503_is_try_later_with_retry_after(env):
    env.server.mode = "busy"
    async with env.client() as est:
        with pytest.raises(TryLater) as info:
            await est.simplereenroll(make_csr()[0])
    assert info.value.retry_after == 11 and "CA is busy" in info.value.message


async def test_without_a_client_certificate_the_server_refuses(env):
    async with env.client(authenticated=False) as est:
        with pytest.raises(EstRefused) as info:
            await est.simpleenroll(make_csr()[0])
    assert info.value.status == 401 and "client certificate required" in info.value.message


@pytest.mark.parametrize("mode", ["malformed", "not_pkcs7", "wrong_type", "oversized",
                                  "oversized_chunked"])
async def test_broken_answers_are_refused(env, mode):
    env.server.mode = mode
    async with env.client() as est:
        with pytest.raises(MalformedMessage):
            await est.cacerts()
        with pytest.raises(MalformedMessage):
            await est.simpleenroll(make_csr()[0])
        if mode.startswith("oversized"):
            assert est.bytes_received <= 2 * (MAX_BODY + 1)   # read with a bound, not whole


async def test_a_certificate_for_another_key_is_refused(env):
    env.server.mode = "other_key"
    async with env.client() as est:
        with pytest.raises(NotAuthorized):
            await est.simpleenroll(make_csr()[0])


async def test_a_gateway_not_certified_by_the_owner_ca_is_refused(tmp_path, env):
    impostor, runner = await serve(tmp_path / "impostor", env.server.ca, tls_ca=make_ca("other"))
    try:
        est = EstClient(impostor.url, ca_pem=env.ca_pem, client_cert_file=env.cert_file,
                        client_key_file=env.key_file)
        async with est:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await est.simpleenroll(make_csr()[0])
        assert impostor.seen == []       # the CSR never reached it
    finally:
        await runner.cleanup()


# --- small parts ----------------------------------------------------------------------------------
def test_urls_and_labels():
    est = EstClient("https://gw.example:8444/", ca_pem=cert_pem(make_ca("x").cert))
    assert est.url("cacerts") == "https://gw.example:8444/.well-known/est/cacerts"
    assert est.url("simpleenroll", "operational") == \
        "https://gw.example:8444/.well-known/est/operational/simpleenroll"
    same = EstClient("https://gw.example:8444/.well-known/est", ca_pem=cert_pem(make_ca("x").cert))
    assert same.url("cacerts") == est.url("cacerts")
    for bad in ("", ".", "..", "a/b", "../cacerts", "x" * 65, "op?x=1", "%2e%2e"):
        with pytest.raises(ValueError):
            est.url("simpleenroll", bad)


def test_base64_is_strict():
    assert decode_base64(b"QUJD\r\nREVG\n") == b"ABCDEF"
    for bad in (b"", b"\r\n", b"QUJD-REVG", b"QUJ", b"QUJD\x00", b"QU=JD"):
        with pytest.raises(MalformedMessage):
            decode_base64(bad)


def test_retry_after_forms_and_bounds():
    assert parse_retry_after("30", 0) == 30
    assert parse_retry_after(None, 0) == 60                      # RFC requires it; be patient
    assert parse_retry_after("soon", 0) == 60
    assert parse_retry_after("99999999", 0) == 86400             # bounded
    assert parse_retry_after(email.utils.formatdate(50, usegmt=True), 100) == 0   # in the past


def test_decodes_what_openssl_makes(tmp_path):
    """A certs-only PKCS#7 from `openssl crl2pkcs7`, base64 wrapped at 64 as `openssl base64`."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ca = make_ca("owner CA")
    (tmp_path / "ca.pem").write_bytes(cert_pem(ca.cert))
    der = subprocess.run(["openssl", "crl2pkcs7", "-nocrl", "-certfile", str(tmp_path / "ca.pem"),
                          "-outform", "DER"], check=True, capture_output=True).stdout
    b64 = subprocess.run(["openssl", "base64"], input=der, check=True, capture_output=True).stdout
    assert decode_certs(b64) == [ca.cert]
