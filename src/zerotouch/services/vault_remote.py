"""The gateway's side of a separate vault: the `Vault` protocol over mutual TLS (vault_app.py).

One kept-alive aiohttp session: a vault call sits on every onboarding step, so a TLS handshake
per call would double the gateway's latency. Errors come back as the class the vault raised
(same status, code and message), so the gateway behaves exactly as with a LocalVault. Two
failures are the gateway's own and never the device's: the vault refusing our credentials
(VaultRefused, 500) and the vault being unreachable (VaultUnavailable, 503 with Retry-After,
so devices back off and come again). Their messages stay generic because the gateway's
middleware echoes a ProtocolError's message to the device; the details go to the log.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import cbor2

from ..protocol.codec import loads_bounded
from ..protocol.errors import (BadSignature, Conflict, LocalError, MalformedMessage,
                               MessageTooLarge, NotAuthorized, NotFound, ProtocolError,
                               RemoteError, StaleMessage, TryLater)
from ..protocol.messages import ErrorReply
from ..transport.http.vault_app import MAX_BODY, OPS, OP_OF_METHOD, PREFIX, check_value
from ..util.files import read_json

CBOR = "application/cbor"
AUTH_CODES = ("vault_unauthorized", "vault_forbidden")
log = logging.getLogger("zerotouch.vault.remote")


class VaultRefused(LocalError):
    """The vault refused the gateway's token or client certificate: a set-up fault here."""
    code = "vault_refused"

    def __init__(self, message: str, *, vault_status: int):
        super().__init__(message)
        self.vault_status = vault_status


class VaultUnavailable(LocalError):
    status = 503
    code = "vault_unavailable"


# The vault's errors by code; a custom code (NotAuthorized(code="revoked"), ...) by status.
_BY_CODE: dict[str, type[ProtocolError]] = {c.code: c for c in (
    MalformedMessage, MessageTooLarge, BadSignature, StaleMessage, NotAuthorized, NotFound,
    Conflict, TryLater, LocalError)}
_BY_CODE["bad_request"] = RemoteError
_BY_STATUS: dict[int, type[ProtocolError]] = {
    400: MalformedMessage, 401: BadSignature, 403: NotAuthorized, 404: NotFound, 409: Conflict,
    413: MessageTooLarge, 503: TryLater}


def error_from_reply(status: int, body: bytes, headers) -> ProtocolError:
    code, message, retry_after = "http_error", f"vault answered HTTP {status}", None
    try:
        reply = ErrorReply.decode(body, max_size=4096)
        code, message, retry_after = reply.code, reply.message, reply.retry_after
    except ProtocolError:  # not from our middleware (a 500, a proxy, a missing route)
        pass
    if retry_after is None and str(headers.get("Retry-After", "")).isdigit():
        retry_after = int(headers["Retry-After"])
    if code in AUTH_CODES:
        log.error("the vault refused this gateway (HTTP %s): %s", status, message)
        return VaultRefused("the owner vault refused the gateway", vault_status=status)
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or (LocalError if status >= 500 else RemoteError)
    return cls(message, status=status, code=code, retry_after=retry_after)


def client_context(ca_pem: str | bytes, client_cert: str | Path, client_key: str | Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # pinned owner CA only, no system store
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=ca_pem.decode() if isinstance(ca_pem, bytes) else ca_pem)
    ctx.load_cert_chain(str(client_cert), str(client_key))
    return ctx


class RemoteVault:
    """`Vault` over HTTPS. Call `close()` when done (RunningGateway.close does)."""

    def __init__(self, url: str, *, ca_pem: str | bytes, client_cert: str | Path,
                 client_key: str | Path, token: str, timeout: float = 15.0):
        self.url = url.rstrip("/")
        self._ssl = client_context(ca_pem, client_cert, client_key)
        self._headers = {"Content-Type": CBOR, "Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_gateway_dir(cls, gateway_dir: Path, url: str | None = None) -> "RemoteVault":
        """What `vault init` wrote into GATEWAY_DIR/vault/service.json."""
        svc = read_json(Path(gateway_dir) / "vault" / "service.json")
        return cls(url or svc["url"], ca_pem=Path(svc["ca_cert"]).read_text(),
                   client_cert=svc["client_cert"], client_key=svc["client_key"],
                   token=Path(svc["token_file"]).read_text().strip())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, **args: Any) -> Any:
        op = OP_OF_METHOD[method]
        _m, _spec, result_type = OPS[op]
        if self._session is None:  # created here: a ClientSession wants a running loop
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(ssl=self._ssl))
        body = cbor2.dumps(args)
        try:
            async with self._session.post(self.url + PREFIX + op, data=body,
                                          headers=self._headers) as resp:
                data = await resp.content.read(MAX_BODY + 1)
                status, headers = resp.status, resp.headers
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            # TLS refusal (no or wrong client certificate) also lands here: under TLS 1.3 the
            # server's alert arrives after the client thinks the handshake is done.
            log.warning("vault at %s is unreachable (or refused our certificate): %r", self.url, exc)
            raise VaultUnavailable("the owner vault is unavailable", retry_after=5) from exc
        if len(data) > MAX_BODY:
            log.error("vault answered %s with more than %d bytes", op, MAX_BODY)
            raise LocalError("internal error")
        if status != 200:
            raise error_from_reply(status, data, headers)
        try:
            obj = loads_bounded(data, max_size=MAX_BODY)
            if not (isinstance(obj, dict) and set(obj) == {"result"}):
                raise MalformedMessage("not a result map")
            return check_value("result", obj["result"], result_type)
        except ProtocolError as exc:  # a vault that answers nonsense is our fault, not the device's
            log.error("vault answered %s with a malformed reply: %s", op, exc.message)
            raise LocalError("internal error") from None

    async def owner_ca_der(self) -> bytes:
        return await self._call("owner_ca_der")

    async def sign(self, payload: bytes, with_chain: bool = True) -> bytes:
        return await self._call("sign", payload=payload, with_chain=with_chain)

    async def put_device_secret(self, serial: str, n_device: bytes) -> None:
        await self._call("put_device_secret", serial=serial, n_device=n_device)

    async def has_device_secret(self, serial: str) -> bool:
        return await self._call("has_device_secret", serial=serial)

    async def owner_proof(self, serial: str, nonce: bytes) -> bytes:
        return await self._call("owner_proof", serial=serial, nonce=nonce)

    async def issue_ldevid(self, csr_der: bytes, serial: str, urn: str, days: float) -> bytes:
        return await self._call("issue_ldevid", csr_der=csr_der, serial=serial, urn=urn,
                                days=float(days))

    async def issue_certificate(self, csr_der: bytes, serial: str, urn: str, days: float,
                                kind: str) -> bytes:
        return await self._call("issue_certificate", csr_der=csr_der, serial=serial, urn=urn,
                                days=float(days), kind=kind)

    async def make_crl(self, next_update_s: float) -> bytes:
        return await self._call("make_crl", next_update_s=float(next_update_s))

    async def seal_channel_secret(self, serial: str, *, seal_key: bytes, session: bytes,
                                  nonce: bytes) -> bytes:
        return await self._call("seal_channel_secret", serial=serial, seal_key=seal_key,
                                session=session, nonce=nonce)

    async def seal_channel_secret_tpm(self, serial: str, *, ek_cert: bytes, session: bytes,
                                      nonce: bytes) -> bytes:
        return await self._call("seal_channel_secret_tpm", serial=serial, ek_cert=ek_cert,
                                session=session, nonce=nonce)

    async def seal_channel_secret_psk(self, serial: str, *, wrap_key: bytes, session: bytes,
                                      nonce: bytes) -> bytes:
        return await self._call("seal_channel_secret_psk", serial=serial, wrap_key=wrap_key,
                                session=session, nonce=nonce)
