"""EST (RFC 7030, with the RFC 8951 clarifications) as pure code over bytes: no sockets, no clock.

What travels: a base64 PKCS#10 CSR in (`application/pkcs10`); a base64 certs-only PKCS#7 out
(`application/pkcs7-mime; smime-type=certs-only`); a base64 DER `CsrAttrs` for csrattrs; a
`multipart/mixed` of a PKCS#8 key and a certs-only PKCS#7 for serverkeygen. RFC 8951 settles
that every body is base64 whatever `Content-Transfer-Encoding` says, so that header is sent
(old clients look for it) but never needed on input.

The enrollment policy's CSR check lives here too: it is pure code over the CSR's bytes.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
import dataclasses
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from ..pki.ca import csr_signature_valid
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ
from pyasn1_modules import rfc7030

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from .errors import MalformedMessage, MessageTooLarge, RemoteError

PKCS10 = "application/pkcs10"
PKCS7_CERTS = "application/pkcs7-mime; smime-type=certs-only"
CSRATTRS = "application/csrattrs"
PKCS8 = "application/pkcs8"
MULTIPART = "multipart/mixed"
WELL_KNOWN = "/.well-known/est"

# operation -> HTTP method (RFC 7030 §3.2.2). fullcmc is not offered.
OPERATIONS = {"cacerts": "GET", "simpleenroll": "POST", "simplereenroll": "POST",
              "csrattrs": "GET", "serverkeygen": "POST"}
MAX_BODY = 64 * 1024        # a CSR with an RSA-8192 key is ~3 KB of base64; room for attributes
_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # RFC 7030 §3.2.2: one path segment
_B64_CHARS = re.compile(rb"[A-Za-z0-9+/]*={0,2}")

# OIDs used in CSR attributes (RFC 5480, RFC 5758, RFC 2985)
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"
CURVE_OIDS = {"secp256r1": "1.2.840.10045.3.1.7", "secp384r1": "1.3.132.0.34"}
SIGNATURE_OIDS = {"ecdsa-with-SHA256": "1.2.840.10045.4.3.2",
                  "ecdsa-with-SHA384": "1.2.840.10045.4.3.3",
                  "sha256WithRSAEncryption": "1.2.840.113549.1.1.11"}


def check_label(label: str) -> str:
    if not _LABEL.fullmatch(label) or label in (".", ".."):
        raise MalformedMessage("EST label must be 1-64 letters, digits, '-', '_' or '.'")
    return label


# --- base64 bodies ---------------------------------------------------------------------------
def decode_body(body: bytes, *, max_size: int = MAX_BODY) -> bytes:
    """A base64 body: line breaks (CR/LF) allowed anywhere, nothing else but the alphabet."""
    if len(body) > max_size:
        raise MessageTooLarge(f"EST body exceeds {max_size} bytes")
    compact = body.replace(b"\r", b"").replace(b"\n", b"")
    if not compact:
        raise MalformedMessage("EST body is empty: send the DER, base64-encoded")
    # The alphabet check first: b64decode(validate=True) still accepts some oddities we refuse
    # (and a binary DER body sent by mistake fails here with a clear message).
    if not _B64_CHARS.fullmatch(compact) or len(compact) % 4:
        raise MalformedMessage("EST body is not base64 (RFC 7030 bodies are base64-encoded DER)")
    try:
        return base64.b64decode(compact, validate=True)
    except binascii.Error:
        raise MalformedMessage("EST body is not valid base64") from None


def encode_body(der: bytes, *, newline: bytes = b"\n") -> bytes:
    """base64 in 64-character lines. LF by default: `base64 -d` refuses CR."""
    text = base64.b64encode(der)
    return b"".join(text[i:i + 64] + newline for i in range(0, len(text), 64))


# --- certs-only PKCS#7 -----------------------------------------------------------------------
def certs_only(certs: list[x509.Certificate]) -> bytes:
    """A degenerate (certs-only) CMS SignedData, DER."""
    if not certs:
        raise ValueError("a certs-only response needs at least one certificate")
    return pkcs7.serialize_certificates(certs, Encoding.DER)


def parse_certs_only(der: bytes) -> list[x509.Certificate]:
    try:
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except ValueError:
        raise MalformedMessage("not a DER certs-only PKCS#7") from None
    if not certs:
        raise MalformedMessage("certs-only PKCS#7 carries no certificate")
    return certs


# --- CSR attributes --------------------------------------------------------------------------
@dataclass(frozen=True)
class CsrAttr:
    """One AttrOrOID: a bare OID, or an attribute type with values (DER of each value)."""
    oid: str
    values: tuple[bytes, ...] | None = None


def oid_value(oid: str) -> bytes:
    """DER of an OBJECT IDENTIFIER, for use as an attribute value."""
    return der_encoder.encode(univ.ObjectIdentifier(oid))


def encode_csr_attrs(items: list[CsrAttr]) -> bytes:
    attrs = rfc7030.CsrAttrs()
    for i, item in enumerate(items):
        choice = rfc7030.AttrOrOID()
        if item.values is None:
            choice["oid"] = univ.ObjectIdentifier(item.oid)
        else:
            attr = rfc7030.Attribute()
            attr["attrType"] = univ.ObjectIdentifier(item.oid)
            for j, value in enumerate(item.values):
                attr["attrValues"][j] = univ.Any(value)
            choice["attribute"] = attr
        attrs[i] = choice
    return der_encoder.encode(attrs)


def decode_csr_attrs(der: bytes) -> list[CsrAttr]:
    try:
        parsed, rest = der_decoder.decode(der, asn1Spec=rfc7030.CsrAttrs())
    except PyAsn1Error:
        raise MalformedMessage("not a DER CsrAttrs") from None
    if rest:
        raise MalformedMessage("trailing bytes after CsrAttrs")
    out = []
    for choice in parsed:
        if choice.getName() == "oid":
            out.append(CsrAttr(str(choice["oid"])))
        else:
            attr = choice["attribute"]
            out.append(CsrAttr(str(attr["attrType"]), tuple(bytes(v) for v in attr["attrValues"])))
    return out


def csr_attrs_for(key_types: list[str]) -> list[CsrAttr]:
    """What we ask of a CSR: the preferred (first) allowed key type and its signature.

    An EC key is asked for as id-ecPublicKey with the curve as the attribute value, as in
    RFC 7030 §4.5.2's example; RSA as rsaEncryption with sha256WithRSAEncryption.
    """
    first = key_types[0]
    if first in ("P-256", "P-384"):
        curve = "secp256r1" if first == "P-256" else "secp384r1"
        sig = "ecdsa-with-SHA256" if first == "P-256" else "ecdsa-with-SHA384"
        return [CsrAttr(OID_EC_PUBLIC_KEY, (oid_value(CURVE_OIDS[curve]),)),
                CsrAttr(SIGNATURE_OIDS[sig])]
    return [CsrAttr(OID_RSA_ENCRYPTION), CsrAttr(SIGNATURE_OIDS["sha256WithRSAEncryption"])]


# --- serverkeygen multipart ------------------------------------------------------------------
def serverkeygen_body(key_pkcs8_der: bytes, certs: list[x509.Certificate]) -> tuple[str, bytes]:
    """(Content-Type with boundary, body) per RFC 7030 §4.4.2: the key part, then the cert part.

    The boundary is derived from the content and contains '-', which base64 never does, so it
    cannot occur inside a part (and no randomness is needed here).
    """
    cert_part = encode_body(certs_only(certs), newline=b"\r\n")
    key_part = encode_body(key_pkcs8_der, newline=b"\r\n")
    boundary = "est-" + hashlib.sha256(key_part + cert_part).hexdigest()[:24]
    b = boundary.encode()
    body = (b"--" + b + b"\r\nContent-Type: " + PKCS8.encode()
            + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + key_part
            + b"--" + b + b"\r\nContent-Type: " + PKCS7_CERTS.encode()
            + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + cert_part
            + b"--" + b + b"--\r\n")
    return f"{MULTIPART}; boundary={boundary}", body


def parse_serverkeygen(content_type: str, body: bytes) -> tuple[bytes, list[x509.Certificate]]:
    """Client side of serverkeygen: (PKCS#8 DER, certificates)."""
    import email.parser
    import email.policy
    if len(body) > MAX_BODY:
        raise MessageTooLarge(f"serverkeygen response exceeds {MAX_BODY} bytes")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise MalformedMessage("serverkeygen response is not multipart/mixed")
    key = certs = None
    for part in msg.iter_parts():
        raw = part.get_payload(decode=False).encode("ascii", "replace")
        if part.get_content_type() == PKCS8:
            key = decode_body(raw)
        elif part.get_content_type() == "application/pkcs7-mime":
            certs = parse_certs_only(decode_body(raw))
    if key is None or certs is None:
        raise MalformedMessage("serverkeygen response needs an application/pkcs8 and a "
                               "certs-only application/pkcs7-mime part")
    return key, certs


# --- enrollment policy -----------------------------------------------------------------------
KEY_TYPES = ("P-256", "P-384", "RSA")
CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}


class PolicyViolation(RemoteError):
    code = "policy"


@dataclass(frozen=True)
class EnrollmentPolicy:
    """What a device may get. Extended key usage is always clientAuth (the vault sets it)."""
    key_types: tuple[str, ...] = KEY_TYPES
    rsa_min_bits: int = 2048
    ldevid_days: float = 30.0
    operational_days: float = 1.0
    manual_approval: bool = False

    def __post_init__(self):
        if not self.key_types or set(self.key_types) - set(KEY_TYPES):
            raise ValueError(f"key_types must be a non-empty list of {', '.join(KEY_TYPES)}")
        if int(self.rsa_min_bits) < 2048:
            raise ValueError("rsa_min_bits must be at least 2048")
        for days in (self.ldevid_days, self.operational_days):
            if not 0 < float(days) <= 825:
                raise ValueError("validity must be more than 0 and at most 825 days")

    @classmethod
    def from_dict(cls, data: dict, base: "EnrollmentPolicy | None" = None) -> "EnrollmentPolicy":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - names:
            raise ValueError(f"EST policy keys are {sorted(names)}, got {data!r}")
        if "key_types" in data:
            data = {**data, "key_types": tuple(data["key_types"])}
        return dataclasses.replace(base or cls(), **data)

    def days_for(self, kind: str) -> float:
        return self.operational_days if kind == "operational" else self.ldevid_days

    def allowed(self) -> str:
        return ", ".join(f"RSA >= {self.rsa_min_bits}" if k == "RSA" else k for k in self.key_types)

    def check_key(self, pub) -> None:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            if CURVES.get(pub.curve.name) not in self.key_types:
                raise PolicyViolation(f"CSR key is on curve {pub.curve.name}, which the enrollment "
                                      f"policy does not allow (allowed: {self.allowed()})")
        elif isinstance(pub, rsa.RSAPublicKey):
            if "RSA" not in self.key_types or pub.key_size < self.rsa_min_bits:
                raise PolicyViolation(f"CSR key is RSA of {pub.key_size} bits, which the enrollment "
                                      f"policy does not allow (allowed: {self.allowed()})")
        else:
            kind = type(pub).__name__.removesuffix("PublicKey")
            raise PolicyViolation(f"CSR key is {kind}, which the enrollment policy does not allow "
                                  f"(allowed: {self.allowed()})")

    def check_csr(self, csr_der: bytes) -> x509.CertificateSigningRequest:
        """Proof of possession, key type, and no request for more than a client certificate."""
        try:
            csr = x509.load_der_x509_csr(csr_der)
            pub = csr.public_key()
        except (ValueError, UnsupportedAlgorithm):
            raise MalformedMessage("body is not a DER PKCS#10 CSR with a supported key") from None
        self.check_key(pub)
        if not csr_signature_valid(csr_der):
            raise MalformedMessage("CSR signature does not verify: no proof of possession of its key")
        try:
            exts = csr.extensions
        except ValueError:
            raise MalformedMessage("CSR extension request does not parse") from None
        for ext in exts:
            if isinstance(ext.value, x509.ExtendedKeyUsage) and \
                    set(ext.value) - {ExtendedKeyUsageOID.CLIENT_AUTH}:
                raise PolicyViolation("CSR asks for an extended key usage other than clientAuth, "
                                      "the only one this policy issues")
            if isinstance(ext.value, x509.BasicConstraints) and ext.value.ca:
                raise PolicyViolation("CSR asks for a CA certificate; devices get end-entity ones")
        return csr
