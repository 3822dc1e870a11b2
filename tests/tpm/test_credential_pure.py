"""MakeCredential building blocks without a TPM (the swtpm tests check them for real)."""
from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from zerotouch.attestation.credential import (RESTRICTED, CredentialError, check_ak_public, kdfa,
                                              kdfe, make_credential, name_of_public)


def test_kdfa_lengths_and_determinism():
    k = kdfa(0x000B, b"k" * 32, b"STORAGE", b"ctx", b"", 128)
    assert len(k) == 16 and k == kdfa(0x000B, b"k" * 32, b"STORAGE\0", b"ctx", b"", 128)
    assert len(kdfa(0x000B, b"k", b"INTEGRITY", b"", b"", 512)) == 64
    assert len(kdfe(0x000C, b"z" * 48, b"IDENTITY", b"u", b"v", 384)) == 48


def test_make_credential_rejects_bad_input():
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    name = b"\x00\x0b" + b"\x11" * 32
    with pytest.raises(CredentialError):
        make_credential(key, name, b"x" * 33)  # longer than a SHA-256 digest
    with pytest.raises(CredentialError):
        make_credential(key, b"\x00\x0b" + b"\x11" * 31, b"secret")  # short name
    with pytest.raises(CredentialError):
        make_credential(ec.generate_private_key(ec.SECP521R1()).public_key(), name, b"s")


def _fake_public(attrs: int) -> bytes:
    # type ECC, nameAlg SHA-256, attributes, then an arbitrary tail
    return struct.pack(">HHI", 0x0023, 0x000B, attrs) + b"\x00" * 40


def test_ak_public_must_be_restricted_signing_and_fixed():
    ak_attrs = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | RESTRICTED | (1 << 18)
    name = check_ak_public(_fake_public(ak_attrs))
    assert name == name_of_public(_fake_public(ak_attrs)) and name[:2] == b"\x00\x0b"
    assert len(name) == 34
    for missing in (1 << 1, 1 << 4, 1 << 5, RESTRICTED, 1 << 18):  # fixedTPM, ..., sign
        with pytest.raises(CredentialError):
            check_ak_public(_fake_public(ak_attrs & ~missing))
    with pytest.raises(CredentialError):  # a restricted decryption key is not an AK
        check_ak_public(_fake_public(ak_attrs | (1 << 17)))
    with pytest.raises(CredentialError):
        check_ak_public(b"\x00\x23")


def test_ecc_secret_is_a_marshalled_point():
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    blob, secret = make_credential(key, b"\x00\x0b" + b"\x22" * 32, b"abc")
    assert len(secret) == 2 + 32 + 2 + 32 and secret[:2] == b"\x00\x20"
    assert struct.unpack(">H", blob[:2])[0] == 32 and len(blob) == 2 + 32 + 2 + 3
