"""Sealing to a TPM's EK without a TPM: the encoding (tests/tpm/test_tpm_sealing.py has a real
TPM open it). The outer wrapper is checked by unwrapping it here with the EK's private key."""
from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from support_tpm import unwrap_sealed as _unwrap
from zerotouch.attestation.credential import CredentialError, parse_public
from zerotouch.attestation.duplicate import (MAX_SEALED_DATA, SEALED_ATTRIBUTES, SealedForTpm,
                                             check_sealed_public, seal_to_tpm)

RSA_EK = rsa.generate_private_key(65537, 2048)
ECC_EK = ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize("ek", [RSA_EK, ECC_EK], ids=["rsa", "ecc"])
def test_outer_wrapper_unwraps_with_the_ek_private_key(ek):
    for data in (b"", b"x", b"s" * MAX_SEALED_DATA):
        assert _unwrap(seal_to_tpm(ek.public_key(), data), ek) == data


def test_object_is_sealed_data_import_accepts():
    sealed = seal_to_tpm(RSA_EK.public_key(), b"secret")
    pub = parse_public(sealed.public)
    assert (pub.type, pub.name_alg, pub.scheme) == (0x0008, 0x000B, 0x0010)
    assert pub.attributes == SEALED_ATTRIBUTES == 1 << 6  # userWithAuth only
    for bit in (1 << 1, 1 << 4, 1 << 5):  # fixedTPM, fixedParent, sensitiveDataOrigin
        assert not pub.attributes & bit
    assert pub.auth_policy == b""
    # random seedValue: sealing the same data twice gives different public areas
    assert seal_to_tpm(RSA_EK.public_key(), b"secret").public != sealed.public


def test_size_limit():
    seal_to_tpm(RSA_EK.public_key(), b"a" * 128)
    with pytest.raises(ValueError, match="at most 128"):
        seal_to_tpm(RSA_EK.public_key(), b"a" * 129)


def test_unsupported_ek_refused():
    with pytest.raises(CredentialError):
        seal_to_tpm(rsa.generate_private_key(65537, 1024).public_key(), b"x")
    with pytest.raises(CredentialError):
        seal_to_tpm(ec.generate_private_key(ec.SECP521R1()).public_key(), b"x")
    with pytest.raises(CredentialError):  # a marshalled public area that is not a parent
        seal_to_tpm(seal_to_tpm(RSA_EK.public_key(), b"x").public, b"x")


def test_round_trip_and_strict_from_bytes():
    sealed = seal_to_tpm(ECC_EK.public_key(), b"round-trip")
    raw = sealed.to_bytes()
    assert SealedForTpm.from_bytes(raw) == sealed
    assert len(raw) == 1 + 6 + len(sealed.public) + len(sealed.duplicate) + len(sealed.seed)
    bad_inputs = [
        b"", b"\x02" + raw[1:],          # empty, unknown version
        raw + b"\x00",                   # trailing byte
        raw[:-1], raw[:3], raw[:1],      # truncated in a field, in a length, before a field
    ]
    for bad in bad_inputs:
        with pytest.raises(ValueError):
            SealedForTpm.from_bytes(bad)
    # an oversized length field, and an empty field
    with pytest.raises(ValueError, match="at most"):
        SealedForTpm.from_bytes(b"\x01" + struct.pack(">H", 5000) + b"\x00" * 5000)
    empty_seed = SealedForTpm(sealed.public, sealed.duplicate, b"").to_bytes()
    with pytest.raises(ValueError, match="empty"):
        SealedForTpm.from_bytes(empty_seed)
    with pytest.raises(ValueError, match="at most"):
        SealedForTpm(sealed.public, b"d" * 3000, sealed.seed).to_bytes()


def test_from_bytes_checks_the_public_area():
    sealed = seal_to_tpm(RSA_EK.public_key(), b"x")
    p = sealed.public
    for bad_public in (p + b"\x00", p[:-1], p[:4] + b"\x00\x00\x00\x42" + p[8:],
                       p[:8] + b"\x00\x01\x00" + p[10:]):  # fixedTPM set; a policy appears
        with pytest.raises(ValueError):
            SealedForTpm.from_bytes(SealedForTpm(bad_public, sealed.duplicate,
                                                 sealed.seed).to_bytes())
    with pytest.raises(ValueError):
        check_sealed_public(b"\x00\x08")


def test_sealed_is_frozen():
    sealed = seal_to_tpm(RSA_EK.public_key(), b"x")
    with pytest.raises(AttributeError):
        sealed.seed = b""  # type: ignore[misc]
