"""TPM2_MakeCredential in pure Python (the server needs no TPM).

Given the endorsement key's public key (from its certificate) and the *name* of an attestation
key (nameAlg || H(TPMT_PUBLIC)), produce (credentialBlob, encryptedSecret) exactly as
TPM2_MakeCredential does (TPM 2.0 Part 1 §24 "Credential Protection", Part 3 §12.6):

  seed            RSA EK: random, OAEP(nameAlg, label "IDENTITY\\0") encrypted to the EK
                  ECC EK: ECDH(ephemeral, EK) -> Z;  seed = KDFe(nameAlg, Z, "IDENTITY", ephX, ekX)
  symKey          = KDFa(nameAlg, seed, "STORAGE", name, "", symBits)
  encIdentity     = AES-CFB(symKey, IV = 0) of TPM2B_DIGEST(credential)
  HMACkey         = KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits)
  outerHMAC       = HMAC(HMACkey, encIdentity || name)
  credentialBlob  = TPM2B_DIGEST(outerHMAC) || encIdentity      (contents of TPM2B_ID_OBJECT)
  encryptedSecret = RSA ciphertext, or TPMS_ECC_POINT(ephemeral)  (contents of TPM2B_ENCRYPTED_SECRET)

Only the TPM holding the EK's private key can recover the seed, and it releases the credential
only if the key named in the blob is loaded in that same TPM: that proves the AK and the EK share
a TPM. The nameAlg and symmetric key size are the EK's (TCG EK profile templates: L-1 RSA 2048
and L-2 ECC P-256 use SHA-256 / AES-128; H-3 ECC P-384 uses SHA-384 / AES-256).
"""
from __future__ import annotations

import hmac as _hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

try:  # cryptography >= 47 keeps CFB under "decrepit"
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover
    from cryptography.hazmat.primitives.ciphers.modes import CFB

# TPM_ALG_ID values (Part 2 §6.3)
TPM_ALG_RSA = 0x0001
TPM_ALG_SHA256 = 0x000B
TPM_ALG_SHA384 = 0x000C
TPM_ALG_SHA512 = 0x000D
TPM_ALG_ECC = 0x0023
TPM_ALG_KEYEDHASH = 0x0008

_HASHES = {TPM_ALG_SHA256: hashes.SHA256, TPM_ALG_SHA384: hashes.SHA384,
           TPM_ALG_SHA512: hashes.SHA512}

# TPMA_OBJECT bits (Part 2 §8.3)
FIXED_TPM = 1 << 1
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN = 1 << 18
AK_REQUIRED = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN

MAX_CREDENTIAL = 64  # TPM2B_DIGEST buffer; the credential must fit a digest of nameAlg


class CredentialError(ValueError):
    """Bad input to MakeCredential (unsupported key, malformed name or public area)."""


def _hash(alg: int) -> hashes.HashAlgorithm:
    try:
        return _HASHES[alg]()
    except KeyError:
        raise CredentialError(f"unsupported hash algorithm 0x{alg:04x}") from None


def _label(label: bytes) -> bytes:
    return label if label.endswith(b"\0") else label + b"\0"


def kdfa(hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes,
         bits: int) -> bytes:
    """KDFa (Part 1 §11.4.10.2) is SP 800-108 counter mode with HMAC: `cryptography`'s KBKDFHMAC.
    Its fixed input, label || 0x00 || context || L, is the TPM's Label-with-NUL || U || V || bits."""
    if bits % 8:
        raise CredentialError("KDFa is used here for whole bytes only")
    return KBKDFHMAC(algorithm=_hash(hash_alg), mode=Mode.CounterMode, length=bits // 8, rlen=4,
                     llen=4, location=CounterLocation.BeforeFixed, label=label.rstrip(b"\0"),
                     context=context_u + context_v, fixed=None).derive(key)


def kdfe(hash_alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes,
         bits: int) -> bytes:
    """KDFe (Part 1 §11.4.10.3) is the SP 800-56A one-step KDF: `cryptography`'s ConcatKDFHash,
    with Label-with-NUL || PartyUInfo || PartyVInfo as its OtherInfo."""
    if bits % 8:
        raise CredentialError("KDFe is used here for whole bytes only")
    return ConcatKDFHash(algorithm=_hash(hash_alg), length=bits // 8,
                         otherinfo=_label(label) + party_u + party_v).derive(z)


# --- TPMT_PUBLIC helpers (only the fixed-position header is parsed) -----------------------

@dataclass(frozen=True)
class PublicHeader:
    type: int
    name_alg: int
    attributes: int


def parse_public_header(tpmt_public: bytes) -> PublicHeader:
    if len(tpmt_public) < 8:
        raise CredentialError("TPMT_PUBLIC too short")
    t, n, a = struct.unpack(">HHI", tpmt_public[:8])
    return PublicHeader(t, n, a)


def unwrap_tpm2b(data: bytes) -> bytes:
    """The contents of a marshalled TPM2B (u16 size || bytes); the whole input must be used."""
    if len(data) < 2:
        raise CredentialError("TPM2B too short")
    (size,) = struct.unpack(">H", data[:2])
    if size != len(data) - 2:
        raise CredentialError("TPM2B size does not match its length")
    return data[2:]


def name_of_public(tpmt_public: bytes) -> bytes:
    """The TPM name of an object: nameAlg (u16) || H_nameAlg(TPMT_PUBLIC)."""
    hdr = parse_public_header(tpmt_public)
    d = hashes.Hash(_hash(hdr.name_alg))
    d.update(tpmt_public)
    return struct.pack(">H", hdr.name_alg) + d.finalize()


def check_ak_public(tpmt_public: bytes) -> bytes:
    """Check that a public area describes a TPM-generated, non-duplicable, restricted signing
    key (an attestation key); return its name."""
    hdr = parse_public_header(tpmt_public)
    if hdr.attributes & AK_REQUIRED != AK_REQUIRED:
        raise CredentialError("attestation key must be fixedTPM, fixedParent, "
                              "sensitiveDataOrigin, restricted and sign")
    if hdr.attributes & DECRYPT:
        raise CredentialError("attestation key must not be a decryption key")
    return name_of_public(tpmt_public)


# --- MakeCredential -------------------------------------------------------------------------

def ek_parameters(ek_public) -> tuple[int, int]:
    """(nameAlg, symmetric key bits) of the TCG EK template an EK public key comes from."""
    if isinstance(ek_public, rsa.RSAPublicKey):
        if ek_public.key_size == 2048:
            return TPM_ALG_SHA256, 128
        raise CredentialError(f"unsupported RSA EK size {ek_public.key_size}")
    if isinstance(ek_public, ec.EllipticCurvePublicKey):
        if isinstance(ek_public.curve, ec.SECP256R1):
            return TPM_ALG_SHA256, 128
        if isinstance(ek_public.curve, ec.SECP384R1):
            return TPM_ALG_SHA384, 256
        raise CredentialError(f"unsupported ECC EK curve {ek_public.curve.name}")
    raise CredentialError("EK public key must be RSA or ECC")


def _int_bytes(v: int, size: int) -> bytes:
    return v.to_bytes(size, "big")


def make_credential(ek_public, ak_name: bytes, credential: bytes, *,
                    name_alg: int | None = None, sym_bits: int | None = None
                    ) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential. Returns (credentialBlob, encryptedSecret): the *contents* of the
    TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET the device passes to TPM2_ActivateCredential."""
    dflt_alg, dflt_bits = ek_parameters(ek_public)
    name_alg = name_alg or dflt_alg
    sym_bits = sym_bits or dflt_bits
    h = _hash(name_alg)
    if not credential or len(credential) > h.digest_size:
        raise CredentialError(f"credential must be 1..{h.digest_size} bytes")
    if len(ak_name) < 2 or struct.unpack(">H", ak_name[:2])[0] not in _HASHES:
        raise CredentialError("AK name must be nameAlg || digest")
    if len(ak_name) != 2 + _hash(struct.unpack(">H", ak_name[:2])[0]).digest_size:
        raise CredentialError("AK name has the wrong length for its nameAlg")

    seed, secret = create_seed(ek_public, b"IDENTITY", name_alg)
    blob = outer_wrap(seed, name_alg, sym_bits, ak_name,
                      struct.pack(">H", len(credential)) + credential)  # TPM2B_DIGEST
    return blob, secret


# --- the two halves shared with duplication (attestation/duplicate.py) ----------------------

def create_seed(ek_public, label: bytes, name_alg: int) -> tuple[bytes, bytes]:
    """A fresh seed only the holder of the EK's private key can recover (Part 1 §11.4.10 /
    Part 3 CryptSecretEncrypt). Returns (seed, encryptedSecret contents).

    RSA: the seed is random, OAEP(nameAlg, label-with-NUL) encrypted to the EK.
    ECC: ECDH of an ephemeral key with the EK; seed = KDFe(nameAlg, Z, label, ephX, ekX) and
    the secret is the ephemeral point (TPMS_ECC_POINT). `label` is b"IDENTITY" for
    MakeCredential, b"DUPLICATE" for Import."""
    h = _hash(name_alg)
    if isinstance(ek_public, rsa.RSAPublicKey):
        seed = os.urandom(h.digest_size)
        secret = ek_public.encrypt(seed, padding.OAEP(
            mgf=padding.MGF1(algorithm=_hash(name_alg)), algorithm=_hash(name_alg),
            label=_label(label)))
        return seed, secret
    if isinstance(ek_public, ec.EllipticCurvePublicKey):
        curve = ek_public.curve
        size = (curve.key_size + 7) // 8
        eph = ec.generate_private_key(curve)
        z = eph.exchange(ec.ECDH(), ek_public)  # x-coordinate of the shared point
        ephn = eph.public_key().public_numbers()
        ekn = ek_public.public_numbers()
        seed = kdfe(name_alg, z, label.rstrip(b"\0"), _int_bytes(ephn.x, size),
                    _int_bytes(ekn.x, size), h.digest_size * 8)
        x, y = _int_bytes(ephn.x, size), _int_bytes(ephn.y, size)
        secret = struct.pack(">H", size) + x + struct.pack(">H", size) + y  # TPMS_ECC_POINT
        return seed, secret
    raise CredentialError("EK public key must be RSA or ECC")


def outer_wrap(seed: bytes, name_alg: int, sym_bits: int, name: bytes, plain: bytes) -> bytes:
    """The outer wrapper (Part 1 §24 / §23.3.2.3) shared by credentials and duplicates:
    AES-CFB (IV 0) under KDFa(seed, "STORAGE", name), then an HMAC under
    KDFa(seed, "INTEGRITY") over (ciphertext || name). Returns TPM2B_DIGEST(HMAC) || ciphertext
    (the contents of a TPM2B_ID_OBJECT or of a duplicate TPM2B_PRIVATE)."""
    h = _hash(name_alg)
    sym_key = kdfa(name_alg, seed, b"STORAGE", name, b"", sym_bits)
    enc = Cipher(algorithms.AES(sym_key), CFB(b"\0" * 16)).encryptor()
    encrypted = enc.update(plain) + enc.finalize()
    hmac_key = kdfa(name_alg, seed, b"INTEGRITY", b"", b"", h.digest_size * 8)
    outer = _hmac.new(hmac_key, encrypted + name, h.name).digest()
    return struct.pack(">H", len(outer)) + outer + encrypted
