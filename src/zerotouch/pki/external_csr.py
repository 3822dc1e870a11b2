"""PKCS#10 certificate requests signed by a key we cannot hold: TPM, HSM, remote signer.

`cryptography`'s CertificateSigningRequestBuilder needs the private key object, so for a
TPM-resident key the CertificationRequestInfo (RFC 2986) is assembled here with pyasn1-modules
from DER pieces cryptography produces (Name, SubjectPublicKeyInfo, extension values), the
callback signs its DER (ECDSA with SHA-256), and the result is a CSR any CA parses.
Pure: no TPM import.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ
from pyasn1_modules import rfc2986, rfc5280

ECDSA_WITH_SHA256 = univ.ObjectIdentifier("1.2.840.10045.4.3.2")
EXTENSION_REQUEST = univ.ObjectIdentifier("1.2.840.113549.1.9.14")  # PKCS#9 extensionRequest

# Critical when given as a bare ExtensionType (as CAs and RFC 5280 expect them).
_CRITICAL_BY_DEFAULT = (x509.BasicConstraints, x509.KeyUsage)


def _decode(der: bytes, spec):
    value, rest = der_decoder.decode(der, asn1Spec=spec)
    if rest:
        raise ValueError("trailing bytes after DER value")
    return value


def _extensions(extensions: Iterable[x509.ExtensionType | x509.Extension]) -> rfc5280.Extensions:
    out = rfc5280.Extensions()
    for ext in extensions:
        if isinstance(ext, x509.Extension):
            value, critical = ext.value, ext.critical
        else:
            value, critical = ext, isinstance(ext, _CRITICAL_BY_DEFAULT)
        e = rfc5280.Extension()
        e["extnID"] = univ.ObjectIdentifier(value.oid.dotted_string)
        e["critical"] = critical
        e["extnValue"] = value.public_bytes()  # the extension's DER, from cryptography
        out.append(e)
    return out


def certification_request_info(subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
                               extensions: Iterable = ()) -> bytes:
    """DER of the CertificationRequestInfo: the bytes the key signs."""
    info = rfc2986.CertificationRequestInfo()
    info["version"] = 0
    info["subject"] = _decode(subject.public_bytes(), rfc5280.Name())
    info["subjectPKInfo"] = _decode(
        public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        rfc2986.SubjectPublicKeyInfo())
    attributes = info["attributes"]  # [0] IMPLICIT SET OF Attribute; empty is valid
    extensions = list(extensions)
    if extensions:
        attr = rfc2986.Attribute()
        attr["type"] = EXTENSION_REQUEST
        attr["values"].append(univ.Any(der_encoder.encode(_extensions(extensions))))
        attributes.append(attr)
    return der_encoder.encode(info)


def build_csr(subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
              sign_der: Callable[[bytes], bytes], extensions: Iterable = ()) -> bytes:
    """A DER PKCS#10 request; ``sign_der(data)`` returns ECDSA-SHA256 over data, DER encoded.

    Extensions may be ``x509.ExtensionType`` (critical for BasicConstraints and KeyUsage only)
    or ``x509.Extension`` (its own critical flag).
    """
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise TypeError("only EC keys (ECDSA with SHA-256) are supported")
    info_der = certification_request_info(subject, public_key, extensions)
    csr = rfc2986.CertificationRequest()
    csr["certificationRequestInfo"] = _decode(info_der, rfc2986.CertificationRequestInfo())
    csr["signatureAlgorithm"]["algorithm"] = ECDSA_WITH_SHA256  # parameters absent (RFC 5758)
    csr["signature"] = univ.BitString.fromOctetString(sign_der(info_der))
    return der_encoder.encode(csr)
