"""A small certificate authority and chain checks, all on `cryptography`.

Used for the manufacturer CA (IDevIDs), the owner CA (LDevIDs, terminus and gateway TLS)
and the rendezvous TLS certificate.
"""
from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..protocol.errors import NotAuthorized, MalformedMessage

DEVICE_URN_PREFIX = "urn:dev:zerotouch:"


def _name(common_name: str, org: str | None = None, serial: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if serial:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attrs)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_root(key: ec.EllipticCurvePrivateKey, common_name: str, *, org: str | None = None,
              days: int = 3650) -> x509.Certificate:
    name = _name(common_name, org)
    now = _now()
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


@dataclass
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def _builder(self, subject: x509.Name, public_key, days: float) -> x509.CertificateBuilder:
        now = _now()
        return (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(self.cert.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))

    def issue_device(self, public_key, *, serial: str, urn: str, org: str | None = None,
                     days: float = 365 * 20, model: str | None = None,
                     extra_sans: list[x509.GeneralName] = ()) -> x509.Certificate:
        """IDevID / LDevID: device serial in the subject, device URN in the SAN (802.1AR).
        `model`: the device type, as the subject's OU (the gateway picks its PCR policy by it);
        `extra_sans`: e.g. the hardwareModuleName naming the device's TPM (pki/hwmodule.py)."""
        subject = _name(serial, org, serial)
        if model:
            subject = x509.Name(list(subject) + [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, model)])
        b = self._builder(subject, public_key, days)
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(urn),
                                                         *extra_sans]), critical=False)
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, key_cert_sign=False, crl_sign=False,
                                          encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return b.sign(self.key, hashes.SHA256())

    def issue_server(self, public_key, *, common_name: str, hosts: list[str],
                     days: float = 825) -> x509.Certificate:
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        b = self._builder(_name(common_name), public_key, days)
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                   ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return b.sign(self.key, hashes.SHA256())


REASONS = {r.value: r for r in x509.ReasonFlags}  # RFC 5280 names (keyCompromise...)


def make_crl(ca: "CertificateAuthority", entries: list[tuple[int, float, str]], *,
             next_update_s: float, number: int) -> x509.CertificateRevocationList:
    """A CRL over (serial number, revoked-at epoch, reason name) entries."""
    now = _now()
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
         .last_update(now - dt.timedelta(minutes=5))
         .next_update(now + dt.timedelta(seconds=next_update_s))
         .add_extension(x509.CRLNumber(number), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                        critical=False))
    for serial, revoked_at, reason in entries:
        rb = (x509.RevokedCertificateBuilder().serial_number(serial)
              .revocation_date(dt.datetime.fromtimestamp(revoked_at, dt.timezone.utc)))
        flag = REASONS.get(reason)
        if flag is not None and flag is not x509.ReasonFlags.unspecified:
            rb = rb.add_extension(x509.CRLReason(flag), critical=False)
        b = b.add_revoked_certificate(rb.build())
    return b.sign(ca.key, hashes.SHA256())


def device_identity(cert: x509.Certificate) -> tuple[str, str]:
    """(serial, urn) named by a device certificate."""
    serials = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if not serials:
        raise MalformedMessage("device certificate has no serialNumber in its subject")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        urns = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
                if u.startswith(DEVICE_URN_PREFIX)]
    except x509.ExtensionNotFound:
        urns = []
    if not urns:
        raise MalformedMessage("device certificate has no device URN")
    return str(serials[0].value), urns[0]


def load_der_cert(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):
        raise MalformedMessage("not a DER X.509 certificate") from None


def public_key_of(cert: x509.Certificate):
    """The certificate's key, or a 4xx error when it does not parse (untrusted input)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    try:
        return cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise MalformedMessage("certificate key does not parse or is not supported") from None


@functools.lru_cache(maxsize=32)
def _client_verifier(anchors: tuple[x509.Certificate, ...], at_second: int):
    """Building a verifier costs as much as using it: share one per trust store and second."""
    from cryptography.x509.verification import PolicyBuilder, Store
    return (PolicyBuilder().store(Store(list(anchors)))
            .time(dt.datetime.fromtimestamp(at_second, dt.timezone.utc)).build_client_verifier())


@functools.lru_cache(maxsize=256)
def csr_signature_valid(csr_der: bytes) -> bool:
    """Proof of possession of a CSR's key; remembered, since the EST policy and the vault in the
    same process both check the same request."""
    from cryptography.exceptions import UnsupportedAlgorithm
    try:
        return x509.load_der_x509_csr(csr_der).is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        return False


def verify_device_chain(leaf: x509.Certificate, anchors: list[x509.Certificate],
                        now: dt.datetime | None = None) -> None:
    """Check that `leaf` is a valid client certificate issued by one of `anchors`.

    Uses cryptography's RFC 5280 path validation (signature, validity, CA constraints).
    """
    from cryptography.x509.verification import VerificationError

    if not anchors:
        raise NotAuthorized("no trusted manufacturer CA is configured")
    when = now or _now()
    verifier = _client_verifier(tuple(anchors), int(when.timestamp()))
    try:
        verifier.verify(leaf, [])
    except VerificationError as exc:
        raise NotAuthorized(f"device certificate is not trusted: {exc}") from None
    except ValueError as exc:  # a certificate the verifier cannot even parse (bad subject...)
        raise MalformedMessage(f"device certificate is malformed: {exc}") from None
