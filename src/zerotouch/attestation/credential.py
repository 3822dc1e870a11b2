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


class TpmReader:
    """A strict reader of TPM-marshalled (big-endian) structures: every read checks that the
    bytes are there and ``end()`` that none are left, so malformed input becomes `error` with
    the field's name, never an IndexError or struct.error."""

    def __init__(self, data: bytes, what: str, error: type[Exception] = CredentialError):
        self.data, self.pos, self.what, self.error = bytes(data), 0, what, error

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.error(f"{self.what} is truncated (in {field})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return struct.unpack(">H", self.take(2, field))[0]

    def u32(self, field: str) -> int:
        return struct.unpack(">I", self.take(4, field))[0]

    def u64(self, field: str) -> int:
        return struct.unpack(">Q", self.take(8, field))[0]

    def tpm2b(self, field: str, max_size: int | None = None) -> bytes:
        size = self.u16(field)
        if max_size is not None and size > max_size:
            raise self.error(f"{self.what}: {field} is {size} bytes, at most {max_size} allowed")
        return self.take(size, field)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.error(f"{self.what} has {len(self.data) - self.pos} unexpected trailing "
                             "bytes")


# Schemes whose TPMU details are a hash algorithm (ECDAA adds a count), Part 2 §11.2
_SCHEMES_WITH_HASH = {0x0005, 0x0014, 0x0016, 0x0017, 0x0018, 0x0019, 0x001A, 0x001B, 0x001C,
                      0x001D, 0x0020, 0x0021, 0x0022}
TPM_ALG_NULL = 0x0010
TPM_ALG_XOR = 0x000A
TPM_ALG_ECDAA = 0x001A
_CURVES = {0x0003: ec.SECP256R1, 0x0004: ec.SECP384R1, 0x0005: ec.SECP521R1}


@dataclass(frozen=True)
class TpmPublic:
    """The fields of a TPMT_PUBLIC (RSA, ECC or KEYEDHASH) that callers check."""
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    sym_alg: int          # parameters.symmetric (TPM_ALG_NULL for signing keys)
    sym_bits: int
    scheme: int           # signing/decryption scheme, TPM_ALG_NULL when unrestricted
    scheme_hash: int
    rsa_bits: int = 0
    rsa_exponent: int = 0
    curve: int = 0
    unique: bytes = b""   # RSA modulus, or KEYEDHASH digest
    ecc_x: bytes = b""
    ecc_y: bytes = b""

    def public_key(self):
        """The `cryptography` public key of an RSA or ECC public area."""
        try:
            if self.type == TPM_ALG_RSA:
                e = self.rsa_exponent or 65537
                return rsa.RSAPublicNumbers(e, int.from_bytes(self.unique, "big")).public_key()
            if self.type == TPM_ALG_ECC and self.curve in _CURVES:
                return ec.EllipticCurvePublicNumbers(
                    int.from_bytes(self.ecc_x, "big"), int.from_bytes(self.ecc_y, "big"),
                    _CURVES[self.curve]()).public_key()
        except ValueError as e:  # a point not on the curve, a silly modulus
            raise CredentialError(f"public area holds no valid key: {e}") from None
        raise CredentialError(f"no public key for object type 0x{self.type:04x} "
                              f"curve 0x{self.curve:04x}")


def parse_public(tpmt_public: bytes, error: type[Exception] = CredentialError) -> TpmPublic:
    """Parse a whole marshalled TPMT_PUBLIC (Part 2 §12.2.4); nothing may be left over."""
    r = TpmReader(tpmt_public, "TPMT_PUBLIC", error)
    typ, name_alg, attrs = r.u16("type"), r.u16("nameAlg"), r.u32("objectAttributes")
    policy = r.tpm2b("authPolicy", 64)
    sym_alg = sym_bits = 0
    if typ in (TPM_ALG_RSA, TPM_ALG_ECC):
        sym_alg = r.u16("symmetric.algorithm")
        if sym_alg == TPM_ALG_XOR:
            raise error("TPMT_PUBLIC: XOR is not a parent's symmetric algorithm")
        if sym_alg != TPM_ALG_NULL:
            sym_bits = r.u16("symmetric.keyBits")
            r.u16("symmetric.mode")
    scheme = r.u16("scheme")
    scheme_hash = 0
    if scheme in _SCHEMES_WITH_HASH or scheme == TPM_ALG_XOR:
        scheme_hash = r.u16("scheme.hashAlg")
        if scheme in (TPM_ALG_ECDAA, TPM_ALG_XOR):
            r.u16("scheme.count/kdf")
    elif scheme not in (TPM_ALG_NULL, 0x0015):  # 0x0015 RSAES has no details
        raise error(f"TPMT_PUBLIC: unknown scheme 0x{scheme:04x}")
    if typ == TPM_ALG_RSA:
        bits, exponent = r.u16("keyBits"), r.u32("exponent")
        n = r.tpm2b("unique.rsa", 512)
        r.end()
        return TpmPublic(typ, name_alg, attrs, policy, sym_alg, sym_bits, scheme, scheme_hash,
                         rsa_bits=bits, rsa_exponent=exponent, unique=n)
    if typ == TPM_ALG_ECC:
        curve = r.u16("curveID")
        if r.u16("kdf.scheme") != TPM_ALG_NULL:
            r.u16("kdf.hashAlg")
        x, y = r.tpm2b("unique.ecc.x", 128), r.tpm2b("unique.ecc.y", 128)
        r.end()
        return TpmPublic(typ, name_alg, attrs, policy, sym_alg, sym_bits, scheme, scheme_hash,
                         curve=curve, ecc_x=x, ecc_y=y)
    if typ == TPM_ALG_KEYEDHASH:
        unique = r.tpm2b("unique.keyedHash", 64)
        r.end()
        return TpmPublic(typ, name_alg, attrs, policy, 0, 0, scheme, scheme_hash, unique=unique)
    raise error(f"TPMT_PUBLIC: unsupported object type 0x{typ:04x}")


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
