"""Helpers for revocation tests: onboarded devices whose LDevID and key are files an MQTT
client can use, free ports, CRL entries."""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from zerotouch.identity.software import SoftwareIdentity
from zerotouch.pki.keys import generate_p256, save_cert
from zerotouch.services.vault import load_owner_ca

from fleet import Fleet


@dataclass
class Onboarded:
    serial: str
    urn: str
    ldevid: x509.Certificate
    cert_file: Path
    key_file: Path
    made: object = None  # the MadeDevice, to try onboarding it again

    @property
    def cert_serial(self) -> str:
        return format(self.ldevid.serial_number, "x")


async def onboard(fleet: Fleet) -> Onboarded:
    dev = await fleet.make()
    core = fleet.core(dev)
    await fleet.onboard(core)
    identity = SoftwareIdentity(dev.device_dir)
    identity.commit_ldevid()  # what the agent does once the credentials are stored
    cert = x509.load_der_x509_certificate(core.result.ldevid_der)
    save_cert(dev.device_dir / "ldevid.pem", cert)
    return Onboarded(dev.serial, dev.urn, cert, dev.device_dir / "ldevid.pem", identity.ldevid_key_file(), dev)


def make_csr(serial: str) -> bytes:
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, serial)]))
            .sign(generate_p256(), hashes.SHA256()).public_bytes(Encoding.DER))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def owner_ca(fleet: Fleet):
    return load_owner_ca(fleet.tmp / "vault")


def crl_entries(der: bytes) -> dict[int, str]:
    """serial → reason name ('unspecified' when the entry carries no reason)."""
    crl = x509.load_der_x509_crl(der)
    out = {}
    for entry in crl:
        try:
            out[entry.serial_number] = entry.extensions.get_extension_for_class(
                x509.CRLReason).value.reason.name
        except x509.ExtensionNotFound:
            out[entry.serial_number] = "unspecified"
    return out


__all__ = ["Onboarded", "onboard", "make_csr", "free_port", "owner_ca", "crl_entries"]
