"""The factory EST service's checks on a TPM binding (hardwareModuleName) and device type a
station asks for in the CSR: form, TPM 2.0 only, one device per TPM, recorded. No TPM needed:
the service cannot tell a TPM key from a software key in one EST round (the station vouches;
see services/factory_est.py), so software keys stand in."""
from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import encoder
from pyasn1.type import univ
from pyasn1_modules import rfc4108

from zerotouch.pki.ca import DEVICE_URN_PREFIX
from zerotouch.pki.hwmodule import HARDWARE_MODULE_NAME, device_type, tpm_binding, tpm_binding_san
from zerotouch.pki.keys import generate_p256, load_cert
from zerotouch.protocol.errors import Conflict, MalformedMessage
from zerotouch.protocol.est import PolicyViolation

from factory_harness import device_csr

EK_ID = hashlib.sha256(b"an EK SubjectPublicKeyInfo").digest()


def _san(serial, *names):
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(DEVICE_URN_PREFIX + serial),
                                        *names])


def _csr(serial, *names, ou=None):
    """A device CSR naming `serial`, asking for the SAN `names` and the subject OUs `ou`."""
    if ou is None:
        return device_csr(serial, extensions=[_san(serial, *names)] if names else None)[0]
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, serial),
             x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, o) for o in ou]
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if names:
        b = b.add_extension(_san(serial, *names), critical=False)
    return b.sign(generate_p256(), hashes.SHA256()).public_bytes(Encoding.DER)


def _hmn(hw_type: str, serial_num: bytes) -> x509.OtherName:
    hmn = rfc4108.HardwareModuleName()
    hmn["hwType"] = univ.ObjectIdentifier(hw_type)
    hmn["hwSerialNum"] = univ.OctetString(serial_num)
    return x509.OtherName(HARDWARE_MODULE_NAME, encoder.encode(hmn))


def _issue(factory, csr):
    return factory.service.issue(csr, (load_cert(factory.station.cert_file).public_bytes(Encoding.DER),))


async def test_binding_and_type_are_copied_and_recorded(factory):
    cert = _issue(factory, _csr("1a2b3c4d", tpm_binding_san(EK_ID), ou=["gw-1000"]))
    assert tpm_binding(cert) == EK_ID and device_type(cert) == "gw-1000"
    rec = factory.service.issued.get("1a2b3c4d")
    assert rec["tpm_ek_sha256"] == EK_ID.hex() and rec["model"] == "gw-1000"
    # without them, an IDevID as before (software device, default type)
    plain = _issue(factory, _csr("1a2b3c4e"))
    assert tpm_binding(plain) is None and device_type(plain) == "default"
    assert "tpm_ek_sha256" not in factory.service.issued.get("1a2b3c4e")


async def test_one_device_per_tpm(factory):
    _issue(factory, _csr("2a2b3c4d", tpm_binding_san(EK_ID)))
    with pytest.raises(Conflict, match="already bound to device 2a2b3c4d"):
        _issue(factory, _csr("2a2b3c4e", tpm_binding_san(EK_ID)))
    assert factory.service.issued.get("2a2b3c4e") is None
    # and over HTTP: 409 with the reason
    status, text = await factory.enroll(_csr("2a2b3c4f", tpm_binding_san(EK_ID)))
    assert status == 409 and "one device per TPM" in text


@pytest.mark.parametrize("names, ou, error, match", [
    ((_hmn("1.3.6.1.4.1.99999.1", EK_ID),), None, PolicyViolation, "TPM 2.0 modules"),
    ((_hmn("2.23.133.1.2", EK_ID[:20]),), None, PolicyViolation, "32-byte SHA-256"),
    ((tpm_binding_san(EK_ID), tpm_binding_san(EK_ID[::-1])), None, PolicyViolation,
     "more than one hardware module"),
    ((x509.OtherName(x509.ObjectIdentifier("1.3.6.1.5.5.7.8.9"), b"\x0c\x01a"),), None,
     PolicyViolation, "otherName other than hardwareModuleName"),
    ((x509.OtherName(HARDWARE_MODULE_NAME, b"\x30\x03\x02\x01\x01"),), None, MalformedMessage,
     "hardwareModuleName"),
    ((), ["a", "b"], MalformedMessage, "one device type"),
    ((), ["gw 1000; DROP"], MalformedMessage, "one device type"),
])
async def test_bad_bindings_and_types_are_refused_and_nothing_is_recorded(factory, names, ou,
                                                                          error, match):
    with pytest.raises(error, match=match):
        _issue(factory, _csr("3a2b3c4d", *names, ou=ou))
    assert factory.service.issued.records() == []
