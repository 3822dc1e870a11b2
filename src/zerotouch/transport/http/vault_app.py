"""HTTP adapter of the vault: every `Vault` method as POST /vault/v1/<op>, CBOR map in and out.

Only the gateway may call it, so two independent checks guard every request:
  * mutual TLS: the client certificate must chain to the owner CA (the TLS context demands it)
    and name CN `zt-gateway`, and, when configured, carry the one key `vault init` issued.
    The CN alone is not enough: the owner CA also issues device LDevIDs with clientAuth, and
    their CN is a serial the manufacturer chose;
  * a bearer token, so a stolen client key alone does not open the vault.
A failed check is 403 (certificate) or 401 (token). Errors the vault raises (NotFound,
MalformedMessage, ...) go through the shared middleware as CBOR ErrorReply with their status,
and RemoteVault turns them back into the same class.
"""
from __future__ import annotations

import hmac
import math
import ssl
from pathlib import Path
from typing import Any

import cbor2
from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID

from ...pki.keys import spki_fingerprint
from ...protocol.codec import MAX_MESSAGE, loads_bounded
from ...protocol.errors import MalformedMessage, NotAuthorized
from .common import CBOR, make_app, read_cbor, server_ssl_context

GATEWAY_CN = "zt-gateway"
PREFIX = "/vault/v1/"
# A signed message must still fit a device's MAX_MESSAGE; the CBOR envelope around the
# payload (or the COSE answer) needs a little room on top.
MAX_BODY = MAX_MESSAGE + 1024
MAX_TEXT = 256

# op -> (Vault method, {argument: type}, result type). One table for server and client, so
# the two cannot drift apart. `float` arguments also accept CBOR integers.
OPS: dict[str, tuple[str, dict[str, type], type]] = {
    "owner-ca-der": ("owner_ca_der", {}, bytes),
    "sign": ("sign", {"payload": bytes, "with_chain": bool}, bytes),
    "put-device-secret": ("put_device_secret", {"serial": str, "n_device": bytes}, type(None)),
    "has-device-secret": ("has_device_secret", {"serial": str}, bool),
    "owner-proof": ("owner_proof", {"serial": str, "nonce": bytes}, bytes),
    "issue-ldevid": ("issue_ldevid", {"csr_der": bytes, "serial": str, "urn": str, "days": float},
                     bytes),
    "issue-certificate": ("issue_certificate", {"csr_der": bytes, "serial": str, "urn": str,
                                                "days": float, "kind": str}, bytes),
    "make-crl": ("make_crl", {"next_update_s": float}, bytes),
    "seal-channel-secret": ("seal_channel_secret", {"serial": str, "seal_key": bytes,
                                                    "session": bytes, "nonce": bytes}, bytes),
    "seal-channel-secret-tpm": ("seal_channel_secret_tpm", {"serial": str, "ek_cert": bytes,
                                                            "session": bytes, "nonce": bytes}, bytes),
    "seal-channel-secret-psk": ("seal_channel_secret_psk", {"serial": str, "wrap_key": bytes,
                                                            "session": bytes, "nonce": bytes}, bytes),
}
OP_OF_METHOD = {method: op for op, (method, _a, _r) in OPS.items()}


def check_value(name: str, value: Any, typ: type) -> Any:
    """Strict type check of one argument or result (bool is not an int, an int may be a float)."""
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MalformedMessage(f"'{name}' must be a finite number")
        return float(value)
    if typ is type(None):
        if value is not None:
            raise MalformedMessage(f"'{name}' must be null")
        return None
    if type(value) is not typ:
        raise MalformedMessage(f"'{name}' must be {typ.__name__}")
    if typ is str and len(value) > MAX_TEXT:
        raise MalformedMessage(f"'{name}' is longer than {MAX_TEXT} characters")
    return value


def decode_args(body: bytes, spec: dict[str, type]) -> dict[str, Any]:
    obj = loads_bounded(body, max_size=MAX_BODY)
    if not isinstance(obj, dict) or any(type(k) is not str for k in obj):
        raise MalformedMessage("vault request must be a CBOR map with text keys")
    if set(obj) != set(spec):
        raise MalformedMessage(f"vault request needs exactly the arguments {sorted(spec)}")
    return {name: check_value(name, obj[name], typ) for name, typ in spec.items()}


def vault_server_ssl_context(cert_file: Path, key_file: Path, client_ca: Path) -> ssl.SSLContext:
    ctx = server_ssl_context(cert_file, key_file, client_ca=client_ca)
    # REQUIRED, not the gateway's OPTIONAL: nothing without an owner-CA client certificate
    # gets past the handshake. Both ends are ours, so there is no old peer to keep TLS 1.2 for.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _forbidden(message: str) -> NotAuthorized:
    return NotAuthorized(message, code="vault_forbidden")


def vault_app(vault, *, token: str, client_cn: str = GATEWAY_CN,
              client_fingerprint: bytes | None = None) -> web.Application:
    if not token:
        raise ValueError("the vault needs a bearer token")
    app = make_app(max_size=MAX_BODY)

    def authenticate(request: web.Request) -> None:
        ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        if der is None:  # plain HTTP or no certificate: never serve secrets like that
            raise _forbidden("the vault requires a TLS client certificate")
        cert = x509.load_der_x509_certificate(der)
        cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [client_cn]:
            raise _forbidden("client certificate does not name the gateway")
        if client_fingerprint is not None and not hmac.compare_digest(
                spki_fingerprint(cert.public_key()), client_fingerprint):
            raise _forbidden("client certificate is not the gateway's")
        auth = request.headers.get("Authorization", "")
        if not (auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].encode(), token.encode())):
            raise NotAuthorized("vault token required (Authorization: Bearer ...)", status=401,
                                code="vault_unauthorized")

    def route(method: str, spec: dict[str, type]):
        call = getattr(vault, method)

        async def handler(request: web.Request) -> web.Response:
            authenticate(request)  # before the body is even read
            args = decode_args(await read_cbor(request, max_size=MAX_BODY), spec)
            result = await call(**args)
            return web.Response(body=cbor2.dumps({"result": result}), content_type=CBOR)
        return handler

    for op, (method, spec, _result) in OPS.items():
        app.router.add_post(PREFIX + op, route(method, spec))
    return app
