"""The device side of onboarding over CoAP: same interface as HttpDeviceTransport.

URLs: `coap://host:port` (UDP, RFC 7252) or `coaps+tcp://host:port` (TLS, RFC 8323).
aiocoap splits requests larger than one block into Block1 and fetches Block2 answers.

The rendezvous records the owner's gateway as `https://cip:cport` (the claim has no scheme),
and the factory config holds an `https://` rendezvous URL, so an `https://` URL is mapped
here: to `rendezvous_url` / `gateway_url` when given, otherwise to `<https_as>://host:port`
(e.g. the owner claimed with its CoAP port).
"""
from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

import aiocoap
from aiocoap.numbers import codes

from ...protocol.errors import MalformedMessage, NotAuthorized, ProtocolError, TryLater
from ...protocol.messages import ErrorReply
from ..http.client import PeerRefused, new_client_context
from .common import CBOR_CF, MAX_PAYLOAD, PATHS, status_for_code

SCHEMES = ("coap", "coaps+tcp")


def error_from_response(resp: aiocoap.Message) -> ProtocolError:
    status = status_for_code(resp.code)
    retry_after = (resp.opt.max_age if resp.code in (codes.SERVICE_UNAVAILABLE, codes.TOO_MANY_REQUESTS)
                   else None)
    code, message = "coap_error", f"CoAP {resp.code.dotted}"
    try:
        reply = ErrorReply.decode(bytes(resp.payload), max_size=4096)
        code, message = reply.code, reply.message
        if reply.retry_after is not None:
            retry_after = reply.retry_after
    except ProtocolError:
        pass
    cls = TryLater if resp.code == codes.SERVICE_UNAVAILABLE else PeerRefused
    return cls(f"{message} (CoAP {resp.code.dotted})", status=status, code=code, retry_after=retry_after)


class CoapDeviceTransport:
    """How an agent reaches the rendezvous and the gateway over CoAP.

    `bytes_sent` / `bytes_received` count CoAP payload bytes (what the protocol sends; block
    headers, options and retransmissions are not included — measure datagrams outside).
    """

    name = "coap"

    def __init__(self, *, rendezvous_ca_pem: str | None = None, rendezvous_url: str | None = None,
                 gateway_url: str | None = None,
                 https_as: str = "coap", timeout: float = 30.0, max_answer: int = MAX_PAYLOAD,
                 edhoc_identity=None, edhoc_pins: dict[str, bytes] | None = None):
        """`edhoc_identity` + `edhoc_pins` ({"coap://host:port": server key fingerprint}): protect
        requests to those servers with EDHOC + OSCORE, refusing any other server key."""
        if https_as not in SCHEMES:
            raise ValueError(f"https_as must be one of {SCHEMES}")
        self._rendezvous_override = rendezvous_url.rstrip("/") if rendezvous_url else None
        self._gateway_override = gateway_url.rstrip("/") if gateway_url else None
        self._https_as = https_as
        self._timeout = timeout
        self._max_answer = max_answer
        self._rv_ssl = tls_client_context(rendezvous_ca_pem) if rendezvous_ca_pem else None
        self._gw_ssl = tls_client_context(None)
        self._ctx: aiocoap.Context | None = None
        self._lock = asyncio.Lock()
        self._ssl_for: dict[str, ssl.SSLContext] = {}
        self._edhoc_identity = edhoc_identity
        self._edhoc_pins = {k.rstrip("/"): v for k, v in (edhoc_pins or {}).items()}
        self._edhoc_creds: dict = {}
        self.gateway_peer_cert: bytes | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.largest_sent = 0
        self.largest_received = 0
        self.requests = 0

    async def __aenter__(self):
        await self._context()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _context(self) -> aiocoap.Context:
        async with self._lock:
            if self._ctx is None:
                transports = (["oscore"] if self._edhoc_identity else []) + ["udp6", "tlsclient"]
                ctx = await aiocoap.Context.create_client_context(transports=transports)
                # aiocoap's TLS client asks its credentials for an SSL context per origin; ours
                # are pinned (rendezvous CA) or checked in the messages first (gateway).
                ctx.client_credentials.ssl_client_context = self._ssl_client_context
                self._ctx = ctx
            return self._ctx

    def _ssl_client_context(self, scheme: str, hostinfo: str):
        # None would make aiocoap fall back to the system CA store, which never applies here.
        return self._ssl_for.get(hostinfo) or self._gw_ssl

    async def close(self) -> None:
        if self._ctx is not None:
            await self._ctx.shutdown()
            self._ctx = None

    def _base(self, url: str, override: str | None) -> str:
        if override:
            return override
        parts = urlsplit(url)
        if parts.scheme in SCHEMES:
            return url.rstrip("/")
        if parts.scheme in ("https", "coaps"):
            return f"{self._https_as}://{parts.netloc}"
        raise MalformedMessage(f"cannot reach {url!r} over CoAP")

    async def _post(self, base: str, path: tuple[str, ...], body: bytes, tls: ssl.SSLContext | None,
                    *, capture_peer: bool = False) -> bytes:
        parts = urlsplit(base)
        if parts.scheme not in SCHEMES:
            raise MalformedMessage(f"not a CoAP URL: {base!r}")
        if parts.scheme == "coaps+tcp":
            self._ssl_for[parts.netloc] = _with_alpn(tls)
        ctx = await self._context()
        if parts.scheme == "coap" and self._edhoc_identity and base in self._edhoc_pins \
                and base not in self._edhoc_creds:
            from .edhoc import pin_server
            self._edhoc_creds[base] = pin_server(ctx, base, self._edhoc_identity, self._edhoc_pins[base])
        req = aiocoap.Message(code=codes.POST, payload=body, content_format=CBOR_CF,
                              uri=f"{base}/{'/'.join(path)}")
        self.bytes_sent += len(body)
        self.largest_sent = max(self.largest_sent, len(body))
        self.requests += 1
        try:
            resp = await asyncio.wait_for(ctx.request(req).response, self._timeout)
        except aiocoap.error.Error as exc:
            if base in self._edhoc_creds:
                self._edhoc_creds[base].reset()  # the next attempt runs EDHOC afresh
            # Network trouble (timeouts, resets, refused TLS): the agent retries an OSError.
            raise OSError(f"CoAP request to {base} failed: {exc}") from exc
        data = bytes(resp.payload)
        self.bytes_received += len(data)
        self.largest_received = max(self.largest_received, len(data))
        if len(data) > self._max_answer:
            raise MalformedMessage("server answer is too large")
        if capture_peer:
            self.gateway_peer_cert = _peer_cert(resp) if parts.scheme == "coaps+tcp" else None
        if not resp.code.is_successful():
            raise error_from_response(resp)
        return data

    def pin_gateway(self, gateway_url: str, fingerprint: bytes | None) -> None:
        """The agent passes the gateway's EDHOC key pin from the verified redirect; with an
        EDHOC identity every request to that gateway then runs over EDHOC with that key only."""
        if self._edhoc_identity is None:
            return
        base = self._base(gateway_url, self._gateway_override)
        if urlsplit(base).scheme != "coap":
            return
        if fingerprint is None:
            if base in self._edhoc_pins:
                return  # pinned by configuration (edhoc_pins), e.g. a combined test server
            raise NotAuthorized("the redirect names no EDHOC key for the gateway, so it cannot be "
                                "pinned (the owner must claim with cedhoc)")
        if self._edhoc_pins.get(base) != fingerprint:
            self._edhoc_pins[base] = bytes(fingerprint)
            self._edhoc_creds.pop(base, None)  # the next request pins the new key

    async def find_owner(self, rendezvous_url: str, body: bytes) -> bytes:
        return await self._post(self._base(rendezvous_url, self._rendezvous_override), PATHS["find-owner"], body, self._rv_ssl)

    async def gateway(self, gateway_url: str, step: str, body: bytes) -> bytes:
        if step not in ("hello", "prove", "done"):
            raise ValueError(f"unknown gateway step {step!r}")
        return await self._post(self._base(gateway_url, self._gateway_override), PATHS[step], body, self._gw_ssl,
                                capture_peer=True)


def tls_client_context(ca_pem: str | bytes | None) -> ssl.SSLContext:
    """Like the HTTP client's, but our own object: CoAP over TLS negotiates ALPN "coap"."""
    return new_client_context(ca_pem, alpn=["coap"])


def _with_alpn(tls: ssl.SSLContext | None) -> ssl.SSLContext:
    if tls is None:
        raise MalformedMessage("coaps+tcp to the rendezvous needs its CA (rendezvous_ca_pem)")
    return tls


def _peer_cert(resp: aiocoap.Message) -> bytes | None:
    """The TLS certificate of the server that answered (RFC 8323 connection), DER."""
    transport = getattr(resp.remote, "_transport", None)
    ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
    return ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
