"""COSE_Sign1 (RFC 9052 §4.2) with ES256 over cbor2 and `cryptography`.

Only the envelope is written here; ECDSA itself is `cryptography`'s. Signatures are
carried as fixed-size r||s as COSE requires (not DER).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from .errors import BadSignature, MalformedMessage

COSE_SIGN1_TAG = 18
HDR_ALG = 1
HDR_KID = 4
HDR_X5CHAIN = 33
ALG_ES256 = -7
ES256_SIG_LEN = 64


class Signer(Protocol):
    """Anything that holds a P-256 private key (software file, TPM, HSM, remote vault)."""

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign_der(self, data: bytes) -> bytes:
        """ECDSA-SHA256 signature over `data`, DER encoded."""
        ...


class SoftwareSigner:
    def __init__(self, key: ec.EllipticCurvePrivateKey):
        self._key = key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign_der(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


def _sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    return cbor2.dumps(["Signature1", protected, external_aad, payload])


def _der_to_raw(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_to_der(raw: bytes) -> bytes:
    if len(raw) != ES256_SIG_LEN:
        raise BadSignature("signature has the wrong length")
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def sign1(payload: bytes, signer: Signer, *, kid: bytes | None = None,
          x5chain: list[bytes] | None = None, external_aad: bytes = b"") -> bytes:
    """Return a tagged COSE_Sign1 over `payload`."""
    prot: dict[int, Any] = {HDR_ALG: ALG_ES256}
    if kid is not None:
        prot[HDR_KID] = kid
    if x5chain:
        # One cert is a bstr, several an array (RFC 9360).
        prot[HDR_X5CHAIN] = x5chain[0] if len(x5chain) == 1 else list(x5chain)
    protected = cbor2.dumps(prot)
    sig = _der_to_raw(signer.sign_der(_sig_structure(protected, payload, external_aad)))
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, sig]))


@dataclass(frozen=True)
class Sign1:
    """A parsed, not yet verified COSE_Sign1."""
    protected_raw: bytes
    protected: dict
    payload: bytes
    signature: bytes

    @property
    def kid(self) -> bytes | None:
        kid = self.protected.get(HDR_KID)
        return kid if isinstance(kid, bytes) else None

    @property
    def x5chain(self) -> list[bytes]:
        chain = self.protected.get(HDR_X5CHAIN)
        if chain is None:
            return []
        if isinstance(chain, bytes):
            return [chain]
        if isinstance(chain, list) and all(isinstance(c, bytes) for c in chain) and len(chain) <= 4:
            return list(chain)
        raise MalformedMessage("x5chain header must be a certificate or a list of up to 4")

    def verify(self, public_key: ec.EllipticCurvePublicKey, external_aad: bytes = b"") -> bytes:
        """Check the signature with `public_key`; return the payload on success."""
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
            raise BadSignature("signer key is not a P-256 key")
        try:
            public_key.verify(_raw_to_der(self.signature),
                              _sig_structure(self.protected_raw, self.payload, external_aad),
                              ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise BadSignature("signature does not verify") from None
        return self.payload


def parse_sign1(data: bytes, *, max_size: int) -> Sign1:
    """Strictly parse a COSE_Sign1; raises MalformedMessage on anything unexpected."""
    from .codec import loads_bounded

    obj = loads_bounded(data, max_size=max_size)
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != COSE_SIGN1_TAG:
            raise MalformedMessage("not a COSE_Sign1 (wrong tag)")
        obj = obj.value
    if not (isinstance(obj, list) and len(obj) == 4):
        raise MalformedMessage("COSE_Sign1 must be an array of 4")
    protected_raw, unprotected, payload, signature = obj
    if not (isinstance(protected_raw, bytes) and isinstance(unprotected, dict)
            and isinstance(payload, bytes) and isinstance(signature, bytes)):
        raise MalformedMessage("COSE_Sign1 fields have the wrong types")
    try:
        protected = cbor2.loads(protected_raw) if protected_raw else {}
    except Exception:
        raise MalformedMessage("protected header is not CBOR") from None
    if not isinstance(protected, dict) or protected.get(HDR_ALG) != ALG_ES256:
        raise MalformedMessage("only ES256 COSE_Sign1 is accepted")
    return Sign1(protected_raw, protected, payload, signature)
