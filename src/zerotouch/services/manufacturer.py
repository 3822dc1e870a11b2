"""Manufacturer: device identity, IDevID certificate, N_device/OTP, factory config, label, and
the signed registration the rendezvous accepts."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

import segno

from ..identity import identity_factory
from ..identity.software import IDEVID_KEY
from ..pki.ca import DEVICE_URN_PREFIX, CertificateAuthority, device_identity, make_root
from ..pki.hwmodule import device_type
from ..pki.keys import (cert_der, cert_pem, generate_p256, load_cert, load_private_key,
                        public_key_der, save_cert, save_private_key)
from ..protocol import cose
from ..protocol.messages import RvRegister
from ..protocol.proofs import otp_hash
from ..protocol.tte import Label
from ..util.files import atomic_write, atomic_write_json, read_json

CA_KEY = "manufacturer-ca.key"
CA_CERT = "manufacturer-ca.pem"
FACTORY_FILE = "factory.json"
SECRET_FILE = "n_device.secret"   # software identity only (identity/software.py N_DEVICE_FILE)


@dataclass(frozen=True)
class RendezvousInfo:
    """What a device must know of its rendezvous: URL, signing-key pin, TLS trust anchor."""
    url: str
    key_pem: str
    tls_ca_pem: str
    edhoc_fingerprint: str | None = None   # CoAP/EDHOC key pin (hex SHA-256 SPKI)

    @classmethod
    def load(cls, path: Path) -> "RendezvousInfo":
        data = read_json(path)
        return cls(url=data["url"], key_pem=data["key_pem"], tls_ca_pem=data["tls_ca_pem"],
                   edhoc_fingerprint=data.get("edhoc_fingerprint"))

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"url": self.url, "key_pem": self.key_pem,
                                 "tls_ca_pem": self.tls_ca_pem,
                                 **({"edhoc_fingerprint": self.edhoc_fingerprint}
                                    if self.edhoc_fingerprint else {})})


@dataclass(frozen=True)
class MadeDevice:
    serial: str
    urn: str
    device_dir: Path
    label: Label
    registration: bytes   # COSE_Sign1 RvRegister, for the rendezvous


class Manufacturer:
    def __init__(self, directory: Path, *, name: str = "zerotouch manufacturer"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / CA_KEY).exists():
            key = generate_p256()
            save_private_key(self.dir / CA_KEY, key)
            save_cert(self.dir / CA_CERT, make_root(key, f"{name} CA", org=name))
        self.ca = CertificateAuthority(load_private_key(self.dir / CA_KEY), load_cert(self.dir / CA_CERT))
        self.name = name

    @property
    def ca_pem(self) -> bytes:
        return cert_pem(self.ca.cert)

    def _new_devid(self, devices_dir: Path) -> str:
        while True:
            devid = os.urandom(4).hex()
            # ID 0 is reserved for examples; never reuse an ID this factory made.
            if devid != "00000000" and not (devices_dir / devid).exists():
                return devid

    def make_device(self, out_dir: Path, rendezvous: RendezvousInfo, *, identity: str = "software",
                    idevid_via: Callable[[bytes], x509.Certificate] | None = None,
                    devid: str | None = None, otp: bytes | None = None, model: str | None = None,
                    tcti: str | None = None) -> MadeDevice:
        """`idevid_via(csr_der) -> IDevID`: certify the device key elsewhere (the factory EST
        service, `factory_est.idevid_via_est`) instead of with the in-process CA.
        `devid` / `otp`: a chosen Device ID and 8-byte OTP (a bulk box derives them); by
        default both are random. `identity="psk"`: a device of the PSK profile (no IDevID)."""
        if identity == "psk":
            if idevid_via is not None or tcti or model:
                raise ValueError("a PSK device has no IDevID (no EST, TPM or model)")
            return self.make_psk_device(out_dir, rendezvous, devid=devid, otp=otp)
        out_dir = Path(out_dir)
        devices_dir = out_dir / "devices"
        devices_dir.mkdir(parents=True, exist_ok=True)
        if otp is not None and len(otp) != 8:
            raise ValueError("otp must be 8 bytes")
        if devid is not None and not _is_devid(devid):
            raise ValueError("devid must be 8 lowercase hex digits, not 00000000")
        serial = devid if devid is not None else self._new_devid(devices_dir)
        urn = f"{DEVICE_URN_PREFIX}{serial}"
        device_dir = devices_dir / serial
        device_dir.mkdir(mode=0o700)
        backend = identity_factory(identity, **({"tcti": tcti} if tcti else {}))
        n_device = otp if otp is not None else os.urandom(8)  # 64 bits: the OTP on the label
        try:
            public_key = backend.provision(device_dir, n_device)
            binding = backend.idevid_binding(device_dir)   # e.g. the TPM's EK for the SAN
        except BaseException:
            shutil.rmtree(device_dir)
            raise
        if idevid_via is None:
            idevid = self.ca.issue_device(public_key, serial=serial, urn=urn, org=self.name,
                                          model=model, extra_sans=binding.get("extra_sans", []))
        else:
            try:
                idevid = self._idevid_from(idevid_via, backend, device_dir, public_key, serial, urn,
                                           model=model, extra_sans=binding.get("extra_sans", []))
            except BaseException:
                shutil.rmtree(device_dir)   # no half-made device without an IDevID
                raise
        backend.store_idevid(device_dir, cert_pem(idevid))
        atomic_write(device_dir / "manufacturer-ca.pem", self.ca_pem)
        atomic_write_json(device_dir / FACTORY_FILE, {
            "serial": serial, "urn": urn, "identity": identity, **({"tcti": tcti} if tcti else {}),
            "rendezvous_url": rendezvous.url, "rendezvous_key_pem": rendezvous.key_pem,
            "rendezvous_tls_ca_pem": rendezvous.tls_ca_pem,
            **({"rendezvous_edhoc_fp": rendezvous.edhoc_fingerprint}
               if rendezvous.edhoc_fingerprint else {}),
        })
        label = Label(rendezvous=rendezvous.url, devid=serial, otp=n_device.hex())
        write_label(label, out_dir / "labels")
        salt = os.urandom(16)
        reg = RvRegister(serial=serial, urn=urn, idevid=cert_der(idevid), otp_salt=salt,
                         otp_hash=otp_hash(n_device, salt))
        signed = cose.sign1(reg.encode(), cose.SoftwareSigner(self.ca.key), x5chain=[cert_der(self.ca.cert)])
        return MadeDevice(serial=serial, urn=urn, device_dir=device_dir, label=label, registration=signed)

    def make_psk_device(self, out_dir: Path, rendezvous: RendezvousInfo, *,
                        psk: bytes | None = None, devid: str | None = None,
                        otp: bytes | None = None) -> MadeDevice:
        """A device of the PSK profile (protocol/psk.py): no key pair, no IDevID; it holds
        N_device (its OTP) and a 32-byte PSK (`psk`, or random). The registration carries the
        commitment to its rendezvous key K_rv, never a key."""
        from ..identity.psk import PskIdentityFactory
        from ..protocol.psk import PskIdentityError, RvRegisterPsk, psk_commitment, rendezvous_key
        out_dir = Path(out_dir)
        devices_dir = out_dir / "devices"
        devices_dir.mkdir(parents=True, exist_ok=True)
        if otp is not None and len(otp) != 8:
            raise ValueError("otp must be 8 bytes")
        if devid is not None and not _is_devid(devid):
            raise ValueError("devid must be 8 lowercase hex digits, not 00000000")
        psk = psk if psk is not None else os.urandom(32)
        if len(psk) != 32:
            raise PskIdentityError("a PSK must be 32 bytes")
        serial = devid if devid is not None else self._new_devid(devices_dir)
        urn = f"{DEVICE_URN_PREFIX}{serial}"
        device_dir = devices_dir / serial
        device_dir.mkdir(mode=0o700)
        n_device = otp if otp is not None else os.urandom(8)
        PskIdentityFactory().provision(device_dir, n_device, psk=psk)
        atomic_write_json(device_dir / FACTORY_FILE, {
            "serial": serial, "urn": urn, "identity": "psk",
            "rendezvous_url": rendezvous.url,
            # kept for tools; a PSK device verifies nothing with them (its redirect is MAC'd)
            "rendezvous_key_pem": rendezvous.key_pem, "rendezvous_tls_ca_pem": rendezvous.tls_ca_pem,
        })
        label = Label(rendezvous=rendezvous.url, devid=serial, otp=n_device.hex())
        write_label(label, out_dir / "labels")
        salt = os.urandom(16)
        reg = RvRegisterPsk(serial=serial, urn=urn, otp_salt=salt, otp_hash=otp_hash(n_device, salt),
                            psk_commit=psk_commitment(rendezvous_key(psk, serial), serial))
        signed = cose.sign1(reg.encode(), cose.SoftwareSigner(self.ca.key), x5chain=[cert_der(self.ca.cert)])
        return MadeDevice(serial=serial, urn=urn, device_dir=device_dir, label=label, registration=signed)

    def _idevid_from(self, via, backend, device_dir: Path, public_key, serial: str, urn: str, *,
                     model: str | None = None, extra_sans=()) -> x509.Certificate:
        # Only the CSR leaves the device directory (or, with a TPM backend, the TPM).
        make_csr = getattr(backend, "idevid_csr", None)
        csr = (make_csr(device_dir, serial, urn, model=model) if make_csr
               else _software_idevid_csr(device_dir, serial, model))
        idevid = via(csr)
        # The registration below vouches for this certificate: check it is what we asked for.
        if public_key_der(idevid.public_key()) != public_key_der(public_key):
            raise ValueError("the IDevID returned for the device certifies another key")
        idevid.verify_directly_issued_by(self.ca.cert)
        if device_identity(idevid) != (serial, urn):
            raise ValueError(f"the IDevID returned for device {serial} names another device")
        # ... and carries what the in-process CA would have put in: the TPM binding, the type.
        try:
            sans = idevid.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            sans = []
        if any(name not in sans for name in extra_sans):
            raise ValueError(f"the IDevID returned for device {serial} lacks its TPM binding "
                             "(hardwareModuleName)")
        if model and device_type(idevid) != model:
            raise ValueError(f"the IDevID returned for device {serial} is not of type {model!r}")
        return idevid


def _is_devid(devid: str) -> bool:
    return (isinstance(devid, str) and len(devid) == 8 and devid != "00000000"
            and all(c in "0123456789abcdef" for c in devid))


def _software_idevid_csr(device_dir: Path, serial: str, model: str | None = None) -> bytes:
    """A CSR signed by the IDevID key in the device directory, naming the device serial (and
    its type as the OU, when it has one)."""
    key = load_private_key(Path(device_dir) / IDEVID_KEY)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, serial),
             x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)]
    if model:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, model))
    name = x509.Name(attrs)
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.DER)


def write_label(label: Label, labels_dir: Path) -> dict[str, Path]:
    """The label as text, PNG and SVG QR codes (error correction H survives a scratched label)."""
    labels_dir.mkdir(parents=True, exist_ok=True)
    qr = segno.make(label.url, error="h", micro=False)
    paths = {"txt": labels_dir / f"{label.devid}.txt", "png": labels_dir / f"{label.devid}.png",
             "svg": labels_dir / f"{label.devid}.svg"}
    atomic_write(paths["txt"], (label.url + "\n").encode())
    qr.save(str(paths["png"]), scale=6, border=4)
    qr.save(str(paths["svg"]), scale=4, border=4)
    return paths


def read_factory(device_dir: Path) -> dict:
    return json.loads((Path(device_dir) / FACTORY_FILE).read_text())
