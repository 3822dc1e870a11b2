"""Secrets only one TPM can open: a sealed-data object duplicated to a device's EK, in pure Python.

The server (which has no TPM) builds what TPM2_Duplicate would output for a new parent, and the
device's TPM takes it in with TPM2_Import under its EK, TPM2_Load and TPM2_Unseal
(`zerotouch.identity.tpm.sealing.unseal_imported`). Part 1 §23.3 "Duplication" and §24 (outer
wrapper); tpm2-pytss ``utils.wrap`` and tpm2-tools ``tpm2_duplicate`` build the same bytes.

  object          KEYEDHASH, nameAlg SHA-256, attributes userWithAuth only, empty authPolicy,
                  scheme NULL (sealed data), unique = SHA-256(seedValue || data)
  sensitive       TPMT_SENSITIVE(KEYEDHASH, authValue empty, seedValue random, data)
  seed            RSA EK: random, OAEP label "DUPLICATE\\0"; ECC EK: ECDH + KDFe "DUPLICATE"
  symKey          KDFa(EK nameAlg, seed, "STORAGE", name(object), "", EK symmetric bits)
  dupSensitive    AES-CFB(symKey, IV 0) of TPM2B_SENSITIVE      (no inner wrapper)
  outerHMAC       HMAC(KDFa(seed, "INTEGRITY"), dupSensitive || name(object))
  duplicate       TPM2B_DIGEST(outerHMAC) || dupSensitive        (TPM2B_PRIVATE contents)

Why these attributes: Import refuses objects with fixedTPM or fixedParent set (they could not
have been duplicated), and sensitiveDataOrigin would claim the TPM made the data. With
encryptedDuplication clear, no inner wrapper is needed: the outer wrapper already binds the
blob to one EK, and its HMAC covers the object's name, so neither the public area nor the
ciphertext can be changed. The authValue is empty because the secret is protected by where it
can be opened (one TPM), not by a password; the random seedValue keeps the public ``unique``
digest from revealing a guessable secret.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from .credential import (TPM_ALG_ECC, TPM_ALG_KEYEDHASH, TPM_ALG_NULL, TPM_ALG_RSA,
                         TPM_ALG_SHA256, CredentialError, create_seed, ek_parameters,
                         name_of_public, outer_wrap, parse_public)

MAX_SEALED_DATA = 128  # MAX_SYM_DATA: the largest TPM2B_SENSITIVE_DATA a TPM must accept

# TPMA_OBJECT bits (Part 2 §8.3)
USER_WITH_AUTH = 1 << 6
SEALED_ATTRIBUTES = USER_WITH_AUTH
RESTRICTED = 1 << 16
DECRYPT = 1 << 17

# Limits for to_bytes/from_bytes: a TPMT_PUBLIC (RSA 4096 is the largest), a TPM2B_PRIVATE
# buffer, a TPM2B_ENCRYPTED_SECRET (an RSA-4096 ciphertext).
_MAX_PUBLIC, _MAX_DUPLICATE, _MAX_SEED = 1024, 2048, 512
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SealedForTpm:
    """A secret only one TPM can open. All three are the *contents* of the TPM2B the device
    passes to TPM2_Import (no size prefix), like ``AkBlob``:

      public     marshalled TPMT_PUBLIC of the sealed-data object (not TPM2B_PUBLIC)
      duplicate  TPM2B_PRIVATE contents: TPM2B_DIGEST(outerHMAC) || encrypted TPM2B_SENSITIVE
      seed       TPM2B_ENCRYPTED_SECRET contents: the seed encrypted to the EK
    """
    public: bytes
    duplicate: bytes
    seed: bytes

    def to_bytes(self) -> bytes:
        """version (1 byte) || u16 len || public || u16 len || duplicate || u16 len || seed."""
        out = bytearray([_FORMAT_VERSION])
        for field, limit in self._fields():
            value = getattr(self, field)
            if len(value) > limit:
                raise ValueError(f"sealed secret: {field} is {len(value)} bytes, at most "
                                 f"{limit} allowed")
            out += struct.pack(">H", len(value)) + value
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> "SealedForTpm":
        """The inverse of ``to_bytes``; anything short, oversized, trailing or not a sealed-data
        public area raises ValueError."""
        data = bytes(data)
        if not data or data[0] != _FORMAT_VERSION:
            raise ValueError("not a sealed secret (unknown format version)")
        pos, values = 1, {}
        for field, limit in cls._fields():
            if pos + 2 > len(data):
                raise ValueError(f"sealed secret is truncated before {field}")
            (size,) = struct.unpack(">H", data[pos:pos + 2])
            if size > limit:
                raise ValueError(f"sealed secret: {field} is {size} bytes, at most {limit} "
                                 "allowed")
            if size == 0:
                raise ValueError(f"sealed secret: {field} is empty")
            pos += 2
            if pos + size > len(data):
                raise ValueError(f"sealed secret is truncated in {field}")
            values[field] = data[pos:pos + size]
            pos += size
        if pos != len(data):
            raise ValueError(f"sealed secret has {len(data) - pos} trailing bytes")
        sealed = cls(**values)
        check_sealed_public(sealed.public)
        return sealed

    @staticmethod
    def _fields() -> tuple[tuple[str, int], ...]:
        return (("public", _MAX_PUBLIC), ("duplicate", _MAX_DUPLICATE), ("seed", _MAX_SEED))


def sealed_data_public(seed_value: bytes, data: bytes) -> bytes:
    """The TPMT_PUBLIC of a KEYEDHASH sealed-data object holding `data` (Part 2 §12.2.4)."""
    unique = hashes.Hash(hashes.SHA256())
    unique.update(seed_value + data)  # Part 1 §27.2.3 / ComputeSymmetricUnique
    digest = unique.finalize()
    return (struct.pack(">HHI", TPM_ALG_KEYEDHASH, TPM_ALG_SHA256, SEALED_ATTRIBUTES)
            + struct.pack(">H", 0)                      # authPolicy: none
            + struct.pack(">H", TPM_ALG_NULL)           # TPMT_KEYEDHASH_SCHEME: sealed data
            + struct.pack(">H", len(digest)) + digest)  # unique


def sealed_data_sensitive(seed_value: bytes, data: bytes) -> bytes:
    """TPM2B_SENSITIVE: size || TPMT_SENSITIVE(KEYEDHASH, authValue, seedValue, data)."""
    body = (struct.pack(">H", TPM_ALG_KEYEDHASH)
            + struct.pack(">H", 0)                                # authValue: empty
            + struct.pack(">H", len(seed_value)) + seed_value     # seedValue (obfuscation)
            + struct.pack(">H", len(data)) + data)                # TPM2B_SENSITIVE_DATA
    return struct.pack(">H", len(body)) + body


def check_sealed_public(tpmt_public: bytes) -> None:
    """A public area is one this module makes: KEYEDHASH sealed data that Import accepts."""
    pub = parse_public(tpmt_public, ValueError)  # strict: truncated or trailing bytes refused
    if pub.type != TPM_ALG_KEYEDHASH or pub.scheme != TPM_ALG_NULL:
        raise ValueError("sealed secret: public area is not a KEYEDHASH sealed-data object")
    if pub.name_alg != TPM_ALG_SHA256 or len(pub.unique) != 32:
        raise ValueError("sealed secret: public area must use SHA-256")
    if pub.attributes != SEALED_ATTRIBUTES or pub.auth_policy:
        raise ValueError("sealed secret: public area must have attributes userWithAuth only "
                         "and no policy")


def _ek_key_and_parameters(ek_public) -> tuple[object, int, int]:
    """(cryptography key, nameAlg, symmetric bits) from a key or a marshalled TPMT_PUBLIC."""
    if isinstance(ek_public, (bytes, bytearray, memoryview)):
        pub = parse_public(bytes(ek_public))
        if pub.type not in (TPM_ALG_RSA, TPM_ALG_ECC):
            raise CredentialError("EK public area must be RSA or ECC")
        if pub.attributes & (RESTRICTED | DECRYPT) != RESTRICTED | DECRYPT:
            raise CredentialError("the new parent must be a restricted decryption key (a "
                                  "storage key such as the EK)")
        if pub.sym_alg == TPM_ALG_NULL or not pub.sym_bits:
            raise CredentialError("the new parent has no symmetric algorithm")
        return pub.public_key(), pub.name_alg, pub.sym_bits
    name_alg, sym_bits = ek_parameters(ek_public)  # TCG EK template defaults
    return ek_public, name_alg, sym_bits


def seal_to_tpm(ek_public, data: bytes) -> SealedForTpm:
    """Seal `data` (at most 128 bytes) so that only the TPM holding this EK can unseal it.

    `ek_public` is the EK's `cryptography` public key (as for ``make_credential``, e.g. from
    its certificate; the TCG default template's nameAlg and AES size are assumed) or the EK's
    marshalled TPMT_PUBLIC (its own nameAlg and symmetric algorithm are used)."""
    data = bytes(data)
    if len(data) > MAX_SEALED_DATA:
        raise ValueError(f"a TPM can seal at most {MAX_SEALED_DATA} bytes, not {len(data)}")
    key, parent_name_alg, sym_bits = _ek_key_and_parameters(ek_public)
    seed_value = os.urandom(32)  # SHA-256 digest size, as the TPM requires for KEYEDHASH
    public = sealed_data_public(seed_value, data)
    name = name_of_public(public)
    seed, encrypted_seed = create_seed(key, b"DUPLICATE", parent_name_alg)
    duplicate = outer_wrap(seed, parent_name_alg, sym_bits, name,
                           sealed_data_sensitive(seed_value, data))
    return SealedForTpm(public=public, duplicate=duplicate, seed=encrypted_seed)
