"""Device-side key holder interface. Backends: software (files); the TPM backend's building
live in identity/tpm/ (EK, AK, credential activation, sealing, quotes, TPM-resident keys).

A backend keeps private keys where it can (files with 0600, a TPM) and exposes only the
operations onboarding needs: sign with the IDevID key, make a CSR for a new LDevID key,
make an HPKE key and open a secret sealed to it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..protocol.cose import Signer


class DeviceIdentity(Protocol):
    kind: str

    def idevid_signer(self) -> Signer: ...

    def idevid_cert_der(self) -> bytes: ...

    def create_ldevid_csr(self, serial: str, urn: str) -> bytes:
        """Generate a fresh LDevID key inside the backend; return a CSR signed by it (DER)."""
        ...

    def commit_ldevid(self) -> None:
        """Make the key of the last CSR the device's LDevID key (after its certificate is stored)."""
        ...

    def new_seal_key(self) -> bytes:
        """Generate a fresh HPKE (X25519) key; return its raw public key."""
        ...

    def open_sealed(self, blob: bytes, *, serial: str, session: bytes, nonce: bytes,
                    n_device: bytes) -> bytes: ...

    def ldevid_key_file(self) -> Path:
        """A file TLS libraries can load the LDevID key from."""
        ...


class IdentityFactory(Protocol):
    """Creates the identity at the factory, and opens it again on the device."""
    kind: str

    def provision(self, device_dir: Path):
        """Create the IDevID key; return its public key (the manufacturer certifies it)."""
        ...

    def open(self, device_dir: Path) -> DeviceIdentity: ...
