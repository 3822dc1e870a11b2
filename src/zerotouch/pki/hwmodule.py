"""An IDevID that names the TPM holding its key, and the device type it was made as.

The manufacturer binds the IDevID to the TPM with an RFC 4108 hardwareModuleName in the
SubjectAltName (as TCG's device-identity profile does): hwType names a TPM 2.0, hwSerialNum is
the SHA-256 of the TPM's EK SubjectPublicKeyInfo. A gateway then knows, from the manufacturer's
signature alone, that this device must present TPM evidence and from which TPM: an IDevID key
copied out of a device (or a software device claiming to be a TPM one) cannot pass with another
TPM's EK.
"""
from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import decoder, encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ
from pyasn1_modules import rfc4108

HARDWARE_MODULE_NAME = x509.ObjectIdentifier(str(rfc4108.id_on_hardwareModuleName))
TPM2_HW_TYPE = "2.23.133.1.2"   # TCG arc: a TPM 2.0 holds the key
DEFAULT_DEVICE_TYPE = "default"


def tpm_binding_san(ek_key_id: bytes) -> x509.OtherName:
    hmn = rfc4108.HardwareModuleName()
    hmn["hwType"] = univ.ObjectIdentifier(TPM2_HW_TYPE)
    hmn["hwSerialNum"] = univ.OctetString(ek_key_id)
    return x509.OtherName(HARDWARE_MODULE_NAME, encoder.encode(hmn))


def parse_hardware_module_name(other: x509.OtherName) -> tuple[str, bytes]:
    """(hwType dotted OID, hwSerialNum) of a hardwareModuleName otherName; ValueError if bad."""
    if other.type_id != HARDWARE_MODULE_NAME:
        raise ValueError("not a hardwareModuleName")
    try:
        hmn, rest = decoder.decode(other.value, asn1Spec=rfc4108.HardwareModuleName())
    except PyAsn1Error:
        raise ValueError("hardwareModuleName is not valid DER") from None
    if rest:
        raise ValueError("hardwareModuleName has trailing bytes")
    return str(hmn["hwType"]), bytes(hmn["hwSerialNum"])


def tpm_binding(cert: x509.Certificate) -> bytes | None:
    """The EK key id the IDevID is bound to, or None for a device without a TPM."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id != HARDWARE_MODULE_NAME:
            continue
        try:
            hmn, rest = decoder.decode(other.value, asn1Spec=rfc4108.HardwareModuleName())
        except PyAsn1Error:
            raise ValueError("IDevID hardwareModuleName is not valid DER") from None
        if rest:
            raise ValueError("IDevID hardwareModuleName has trailing bytes")
        if str(hmn["hwType"]) == TPM2_HW_TYPE:
            return bytes(hmn["hwSerialNum"])
    return None


def device_type(cert: x509.Certificate) -> str:
    """The device type (model) the manufacturer put in the IDevID subject's OU, or 'default'."""
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(ous[0].value) if ous else DEFAULT_DEVICE_TYPE
