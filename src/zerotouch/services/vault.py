"""The vault: owner keys and device secrets. Reachable only from the gateway.

It holds the owner key (which is also the owner CA key: the pin a device receives is the
fingerprint of this key), N_device of every inventory device, and the channel secrets.
N_device never leaves the vault: the gateway asks for an owner proof or a sealed secret.
Private keys are PEM-encrypted with the vault key; secrets in the database are AES-GCM
encrypted with a key derived from it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..pki.ca import CertificateAuthority, csr_signature_valid, make_crl, make_root
from ..pki.keys import (cert_der, generate_p256, load_cert, load_private_key, save_cert,
                        save_private_key, spki_fingerprint)
from ..protocol import cose
from ..protocol.errors import NotFound, MalformedMessage
from ..protocol.proofs import owner_proof
from ..protocol.sealing import seal_secret, sealed_plaintext
from ..storage.base import CertRepo, SecretRepo
from ..util.files import atomic_write

CERT_KINDS = ("ldevid", "operational", "idevid")
OWNER_KEY = "owner.key"
OWNER_CA = "owner-ca.pem"
VAULT_KEY = "vault.key"
VAULT_KEY_ENV = "ZT_VAULT_KEY"


class Vault(Protocol):
    """What the gateway may ask of the vault. Every method is safe to expose over a wire."""

    async def owner_ca_der(self) -> bytes: ...

    async def sign(self, payload: bytes, with_chain: bool = True) -> bytes:
        """COSE_Sign1 by the owner key, with the owner CA certificate in x5chain unless the
        receiver already has it (with_chain=False: a constrained device saves ~440 bytes)."""

    async def put_device_secret(self, serial: str, n_device: bytes) -> None: ...

    async def has_device_secret(self, serial: str) -> bool: ...

    async def owner_proof(self, serial: str, nonce: bytes) -> bytes: ...

    async def issue_ldevid(self, csr_der: bytes, serial: str, urn: str, days: float) -> bytes: ...

    async def issue_certificate(self, csr_der: bytes, serial: str, urn: str, days: float,
                                kind: str) -> bytes:
        """A device certificate from the owner CA: subject and SAN from our records, the key
        from the CSR (proof of possession checked), recorded with its kind."""

    async def make_crl(self, next_update_s: float) -> bytes:
        """A CRL (DER) of every revoked, unexpired certificate, signed by the owner CA."""

    async def seal_channel_secret(self, serial: str, *, seal_key: bytes, session: bytes,
                                  nonce: bytes) -> bytes:
        """Make a new channel secret, store it, return it sealed to the device (HPKE)."""

    async def seal_channel_secret_tpm(self, serial: str, *, ek_cert: bytes, session: bytes,
                                      nonce: bytes) -> bytes:
        """The same, sealed so that only the TPM of that EK can open it (TPM2_Import blob)."""

    async def seal_channel_secret_psk(self, serial: str, *, wrap_key: bytes, session: bytes,
                                      nonce: bytes) -> bytes:
        """The same for a PSK device: wrapped with AES-GCM under a key from `wrap_key` (the
        gateway's per-session key from the PSK, psk.session_wrap_key) and N_device."""


def init_vault_dir(directory: Path, *, owner_name: str = "zerotouch owner") -> None:
    """Create the vault key, the owner key and the self-signed owner CA (idempotent)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if not (directory / VAULT_KEY).exists() and VAULT_KEY_ENV not in os.environ:
        atomic_write(directory / VAULT_KEY, os.urandom(32).hex().encode(), mode=0o600)
    if (directory / OWNER_KEY).exists():
        return
    master = _master_key(directory)
    key = generate_p256()
    save_private_key(directory / OWNER_KEY, key, passphrase=master)
    save_cert(directory / OWNER_CA, make_root(key, f"{owner_name} CA", org=owner_name))


def _master_key(directory: Path) -> bytes:
    env = os.environ.get(VAULT_KEY_ENV)
    if env:
        return env.encode()
    return (Path(directory) / VAULT_KEY).read_bytes().strip()


def load_owner_ca(directory: Path) -> CertificateAuthority:
    """For set-up commands (TLS certificates for the gateway and terminus)."""
    directory = Path(directory)
    key = load_private_key(directory / OWNER_KEY, passphrase=_master_key(directory))
    return CertificateAuthority(key, load_cert(directory / OWNER_CA))


def check_csr(csr_der: bytes) -> x509.CertificateSigningRequest:
    """Proof of possession and allowed key types; the subject comes from our records, not the CSR."""
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError:
        raise MalformedMessage("CSR is not DER PKCS#10") from None
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    try:
        pub = csr.public_key()
        valid = csr_signature_valid(csr_der)
    except (ValueError, UnsupportedAlgorithm):
        raise MalformedMessage("CSR key does not parse or is not supported") from None
    if not valid:
        raise MalformedMessage("CSR signature is invalid (no proof of possession)")
    from cryptography.hazmat.primitives.asymmetric import rsa
    if isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name in ("secp256r1", "secp384r1"):
        return csr
    if isinstance(pub, rsa.RSAPublicKey) and pub.key_size >= 2048:
        return csr
    raise MalformedMessage("CSR key must be EC P-256, EC P-384 or RSA of at least 2048 bits")


class LocalVault:
    """In-process vault over the shared store."""

    def __init__(self, directory: Path, secrets: SecretRepo, certs: CertRepo):
        self.dir = Path(directory)
        master = _master_key(self.dir)
        self._ca = load_owner_ca(self.dir)
        self._signer = cose.SoftwareSigner(self._ca.key)
        self._ca_der = cert_der(self._ca.cert)
        self._aead = AESGCM(HKDF(hashes.SHA256(), 32, salt=None,
                                 info=b"zerotouch vault secrets").derive(master))
        self._secrets = secrets
        self._certs = certs

    @property
    def owner_fingerprint(self) -> bytes:
        return spki_fingerprint(self._ca.key.public_key())

    @staticmethod
    def fingerprint_of(ca: CertificateAuthority) -> str:
        """The owner key pin, as the claim's `cfingerprint` carries it (hex)."""
        return spki_fingerprint(ca.cert.public_key()).hex()

    def _enc(self, kind: str, name: str, plain: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plain, f"{kind}|{name}".encode())

    def _dec(self, kind: str, name: str, blob: bytes) -> bytes:
        return self._aead.decrypt(blob[:12], blob[12:], f"{kind}|{name}".encode())

    async def owner_ca_der(self) -> bytes:
        return self._ca_der

    async def sign(self, payload: bytes, with_chain: bool = True) -> bytes:
        return cose.sign1(payload, self._signer, x5chain=[self._ca_der] if with_chain else None)

    async def put_device_secret(self, serial: str, n_device: bytes) -> None:
        await self._secrets.put("n_device", serial, self._enc("n_device", serial, n_device))

    async def has_device_secret(self, serial: str) -> bool:
        return await self._secrets.get("n_device", serial) is not None

    async def _n_device(self, serial: str) -> bytes:
        blob = await self._secrets.get("n_device", serial)
        if blob is None:
            raise NotFound(f"device {serial} is not in the owner's inventory")
        return self._dec("n_device", serial, blob)

    async def owner_proof(self, serial: str, nonce: bytes) -> bytes:
        return owner_proof(await self._n_device(serial), nonce)

    async def issue_ldevid(self, csr_der: bytes, serial: str, urn: str, days: float) -> bytes:
        return await self.issue_certificate(csr_der, serial, urn, days, "ldevid")

    async def issue_certificate(self, csr_der: bytes, serial: str, urn: str, days: float,
                                kind: str) -> bytes:
        if kind not in CERT_KINDS:
            raise MalformedMessage(f"unknown certificate kind {kind!r}")
        if not 0 < days <= 825:
            raise MalformedMessage("validity must be more than 0 and at most 825 days")
        csr = check_csr(csr_der)
        cert = self._ca.issue_device(csr.public_key(), serial=serial, urn=urn, days=days)
        await self._certs.add(format(cert.serial_number, "x"), serial, cert_der(cert),
                              cert.not_valid_after_utc.timestamp(), kind=kind, issued_at=time.time())
        return cert_der(cert)

    async def make_crl(self, next_update_s: float) -> bytes:
        if not 60 <= next_update_s <= 30 * 86400:
            raise MalformedMessage("next update must be between a minute and 30 days away")
        revoked = await self._certs.revoked()
        entries = [(int(r.serial_number, 16), r.revoked_at, r.reason or "unspecified") for r in revoked]
        # CRL numbers must grow: the time in milliseconds does, across processes and restarts.
        crl = make_crl(self._ca, entries, next_update_s=next_update_s, number=int(time.time() * 1000))
        return crl.public_bytes(Encoding.DER)

    async def seal_channel_secret(self, serial: str, *, seal_key: bytes, session: bytes,
                                  nonce: bytes) -> bytes:
        n_device = await self._n_device(serial)
        secret = os.urandom(32)
        sealed = seal_secret(seal_key, serial=serial, session=session, secret=secret,
                             nonce=nonce, n_device=n_device)
        await self._secrets.put("channel", serial, self._enc("channel", serial, secret))
        return sealed

    async def seal_channel_secret_tpm(self, serial: str, *, ek_cert: bytes, session: bytes,
                                      nonce: bytes) -> bytes:
        from ..attestation.duplicate import seal_to_tpm
        try:
            ek_key = x509.load_der_x509_certificate(ek_cert).public_key()
        except (ValueError, x509.InvalidVersion):
            raise MalformedMessage("EK certificate is not DER X.509") from None
        n_device = await self._n_device(serial)
        secret = os.urandom(32)
        plain = sealed_plaintext(serial=serial, secret=secret, nonce=nonce, n_device=n_device)
        sealed = seal_to_tpm(ek_key, plain).to_bytes()
        await self._secrets.put("channel", serial, self._enc("channel", serial, secret))
        return sealed

    async def seal_channel_secret_psk(self, serial: str, *, wrap_key: bytes, session: bytes,
                                      nonce: bytes) -> bytes:
        from ..protocol.psk import wrap_secret
        if not isinstance(wrap_key, bytes) or len(wrap_key) != 32:
            raise MalformedMessage("wrap key must be 32 bytes")
        n_device = await self._n_device(serial)
        secret = os.urandom(32)
        wrapped = wrap_secret(wrap_key, serial=serial, session=session, secret=secret, nonce=nonce,
                              n_device=n_device)
        await self._secrets.put("channel", serial, self._enc("channel", serial, secret))
        return wrapped

    async def channel_secret(self, serial: str) -> bytes | None:
        """For the terminus side of the channel (and for tests)."""
        blob = await self._secrets.get("channel", serial)
        return self._dec("channel", serial, blob) if blob else None
