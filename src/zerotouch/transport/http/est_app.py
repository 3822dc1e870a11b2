"""HTTP adapter of the EST server (RFC 7030): /.well-known/est/[label/]operation.

Thin: who the client is (TLS client certificate, a certificate forwarded by a trusted proxy,
HTTP Basic), the base64 body in, the service, the base64 body out. Errors are text/plain with
the reason, as EST clients (curl, libest) show the body to a person.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import ssl
import urllib.parse
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ...protocol import est as codec
from ...protocol.errors import MalformedMessage, MessageTooLarge, NotFound, ProtocolError
from ...services.est import AuthenticationRequired, ClientIdentity, EstService
from .common import server_ssl_context

log = logging.getLogger("zerotouch.http.est")
CERT_HEADER = "X-SSL-Client-Cert"   # nginx: proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;
MAX_CERT_HEADER = 16 * 1024


def est_server_ssl_context(cert_file: Path, key_file: Path,
                           client_cas: list[x509.Certificate]) -> ssl.SSLContext:
    """The gateway's TLS context: a client certificate is asked for but optional, so devices
    onboarding without one still connect; one that is sent must chain to these CAs."""
    ctx = server_ssl_context(cert_file, key_file)
    if client_cas:
        ctx.load_verify_locations(cadata="".join(c.public_bytes(Encoding.PEM).decode()
                                                 for c in client_cas))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def forwarded_chain(header: str) -> tuple[bytes, ...]:
    """DER certificates of a URL-encoded PEM header (nginx's $ssl_client_escaped_cert)."""
    if len(header) > MAX_CERT_HEADER:
        raise MessageTooLarge(f"{CERT_HEADER} is longer than {MAX_CERT_HEADER} characters")
    pem = urllib.parse.unquote(header).strip().encode("ascii", "replace")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise MalformedMessage(f"{CERT_HEADER} from the proxy is not a URL-encoded PEM "
                               "certificate") from None
    return tuple(c.public_bytes(Encoding.DER) for c in certs)


def _basic(header: str | None) -> tuple[str | None, str | None]:
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise MalformedMessage("Authorization: Basic needs base64 of UTF-8 'user:password'") from None
    if not sep or len(user) > 256 or len(password) > 1024:
        raise MalformedMessage("Authorization: Basic needs 'user:password' of sensible length")
    return user, password


def _text(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.Response(text=message.rstrip() + "\n", status=status, headers=headers,
                        content_type="text/plain")


def _base64(body: bytes, content_type: str) -> web.Response:
    return web.Response(body=codec.encode_body(body), headers={
        "Content-Type": content_type, "Content-Transfer-Encoding": "base64"})


def add_est_routes(app: web.Application, est: EstService, *, trusted_proxies: list[str],
                   basic_realm: str = "zerotouch") -> None:
    proxies = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    def from_trusted_proxy(request: web.Request) -> bool:
        try:
            ip = ipaddress.ip_address(request.remote or "")
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in proxies)

    def identity(request: web.Request) -> ClientIdentity:
        user, password = _basic(request.headers.get("Authorization"))
        header = request.headers.get(CERT_HEADER)
        # The header is a claim anyone can make: it counts only from a configured proxy address.
        if header and proxies and from_trusted_proxy(request):
            return ClientIdentity(chain=forwarded_chain(header), via_proxy=True, username=user,
                                  password=password)
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        chain, tls_unique = (), None
        if sslobj is not None:
            der = sslobj.getpeercert(binary_form=True)
            chain = (der,) if der else ()
            if sslobj.version() == "TLSv1.2":   # tls-unique is undefined in TLS 1.3
                tls_unique = sslobj.get_channel_binding("tls-unique")
        return ClientIdentity(chain=chain, username=user, password=password, tls_unique=tls_unique)

    async def read_csr(request: web.Request) -> bytes:
        if request.content_type != codec.PKCS10:
            raise ProtocolError(f"send {codec.PKCS10} (base64 DER), not {request.content_type}",
                                status=415, code="media_type")
        if request.content_length is not None and request.content_length > codec.MAX_BODY:
            raise MessageTooLarge(f"EST body exceeds {codec.MAX_BODY} bytes")
        body = bytearray()
        while len(body) <= codec.MAX_BODY:      # read(n) may return less than n: loop to EOF
            chunk = await request.content.read(codec.MAX_BODY + 1 - len(body))
            if not chunk:
                break
            body += chunk
        return codec.decode_body(bytes(body))

    async def operation(request: web.Request, label: str, op: str) -> web.Response:
        if op == "cacerts":
            return _base64(await est.cacerts(), codec.PKCS7_CERTS)
        if op == "csrattrs":
            return _base64(await est.csrattrs(label, identity(request)), codec.CSRATTRS)
        csr = await read_csr(request)
        if op == "serverkeygen":
            key, cert = await est.serverkeygen(label, csr, identity(request))
            ctype, body = codec.serverkeygen_body(key, [x509.load_der_x509_certificate(cert)])
            return web.Response(body=body, headers={"Content-Type": ctype})
        cert = await est.enroll(op, label, csr, identity(request))
        return _base64(codec.certs_only([x509.load_der_x509_certificate(cert)]), codec.PKCS7_CERTS)

    async def handler(request: web.Request) -> web.Response:
        label, op = request.match_info.get("label", ""), request.match_info["op"]
        method = codec.OPERATIONS.get(op)
        try:
            if method is None:
                raise NotFound(f"unknown EST operation {op!r}; offered: {', '.join(codec.OPERATIONS)}")
            if request.method != method:
                return _text(405, f"{op} takes {method}", {"Allow": method})
            if label:
                codec.check_label(label)        # syntax (400); the service knows which exist (404)
            return await operation(request, label, op)
        except ProtocolError as exc:
            log.info("EST %s %s -> %s %s", request.method, request.path, exc.status, exc.code)
            headers = {}
            if exc.retry_after is not None:
                headers["Retry-After"] = str(int(exc.retry_after))
            if isinstance(exc, AuthenticationRequired) or (exc.status == 401 and est.basic_configured):
                headers["WWW-Authenticate"] = f'Basic realm="{basic_realm}", charset="UTF-8"'
            return _text(exc.status, exc.message, headers)
        except Exception:
            log.exception("internal error on EST %s %s", request.method, request.path)
            return _text(500, "internal error")

    base = codec.WELL_KNOWN
    app.router.add_route("*", base + "/{op}", handler)
    app.router.add_route("*", base + "/{label}/{op}", handler)
