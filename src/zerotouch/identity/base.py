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

    # -- TPM attestation (a backend without a TPM returns None from tpm_evidence) ----------------
    def tpm_evidence(self) -> tuple[bytes, bytes] | None:
        """(EK certificate DER, AK public area as a marshalled TPMT_PUBLIC), or None."""
        ...

    def tpm_activate(self, cred_blob: bytes, cred_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK and EK: the credential the owner made."""
        ...

    def tpm_quote(self, nonce: bytes, pcr_mask: int) -> tuple[bytes, bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE, sha256 PCR values in index order) quoted by the AK."""
        ...

    def n_device(self) -> bytes:
        """N_device, the factory secret shared with the owner (file, or TPM NV)."""
        ...

    def close(self) -> None:
        """Release the key holder (a TPM connection: flush loaded objects and sessions)."""
        ...


class IdentityFactory(Protocol):
    """Creates the identity at the factory, and opens it again on the device."""
    kind: str

    def provision(self, device_dir: Path, n_device: bytes):
        """Create the IDevID key and keep N_device (a 0600 file, or TPM NV); return the IDevID
        public key (the manufacturer certifies it)."""
        ...

    def idevid_binding(self, device_dir: Path) -> dict:
        """Extra IDevID contents, e.g. {"extra_sans": [hardwareModuleName of the TPM]}."""
        ...

    def store_idevid(self, device_dir: Path, cert_pem: bytes) -> None: ...

    def open(self, device_dir: Path) -> DeviceIdentity: ...
