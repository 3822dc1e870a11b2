"""Operational keys in the TPM: the `KeyStore` that agent/renewal.py's OperationalFiles uses
for a `--identity tpm` device.

Each operational key is made in the TPM under the SRK (`keys.create_signing_key`, the same
template as the LDevID key: ECC P-256, fixedTPM, fixedParent, sensitiveDataOrigin), its CSR is
signed there (`pki/external_csr.build_csr`), and what is written is the key's TSS2 PRIVATE KEY
file: the public area and the private part encrypted by the SRK's seed, loadable only by this
TPM (and used for TLS by OpenSSL's tpm2 provider). Nothing is persistent in the TPM: dropping a
key is deleting its file, so the staged/promote/recover file logic is the same as for software
keys and a crash cannot leave TPM state behind.

The TPM is opened for each new key and closed again (every transient object flushed), so the
agent holds no TPM connection between renewals; behind a resource manager the TLS child may
use the TPM at the same time.
"""
from __future__ import annotations

from pathlib import Path

from cryptography import x509

from ...pki.external_csr import build_csr
from ...pki.keys import public_key_der
from ...util.files import atomic_write
from .core import Tpm
from .keys import create_signing_key, parse_tss2_private_key_pem, tss2_private_key_pem

TSS2_SUFFIX = ".tss2.pem"


class TpmKeyStore:
    suffix = TSS2_SUFFIX

    def __init__(self, tcti: str):
        self.tcti = tcti

    def public_der(self, key_file: Path) -> bytes:
        """SubjectPublicKeyInfo of a TSS2 key file (read from its public area; no TPM needed)."""
        blob, _parent = parse_tss2_private_key_pem(Path(key_file).read_bytes())
        return public_key_der(blob.public_key())

    def new_key_and_csr(self, key_file: Path, subject: x509.Name,
                        san: x509.SubjectAlternativeName, key_factory=None) -> bytes:
        if key_factory is not None:
            raise ValueError("a TPM device's operational key is made in its TPM, not by a factory")
        with Tpm(self.tcti) as tpm:
            blob = create_signing_key(tpm)
            # The file first: a CSR is never sent for a key the device could lose.
            atomic_write(Path(key_file), tss2_private_key_pem(blob), mode=0o600)
            with blob.load_signer(tpm) as signer:
                return build_csr(subject, signer.public_key(), signer.sign_der, [san])
