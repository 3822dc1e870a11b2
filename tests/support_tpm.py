"""Test helper: what TPM2_Import does with a sealed-for-TPM blob, done with the EK's private key
(a software "EK"), so vault and duplication tests can open seals without a TPM."""
from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from zerotouch.attestation.credential import CFB, kdfa, kdfe, name_of_public, parse_public
from zerotouch.attestation.duplicate import SealedForTpm


def unwrap_sealed(sealed: SealedForTpm, ek_private) -> bytes:
    """What TPM2_Import does with the outer wrapper, then the data out of TPMT_SENSITIVE."""
    if isinstance(ek_private, rsa.RSAPrivateKey):
        seed = ek_private.decrypt(sealed.seed, padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"DUPLICATE\0"))
    else:
        (xl,) = struct.unpack(">H", sealed.seed[:2])
        x = sealed.seed[2:2 + xl]
        y = sealed.seed[4 + xl:]
        eph = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                            ec.SECP256R1()).public_key()
        z = ek_private.exchange(ec.ECDH(), eph)
        ek_x = ek_private.public_key().public_numbers().x.to_bytes(32, "big")
        seed = kdfe(0x000B, z, b"DUPLICATE", x, ek_x, 256)
    name = name_of_public(sealed.public)
    (hl,) = struct.unpack(">H", sealed.duplicate[:2])
    outer, encrypted = sealed.duplicate[2:2 + hl], sealed.duplicate[2 + hl:]
    hmac_key = kdfa(0x000B, seed, b"INTEGRITY", b"", b"", 256)
    assert hmac.compare_digest(outer, hmac.new(hmac_key, encrypted + name, "sha256").digest())
    sym = kdfa(0x000B, seed, b"STORAGE", name, b"", 128)
    dec = Cipher(algorithms.AES(sym), CFB(b"\0" * 16)).decryptor()
    plain = dec.update(encrypted) + dec.finalize()
    (size,) = struct.unpack(">H", plain[:2])
    assert size == len(plain) - 2
    typ, auth_len = struct.unpack(">HH", plain[2:6])
    assert typ == 0x0008 and auth_len == 0  # KEYEDHASH, empty authValue
    (seed_len,) = struct.unpack(">H", plain[6:8])
    seed_value = plain[8:8 + seed_len]
    (data_len,) = struct.unpack(">H", plain[8 + seed_len:10 + seed_len])
    data = plain[10 + seed_len:]
    assert len(data) == data_len and seed_len == 32
    # the public unique digest binds the sensitive data (the TPM checks it on Load)
    assert parse_public(sealed.public).unique == hashlib.sha256(seed_value + data).digest()
    return data
