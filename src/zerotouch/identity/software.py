"""Software identity: P-256 keys in files only the device's user can read."""
from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.x509.oid import NameOID

from ..pki.keys import generate_p256, load_private_key, save_private_key
from ..protocol.cose import SoftwareSigner
from ..protocol.sealing import open_secret
from ..util.files import atomic_write, fsync_dir

IDEVID_KEY = "idevid.key"
IDEVID_CERT = "idevid.pem"
LDEVID_KEY = "ldevid.key"
LDEVID_KEY_PENDING = "ldevid.key.pending"
N_DEVICE_FILE = "n_device.secret"   # hex, 0600, written by the manufacturer


class SoftwareIdentity:
    kind = "software"

    def __init__(self, device_dir: Path):
        self.dir = Path(device_dir)
        self._idevid_key = load_private_key(self.dir / IDEVID_KEY)
        self._seal_key: x25519.X25519PrivateKey | None = None

    def idevid_signer(self) -> SoftwareSigner:
        return SoftwareSigner(self._idevid_key)

    def idevid_cert_der(self) -> bytes:
        cert = x509.load_pem_x509_certificate((self.dir / IDEVID_CERT).read_bytes())
        return cert.public_bytes(serialization.Encoding.DER)

    def create_ldevid_csr(self, serial: str, urn: str) -> bytes:
        key = generate_p256()
        # Pending until the credentials are verified and stored: a rejected attempt must not
        # break the key/certificate pair of a device that is already onboarded.
        save_private_key(self.dir / LDEVID_KEY_PENDING, key)
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial),
                                        x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(urn)]),
                              critical=False)
               .sign(key, hashes.SHA256()))
        return csr.public_bytes(serialization.Encoding.DER)

    def new_seal_key(self) -> bytes:
        # Only ever in memory: it lives for one onboarding attempt.
        self._seal_key = x25519.X25519PrivateKey.generate()
        return self._seal_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)

    def open_sealed(self, blob: bytes, *, serial: str, session: bytes, nonce: bytes,
                    n_device: bytes) -> bytes:
        if self._seal_key is None:
            raise RuntimeError("no seal key was made for this onboarding")
        return open_secret(self._seal_key, blob, serial=serial, session=session, nonce=nonce,
                           n_device=n_device)

    def commit_ldevid(self) -> None:
        os.replace(self.dir / LDEVID_KEY_PENDING, self.dir / LDEVID_KEY)
        fsync_dir(self.dir)

    def ldevid_key_file(self) -> Path:
        return self.dir / LDEVID_KEY

    def close(self) -> None:
        pass

    def tpm_evidence(self) -> None:
        return None   # no TPM: the channel secret is sealed to an HPKE key instead

    def tpm_activate(self, cred_blob: bytes, cred_secret: bytes) -> bytes:
        raise NotImplementedError("a software identity has no TPM")

    tpm_quote = tpm_activate

    def n_device(self) -> bytes:
        return bytes.fromhex((self.dir / N_DEVICE_FILE).read_text().strip())


class SoftwareIdentityFactory:
    kind = "software"

    def provision(self, device_dir: Path, n_device: bytes):
        key = generate_p256()
        save_private_key(Path(device_dir) / IDEVID_KEY, key)
        atomic_write(Path(device_dir) / N_DEVICE_FILE, n_device.hex().encode(), mode=0o600)
        return key.public_key()

    def store_idevid(self, device_dir: Path, cert_pem: bytes) -> None:
        atomic_write(Path(device_dir) / IDEVID_CERT, cert_pem)

    def idevid_binding(self, device_dir: Path) -> dict:
        """What the IDevID names besides serial and URN: nothing for a software key."""
        return {}

    def open(self, device_dir: Path) -> SoftwareIdentity:
        return SoftwareIdentity(device_dir)
