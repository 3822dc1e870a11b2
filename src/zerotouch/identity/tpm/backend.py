"""The `tpm` identity backend: the same DeviceIdentity as the software one, keys in a TPM.

At the factory (`TpmIdentityFactory.provision`): EK (TCG template, persistent), AK under the EK,
IDevID signing key and SRK made persistent, N_device written once into NV (handles in keys.py).
The device directory keeps only public things: the IDevID certificate, the EK certificate and
the AK public area (sent at hello), factory.json with the TCTI. On the device:

  * messages are signed by the IDevID key in the TPM (TPM2_Sign);
  * hello carries the EK certificate and the AK; the owner's credential is activated with them
    (TPM2_ActivateCredential) and the PCRs are quoted over the owner's challenge;
  * the LDevID key is created in the TPM under the SRK, the CSR signed there; the key is kept
    as a TSS2 PRIVATE KEY file (only this TPM can load it) that OpenSSL's tpm2 provider uses
    for TLS to the terminus;
  * the channel secret arrives as a TPM2_Import blob for the EK: only this TPM opens it.

The TPM connection is opened on first use and closed by `close()` (every transient object and
session flushed), so a device can onboard any number of times without filling the TPM.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from ...attestation.duplicate import SealedForTpm
from ...attestation.ek import ek_key_id
from ...pki.external_csr import build_csr
from ...pki.hwmodule import tpm_binding_san
from ...protocol.errors import BadSignature, MalformedMessage
from ...protocol.sealing import check_sealed_plaintext
from ...util.files import atomic_write, fsync_dir
from . import keys
from .core import Tpm, TpmError, _CountingESAPI
from .quote import quote, read_pcrs
from .sealing import UnsealError, unseal_imported

IDEVID_CERT = "idevid.pem"
EK_CERT = "tpm-ek.der"           # public: sent at hello
AK_PUBLIC = "tpm-ak.pub"         # public: marshalled TPMT_PUBLIC, sent at hello
LDEVID_KEY = "ldevid.tss2.pem"   # TPM-wrapped: loadable only by this TPM (parent: the SRK)
LDEVID_KEY_PENDING = "ldevid.tss2.pem.pending"


class CommandCounter:
    """Wraps the Tpm's counting ESAPI context: adds the time spent in TPM commands (for the
    figures of an onboarding: how much of it is the TPM). Same rule as core._CountingESAPI
    for what is a TPM command."""

    def __init__(self, ctx):
        self._ctx = ctx
        self.commands = 0
        self.seconds = 0.0

    def __getattr__(self, name):
        attr = getattr(self._ctx, name)
        if not callable(attr) or name.startswith("_") or (
                name.startswith(_CountingESAPI._LOCAL) and name != "tr_from_tpmpublic"):
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.commands += 1
                self.seconds += time.perf_counter() - t0
        return timed


def _mask_indices(mask: int) -> list[int]:
    if not isinstance(mask, int) or not 0 < mask < 1 << 24:
        raise MalformedMessage("owner asked for PCRs outside 0..23")
    return [i for i in range(24) if mask >> i & 1]


class TpmIdentity:
    kind = "tpm"

    def __init__(self, device_dir: Path, tcti: str):
        self.dir = Path(device_dir)
        self.tcti = tcti
        self._tpm: Tpm | None = None
        self._evidence: tuple[bytes, bytes] | None = None
        self.tpm_commands = 0        # over this identity's lifetime, closed connections included
        self.tpm_seconds = 0.0

    @property
    def tpm(self) -> Tpm:
        if self._tpm is None:
            self._tpm = Tpm(self.tcti)
            self._tpm._counting = self._counter = CommandCounter(self._tpm._counting)
        return self._tpm

    def tpm_usage(self) -> tuple[int, float]:
        """(TPM commands, seconds in them) so far."""
        live = self._counter if self._tpm is not None else None
        return (self.tpm_commands + (live.commands if live else 0),
                self.tpm_seconds + (live.seconds if live else 0.0))

    def close(self) -> None:
        tpm, self._tpm = self._tpm, None
        if tpm is not None:
            try:
                tpm.close()
            finally:
                self.tpm_commands += self._counter.commands
                self.tpm_seconds += self._counter.seconds

    # -- IDevID ------------------------------------------------------------------------------
    def idevid_signer(self):
        return keys.TpmSigner(self.tpm, keys.IDEVID_PERSISTENT)

    def idevid_cert_der(self) -> bytes:
        cert = x509.load_pem_x509_certificate((self.dir / IDEVID_CERT).read_bytes())
        return cert.public_bytes(Encoding.DER)

    def n_device(self) -> bytes:
        return keys.read_n_device(self.tpm)

    # -- attestation -------------------------------------------------------------------------
    def tpm_evidence(self) -> tuple[bytes, bytes]:
        if self._evidence is None:
            self._evidence = ((self.dir / EK_CERT).read_bytes(), (self.dir / AK_PUBLIC).read_bytes())
        return self._evidence

    def tpm_activate(self, cred_blob: bytes, cred_secret: bytes) -> bytes:
        return self.tpm.activate_credential(self.tpm.ak_handle(), cred_blob, cred_secret)

    def tpm_quote(self, nonce: bytes, pcr_mask: int) -> tuple[bytes, bytes, bytes]:
        indices = _mask_indices(pcr_mask)
        values = read_pcrs(self.tpm, indices)
        attest, sig = quote(self.tpm, self.tpm.ak_handle(), nonce, indices)
        return attest, sig, b"".join(values[i] for i in indices)

    # -- LDevID ------------------------------------------------------------------------------
    def create_ldevid_csr(self, serial: str, urn: str) -> bytes:
        blob = keys.create_signing_key(self.tpm)
        # Pending until the credentials are verified and stored (as the software backend).
        atomic_write(self.dir / LDEVID_KEY_PENDING, keys.tss2_private_key_pem(blob), mode=0o600)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial),
                             x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
        with blob.load_signer(self.tpm) as signer:
            return build_csr(subject, signer.public_key(), signer.sign_der,
                             [x509.SubjectAlternativeName([x509.UniformResourceIdentifier(urn)])])

    def commit_ldevid(self) -> None:
        os.replace(self.dir / LDEVID_KEY_PENDING, self.dir / LDEVID_KEY)
        fsync_dir(self.dir)

    def ldevid_key_file(self) -> Path:
        return self.dir / LDEVID_KEY

    # -- channel secret ----------------------------------------------------------------------
    def new_seal_key(self) -> bytes:
        raise NotImplementedError("a TPM device's secret is sealed to its EK, not to a seal key")

    def open_sealed(self, blob: bytes, *, serial: str, session: bytes, nonce: bytes,
                    n_device: bytes) -> bytes:
        try:
            sealed = SealedForTpm.from_bytes(blob)
        except ValueError:
            raise MalformedMessage("sealed secret is not a TPM import blob") from None
        try:
            plain = unseal_imported(self.tpm, sealed)
        except UnsealError:
            raise BadSignature("sealed secret does not open in this device's TPM") from None
        return check_sealed_plaintext(plain, serial=serial, nonce=nonce, n_device=n_device)


class TpmIdentityFactory:
    kind = "tpm"

    def __init__(self, tcti: str | None = None):
        self.tcti = tcti or os.environ.get("ZEROTOUCH_TCTI") or os.environ.get("TPM2TOOLS_TCTI")
        if not self.tcti:
            raise ValueError("the tpm identity needs a TPM: give --tcti (e.g. "
                             "swtpm:host=127.0.0.1,port=2321 or device:/dev/tpmrm0)")

    def provision(self, device_dir: Path, n_device: bytes):
        """Make the TPM's persistent keys and write N_device to NV; keep the public parts."""
        device_dir = Path(device_dir)
        with Tpm(self.tcti) as tpm:
            made = keys.provision(tpm, n_device)
        if not made.ek_cert:
            raise TpmError("this TPM has no EK certificate: an owner could not tell it from a "
                           "software imitation")
        atomic_write(device_dir / EK_CERT, made.ek_cert)
        atomic_write(device_dir / AK_PUBLIC, made.ak_public)
        return made.idevid_public

    def idevid_binding(self, device_dir: Path) -> dict:
        """The IDevID names this TPM (RFC 4108 hardwareModuleName = SHA-256 of the EK SPKI)."""
        ek = x509.load_der_x509_certificate((Path(device_dir) / EK_CERT).read_bytes())
        return {"extra_sans": [tpm_binding_san(ek_key_id(ek))]}

    def store_idevid(self, device_dir: Path, cert_pem: bytes) -> None:
        atomic_write(Path(device_dir) / IDEVID_CERT, cert_pem)

    def idevid_csr(self, device_dir: Path, serial: str, urn: str, *,
                   model: str | None = None) -> bytes:
        """A CSR signed by the IDevID key in the TPM (the factory EST path). Its extensionRequest
        asks for the device URN and the TPM binding (RFC 4108 hardwareModuleName naming this
        TPM's EK, read by the station from the TPM); its subject's OU is the device type. The
        factory EST service checks and copies these (services/factory_est.py)."""
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, serial),
                 x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)]
        if model:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, model))
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(urn),
                                           *self.idevid_binding(device_dir)["extra_sans"]])
        with Tpm(self.tcti) as tpm:
            signer = keys.TpmSigner(tpm, keys.IDEVID_PERSISTENT)
            return build_csr(x509.Name(attrs), signer.public_key(), signer.sign_der, [san])

    def open(self, device_dir: Path) -> TpmIdentity:
        return TpmIdentity(device_dir, self.tcti)
