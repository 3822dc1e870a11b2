"""Endorsement-key certificates: is this EK from a TPM maker the owner trusts?

EK certificates are not TLS certificates (TCG EK profile: no subject, a critical SAN with the
TPM maker's directoryName, the tcg-kp-EKCertificate EKU), so `cryptography`'s X.509 path
validation, built for the web PKI, refuses them. The chain is walked here instead: each link's
signature and issuer/subject names, CA basic constraints with keyCertSign on every issuer,
validity periods, and a trusted root at the end. Signatures are checked by `cryptography`.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MAX_DEPTH = 4


class EkCertificateError(ValueError):
    """The EK certificate does not chain to a trusted TPM maker (or is malformed/expired)."""


def ek_key_id(ek_cert: x509.Certificate) -> bytes:
    """SHA-256 of the EK's SubjectPublicKeyInfo: how an IDevID names its TPM."""
    return hashlib.sha256(ek_cert.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.key_cert_sign


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)  # issuer name == subject name, and signature
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


@dataclass
class EkVerifier:
    """Trusted TPM maker roots plus the intermediates the owner has been given (a real maker
    publishes them; swtpm's local CA has one)."""
    roots: list[x509.Certificate]
    intermediates: list[x509.Certificate] = field(default_factory=list)

    @classmethod
    def from_pem(cls, roots_pem: list[bytes], intermediates_pem: list[bytes] = ()) -> "EkVerifier":
        roots = [c for p in roots_pem for c in x509.load_pem_x509_certificates(p)]
        inters = [c for p in intermediates_pem for c in x509.load_pem_x509_certificates(p)]
        return cls(roots, inters)

    def verify(self, ek_der: bytes, *, now: dt.datetime | None = None) -> x509.Certificate:
        """The EK certificate, if it chains to a trusted root; else EkCertificateError."""
        try:
            ek = x509.load_der_x509_certificate(ek_der)
        except (ValueError, x509.InvalidVersion):
            raise EkCertificateError("EK certificate is not DER X.509") from None
        now = now or dt.datetime.now(dt.timezone.utc)
        if not _valid_at(ek, now):
            raise EkCertificateError("EK certificate is outside its validity period")
        if not self.roots:
            raise EkCertificateError("no TPM manufacturer roots are trusted by this gateway")
        if self._chains(ek, now, depth=0):
            return ek
        raise EkCertificateError(
            f"EK certificate (issuer {ek.issuer.rfc4514_string() or 'empty'}) does not chain to a "
            "trusted TPM manufacturer root")

    def _chains(self, cert: x509.Certificate, now: dt.datetime, depth: int) -> bool:
        if depth > MAX_DEPTH:
            return False
        for root in self.roots:
            if _is_ca(root) and _valid_at(root, now) and _signed_by(cert, root):
                return True
        for inter in self.intermediates:
            if inter == cert or not _is_ca(inter) or not _valid_at(inter, now):
                continue
            if _signed_by(cert, inter) and self._chains(inter, now, depth + 1):
                return True
        return False
