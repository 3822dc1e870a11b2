"""Key generation, storage with owner-only permissions, fingerprints."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..util.files import atomic_write


def generate_p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key, passphrase: bytes | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(passphrase) if passphrase
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def save_private_key(path: Path, key, passphrase: bytes | None = None) -> None:
    atomic_write(Path(path), private_key_pem(key, passphrase), mode=0o600)


def load_private_key(path: Path, passphrase: bytes | None = None):
    return serialization.load_pem_private_key(Path(path).read_bytes(), password=passphrase)


def public_key_der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_pem(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key_pem(data: bytes):
    return serialization.load_pem_public_key(data)


def spki_fingerprint(public_key) -> bytes:
    """SHA-256 over the DER SubjectPublicKeyInfo: the form every key pin takes here."""
    return hashlib.sha256(public_key_der(public_key)).digest()


def cert_fingerprint(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def save_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write(Path(path), cert_pem(cert), mode=0o644)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def owner_only(path: Path) -> bool:
    return (os.stat(path).st_mode & 0o077) == 0
