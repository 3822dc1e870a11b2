"""EST (RFC 7030) client for the agent: cacerts, simpleenroll, simplereenroll.

The gateway is verified against the owner CA (hostname checked) and the device authenticates
with a TLS client certificate: the LDevID for a first `simpleenroll`, the current operational
certificate for `simplereenroll`. Answers are read with a hard size bound and decoded strictly
(base64 alphabet and line breaks only, then DER certs-only PKCS#7), because a parser on a
device is exactly where a malicious or broken server would aim.

Errors are ProtocolError subclasses carrying the server's text: `Pending` for 202 (manual
approval; send the same CSR again after `retry_after`), `TryLater` for 503, `EstRefused` for
other statuses, `MalformedMessage` for an answer that does not parse.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import json
import re
import ssl
import time
from pathlib import Path
from typing import Callable

import aiohttp
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import pkcs7

from ..pki.keys import public_key_der
from ..protocol.errors import MalformedMessage, NotAuthorized, TryLater
from ..transport.http.client import PeerRefused

EST_PATH = "/.well-known/est"
PKCS10 = "application/pkcs10"
PKCS7 = "application/pkcs7-mime"
MAX_BODY = 64 * 1024          # certs-only answers are a few KB; anything bigger is refused unread
MAX_ERROR_TEXT = 512
MAX_RETRY_AFTER = 86400       # a server may ask for patience, not for a device to go silent
DEFAULT_RETRY_AFTER = 60      # RFC 7030 §4.2.3 requires Retry-After with 202; if it is missing
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,63}")  # one path segment, never "." or ".."


class Pending(TryLater):
    """202: the request waits for manual approval; retry the same CSR after `retry_after`."""
    status = 202
    code = "pending"


class EstRefused(PeerRefused):
    """The EST server answered with an error status; `message` holds its reason."""


def est_ssl_context(ca_pem: str | bytes, cert_file: Path | None = None,
                    key_file: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # check_hostname on; no system CA store
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=ca_pem.decode() if isinstance(ca_pem, bytes) else ca_pem)
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


def decode_base64(body: bytes) -> bytes:
    """Strict base64: the alphabet, '=' padding and line breaks (servers wrap at 64/76)."""
    compact = body.translate(None, b" \t\r\n")
    if not compact:
        raise MalformedMessage("EST answer is empty")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedMessage("EST answer is not valid base64") from None


def decode_certs(body: bytes) -> list[x509.Certificate]:
    """base64 certs-only PKCS#7 → certificates (at least one)."""
    der = decode_base64(body)
    try:
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except (ValueError, TypeError):
        raise MalformedMessage("EST answer is not a DER certs-only PKCS#7") from None
    if not certs:
        raise MalformedMessage("EST answer holds no certificate")
    return certs


def parse_retry_after(value: str | None, now: float) -> int:
    """Retry-After as delay-seconds or HTTP-date (RFC 9110 §10.2.3), bounded."""
    if not value:
        return DEFAULT_RETRY_AFTER
    value = value.strip()
    if value.isdigit():
        seconds = int(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        seconds = int(when.timestamp() - now)
    return max(0, min(seconds, MAX_RETRY_AFTER))


def _text(body: bytes, content_type: str) -> str:
    """The server's reason, shown to people and logs: printable characters only, bounded."""
    text = body[:MAX_ERROR_TEXT].decode("utf-8", "replace")
    if content_type == "application/json":  # our gateway's generic error form
        try:
            text = str(json.loads(body)["message"])[:MAX_ERROR_TEXT]
        except (ValueError, KeyError, TypeError):
            pass
    return "".join(c if c.isprintable() else " " for c in text).strip()


class EstClient:
    """One EST server (a gateway URL, or a URL already ending in /.well-known/est)."""

    def __init__(self, base_url: str, *, ca_pem: str | bytes, client_cert_file: Path | None = None,
                 client_key_file: Path | None = None, timeout: float = 15.0,
                 clock: Callable[[], float] = time.time):
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith(EST_PATH) else base + EST_PATH
        self._ssl = est_ssl_context(ca_pem, client_cert_file, client_key_file)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock
        self.bytes_sent = 0
        self.bytes_received = 0

    async def __aenter__(self) -> "EstClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, op: str, label: str | None = None) -> str:
        if label is None:
            return f"{self.base_url}/{op}"
        if not _LABEL.fullmatch(label):
            raise ValueError(f"invalid EST label {label!r}")
        return f"{self.base_url}/{label}/{op}"

    async def _request(self, method: str, url: str, body: bytes | None = None) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(ssl=self._ssl))
        headers = {"Accept": PKCS7}
        if body is not None:
            headers.update({"Content-Type": PKCS10, "Content-Transfer-Encoding": "base64"})
            self.bytes_sent += len(body)
        # No redirects: the client certificate and CSR go to the configured server only.
        async with self._session.request(method, url, data=body, headers=headers,
                                         allow_redirects=False) as resp:
            if resp.content_length is not None and resp.content_length > MAX_BODY:
                raise MalformedMessage(f"EST answer of {resp.content_length} bytes is too large")
            data = await resp.content.read(MAX_BODY + 1)
            self.bytes_received += len(data)
            if len(data) > MAX_BODY:
                raise MalformedMessage(f"EST answer exceeds {MAX_BODY} bytes")
            if resp.status == 202:
                after = parse_retry_after(resp.headers.get("Retry-After"), self._clock())
                raise Pending(f"enrollment is waiting for approval; retry in {after} s",
                              retry_after=after)
            if resp.status != 200:
                reason = _text(data, resp.content_type) or (resp.reason or "")
                message = f"EST {url.rsplit('/', 1)[-1]} refused: {reason} (HTTP {resp.status})"
                if resp.status == 503:
                    raise TryLater(message, retry_after=parse_retry_after(
                        resp.headers.get("Retry-After"), self._clock()))
                raise EstRefused(message, status=resp.status, code="est_refused")
            if resp.content_type != PKCS7:
                raise MalformedMessage(f"EST answer is {resp.content_type}, not {PKCS7}")
            return data

    async def cacerts(self, label: str | None = None) -> list[x509.Certificate]:
        """The CA certificates the server wants clients to trust (RFC 7030 §4.1)."""
        return decode_certs(await self._request("GET", self.url("cacerts", label)))

    async def simpleenroll(self, csr_der: bytes, label: str | None = None) -> x509.Certificate:
        return await self._enroll("simpleenroll", csr_der, label)

    async def simplereenroll(self, csr_der: bytes, label: str | None = None) -> x509.Certificate:
        return await self._enroll("simplereenroll", csr_der, label)

    async def _enroll(self, op: str, csr_der: bytes, label: str | None) -> x509.Certificate:
        csr_key = public_key_der(x509.load_der_x509_csr(csr_der).public_key())
        certs = decode_certs(await self._request("POST", self.url(op, label),
                                                 base64.b64encode(csr_der)))
        # The answer may carry the chain too; ours is the one certifying the CSR's key.
        for cert in certs:
            try:
                if public_key_der(cert.public_key()) == csr_key:
                    return cert
            except (ValueError, UnsupportedAlgorithm):
                continue
        raise NotAuthorized(f"EST {op} answer certifies no key this device asked for")
