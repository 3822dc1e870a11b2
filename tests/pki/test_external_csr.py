"""PKCS#10 built around an external signer (software key standing in for the TPM)."""
from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from zerotouch.pki.external_csr import build_csr

SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SN-42"),
                     x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-42")])
SAN = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:dev:sn:SN-42")])


def _signer(key):
    return lambda data: key.sign(data, ec.ECDSA(hashes.SHA256()))


def test_csr_is_valid_and_carries_subject_key_and_extensions():
    key = ec.generate_private_key(ec.SECP256R1())
    ku = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=False,
                       crl_sign=False, encipher_only=False, decipher_only=False)
    der = build_csr(SUBJECT, key.public_key(), _signer(key), [SAN, ku])
    csr = x509.load_der_x509_csr(der)
    assert csr.is_signature_valid
    assert csr.subject == SUBJECT
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()
    assert csr.signature_hash_algorithm.name == "sha256"
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == SAN
    ext = csr.extensions.get_extension_for_class(x509.KeyUsage)
    assert ext.critical and ext.value == ku


def test_same_bytes_as_cryptography_builder_without_extensions():
    """The to-be-signed part matches what cryptography itself would build."""
    key = ec.generate_private_key(ec.SECP256R1())
    ours = x509.load_der_x509_csr(build_csr(SUBJECT, key.public_key(), _signer(key), [SAN]))
    theirs = (x509.CertificateSigningRequestBuilder().subject_name(SUBJECT)
              .add_extension(SAN, critical=False).sign(key, hashes.SHA256()))
    assert ours.tbs_certrequest_bytes == theirs.tbs_certrequest_bytes


def test_wrong_signer_gives_invalid_csr():
    key, other = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    csr = x509.load_der_x509_csr(build_csr(SUBJECT, key.public_key(), _signer(other)))
    assert not csr.is_signature_valid


def test_garbage_signature_gives_invalid_csr():
    key = ec.generate_private_key(ec.SECP256R1())
    good = _signer(key)
    csr = x509.load_der_x509_csr(build_csr(SUBJECT, key.public_key(),
                                           lambda d: good(d + b"tampered")))
    assert not csr.is_signature_valid
