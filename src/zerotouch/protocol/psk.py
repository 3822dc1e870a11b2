"""The PSK profile: onboarding for devices without public-key crypto (only HMAC, HKDF, AES).

A PSK device holds a 32-byte pre-shared key (from its box, `services.bulk.derive_psk`, or set
at manufacture) and N_device. Its messages and the answers it gets are COSE_Mac0 (RFC 9052
§6.2, HMAC 256/256) instead of COSE_Sign1, and its channel secret comes wrapped with AES-GCM
instead of sealed with HPKE. Every key is derived with HKDF-SHA256 (`cryptography`), one per
direction and purpose, so no MAC made for one use verifies in another:

    PSK ──HKDF "rendezvous-leg|serial"──> K_rv   (the only key the rendezvous ever holds)
          K_rv ──"mac dev->rv|serial"──> FindOwner      K_rv ──"mac rv->dev|serial"──> Redirect
    PSK ──"mac dev->gw|serial"──> Hello, PskProve, Done
    PSK ──"mac gw->dev|serial"──> Challenge, PskCredentials, DoneAck
    PSK ──"mac bundle|serial"───> PskBundle (kept by the device; verifiable again later)
    PSK ──"wrap|serial|session"──> K_ws (given to the vault, one onboarding only)
          K_ws ──HKDF salt=N_device "wrap-n|serial"──> AES-256-GCM key for the channel secret
    channel secret ──"terminus-psk|serial"──> the TLS-PSK key at the terminus (identity = serial)

The rendezvous is given K_rv (not the PSK) by the claim, checked against a commitment
H("zt-psk-commit" | serial | K_rv) the manufacturer registered: with it the rendezvous can
authenticate a find-owner and MAC a redirect, nothing else (it cannot speak for the owner nor
open a wrapped secret). The owner still proves itself with H(N_device | M) in the challenge.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Optional

import cbor2
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .codec import MAX_MESSAGE, Message, f, loads_bounded
from .errors import BadSignature, MalformedMessage
from .messages import HASH_LEN, NONCE_LEN, SESSION_LEN
from .sealing import check_sealed_plaintext, sealed_plaintext, seal_info

COSE_MAC0_TAG = 17
HDR_ALG = 1
HDR_KID = 4
ALG_HMAC_256_256 = 5
MAC_LEN = 32
KEY_LEN = 32
PSK_MIN = 16
SALT = b"zerotouch psk-profile v1"

# purposes (HKDF info prefixes)
RV_LEG = b"rendezvous-leg|"
DEV_TO_RV = b"mac dev->rv|"
RV_TO_DEV = b"mac rv->dev|"
DEV_TO_GW = b"mac dev->gw|"
GW_TO_DEV = b"mac gw->dev|"
BUNDLE = b"mac bundle|"
WRAP = b"wrap|"
WRAP_N = b"wrap-n|"
TERMINUS = b"terminus-psk|"
COMMIT = b"zt-psk-commit|"
DEVICE_FP = b"zt-psk-device|"


# --- keys ----------------------------------------------------------------------------------
def _hkdf(ikm: bytes, info: bytes, *, salt: bytes = SALT, length: int = KEY_LEN) -> bytes:
    if not isinstance(ikm, (bytes, bytearray)) or len(ikm) < PSK_MIN:
        raise ValueError(f"key material must be at least {PSK_MIN} bytes")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(bytes(ikm))


def _s(serial: str) -> bytes:
    return serial.encode()


def rendezvous_key(psk: bytes, serial: str) -> bytes:
    """K_rv: what the claim gives the rendezvous (never the PSK itself)."""
    return _hkdf(psk, RV_LEG + _s(serial))


def psk_commitment(k_rv: bytes, serial: str) -> bytes:
    """What the manufacturer registers, so the rendezvous can check a claimed K_rv."""
    return hashlib.sha256(COMMIT + _s(serial) + b"|" + k_rv).digest()


def psk_device_fp(serial: str) -> bytes:
    """What a PSK device's gateway session records where a certificate device's has its IDevID
    fingerprint: never equal to a certificate's, so neither kind can continue the other's session."""
    return hashlib.sha256(DEVICE_FP + _s(serial)).digest()


@dataclass(frozen=True)
class RendezvousLegKeys:
    """The two MAC keys of the device <-> rendezvous leg (from K_rv)."""
    up: bytes     # device -> rendezvous
    down: bytes   # rendezvous -> device

    @classmethod
    def from_rv_key(cls, k_rv: bytes, serial: str) -> "RendezvousLegKeys":
        return cls(up=_hkdf(k_rv, DEV_TO_RV + _s(serial)), down=_hkdf(k_rv, RV_TO_DEV + _s(serial)))


@dataclass(frozen=True)
class GatewayLegKeys:
    """The MAC keys of the device <-> owner gateway leg (from the PSK)."""
    up: bytes       # device -> gateway
    down: bytes     # gateway -> device
    bundle: bytes   # the configuration bundle

    @classmethod
    def from_psk(cls, psk: bytes, serial: str) -> "GatewayLegKeys":
        return cls(up=_hkdf(psk, DEV_TO_GW + _s(serial)), down=_hkdf(psk, GW_TO_DEV + _s(serial)),
                   bundle=_hkdf(psk, BUNDLE + _s(serial)))


def session_wrap_key(psk: bytes, serial: str, session: bytes) -> bytes:
    """K_ws: bound to one onboarding session; the gateway hands it to the vault (which adds
    N_device), so the vault never sees the PSK and the gateway never sees N_device."""
    return _hkdf(psk, WRAP + _s(serial) + b"|" + session)


def _wrap_aead(k_ws: bytes, n_device: bytes, serial: str) -> AESGCM:
    return AESGCM(_hkdf(k_ws, WRAP_N + _s(serial), salt=hashlib.sha256(b"zt-n|" + n_device).digest()))


def terminus_psk(channel_secret: bytes, serial: str) -> bytes:
    """The key the device and the terminus use for TLS-PSK (identity = serial)."""
    return _hkdf(channel_secret, TERMINUS + _s(serial))


# --- the wrapped channel secret --------------------------------------------------------------
WRAP_NONCE = 12


def wrap_secret(k_ws: bytes, *, serial: str, session: bytes, secret: bytes, nonce: bytes,
                n_device: bytes, rng=os.urandom) -> bytes:
    """AES-256-GCM over the SealedSecret plaintext (serial, secret, H(M | N_device)); the AAD
    binds serial and session as the HPKE `info` does. Wire form: 12-byte nonce || ciphertext."""
    iv = rng(WRAP_NONCE)
    plain = sealed_plaintext(serial=serial, secret=secret, nonce=nonce, n_device=n_device)
    return iv + _wrap_aead(k_ws, n_device, serial).encrypt(iv, plain, seal_info(serial, session))


def unwrap_secret(k_ws: bytes, blob: bytes, *, serial: str, session: bytes, nonce: bytes,
                  n_device: bytes) -> bytes:
    if not isinstance(blob, bytes) or len(blob) < WRAP_NONCE + 16:
        raise MalformedMessage("wrapped secret is too short")
    try:
        plain = _wrap_aead(k_ws, n_device, serial).decrypt(blob[:WRAP_NONCE], blob[WRAP_NONCE:],
                                                           seal_info(serial, session))
    except InvalidTag:
        raise BadSignature("wrapped secret does not open with this device's PSK and N_device") from None
    return check_sealed_plaintext(plain, serial=serial, nonce=nonce, n_device=n_device)


# --- COSE_Mac0 (RFC 9052 §6.2) with HMAC 256/256 -------------------------------------------
def _mac_structure(protected: bytes, payload: bytes, external_aad: bytes) -> bytes:
    return cbor2.dumps(["MAC0", protected, external_aad, payload])


def _hmac(key: bytes, data: bytes) -> crypto_hmac.HMAC:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h


def mac0(payload: bytes, key: bytes, *, kid: bytes | None = None, external_aad: bytes = b"") -> bytes:
    """A tagged COSE_Mac0 over `payload` (HMAC-SHA256, full 32-byte tag)."""
    prot: dict[int, Any] = {HDR_ALG: ALG_HMAC_256_256}
    if kid is not None:
        prot[HDR_KID] = kid
    protected = cbor2.dumps(prot, canonical=True)
    tag = _hmac(key, _mac_structure(protected, payload, external_aad)).finalize()
    return cbor2.dumps(cbor2.CBORTag(COSE_MAC0_TAG, [protected, {}, payload, tag]))


@dataclass(frozen=True)
class Mac0:
    """A parsed, not yet verified COSE_Mac0."""
    protected_raw: bytes
    protected: dict
    payload: bytes
    tag: bytes

    @property
    def kid(self) -> bytes | None:
        kid = self.protected.get(HDR_KID)
        return kid if isinstance(kid, bytes) else None

    def verify(self, key: bytes, external_aad: bytes = b"") -> bytes:
        """Check the MAC with `key` (constant time); return the payload on success."""
        try:   # cryptography compares in constant time
            _hmac(key, _mac_structure(self.protected_raw, self.payload, external_aad)).verify(self.tag)
        except InvalidSignature:
            raise BadSignature("MAC does not verify (another key: not this device's PSK)") from None
        return self.payload


def is_mac0(data) -> bool:
    """A cheap look at the first bytes: CBOR tag 17 (0xd1) starts a tagged COSE_Mac0."""
    return isinstance(data, (bytes, bytearray)) and len(data) > 1 and data[0] == 0xD1


def parse_mac0(data: bytes, *, max_size: int = MAX_MESSAGE) -> Mac0:
    """Strictly parse a COSE_Mac0; raises MalformedMessage on anything unexpected."""
    obj = loads_bounded(data, max_size=max_size)
    if not (isinstance(obj, cbor2.CBORTag) and obj.tag == COSE_MAC0_TAG):
        raise MalformedMessage("not a COSE_Mac0 (tag 17)")
    obj = obj.value
    if not (isinstance(obj, list) and len(obj) == 4):
        raise MalformedMessage("COSE_Mac0 must be an array of 4")
    protected_raw, unprotected, payload, tag = obj
    if not (isinstance(protected_raw, bytes) and isinstance(unprotected, dict)
            and isinstance(payload, bytes) and isinstance(tag, bytes)):
        raise MalformedMessage("COSE_Mac0 fields have the wrong types")
    if unprotected:
        raise MalformedMessage("COSE_Mac0 unprotected header must be empty")
    if len(tag) != MAC_LEN:
        raise BadSignature("MAC has the wrong length")
    try:
        protected = cbor2.loads(protected_raw) if protected_raw else {}
    except Exception:
        raise MalformedMessage("protected header is not CBOR") from None
    if (not isinstance(protected, dict) or protected.get(HDR_ALG) != ALG_HMAC_256_256
            or not set(protected) <= {HDR_ALG, HDR_KID}):
        raise MalformedMessage("only HMAC 256/256 COSE_Mac0 with alg and kid is accepted")
    kid = protected.get(HDR_KID)
    if kid is not None and not (isinstance(kid, bytes) and 1 <= len(kid) <= 64):
        raise MalformedMessage("kid must be 1 to 64 bytes")
    return Mac0(protected_raw, protected, payload, tag)


def device_kid(serial: str) -> bytes:
    return _s(serial)


# --- messages of the PSK profile -----------------------------------------------------------
@dataclass(frozen=True)
class RvRegisterPsk(Message):
    """A PSK device made at the factory (no IDevID); signed by the manufacturer CA key. Carries
    the salted OTP hash and the commitment to K_rv, never a key."""
    TYPE = 20
    serial: str = f(1, min_len=1, max_len=64)
    urn: str = f(2, min_len=1, max_len=128)
    otp_salt: bytes = f(3, min_len=16, max_len=16)
    otp_hash: bytes = f(4, min_len=HASH_LEN, max_len=HASH_LEN)
    psk_commit: bytes = f(5, min_len=HASH_LEN, max_len=HASH_LEN)


@dataclass(frozen=True)
class PskProve(Message):
    """Device -> gateway, MAC'd: answers the challenge. No CSR, no seal key."""
    TYPE = 21
    session: bytes = f(1, min_len=SESSION_LEN, max_len=SESSION_LEN)
    challenge: bytes = f(2, min_len=NONCE_LEN, max_len=NONCE_LEN)


@dataclass(frozen=True)
class PskBundle(Message):
    """The owner's configuration for a PSK device, MAC'd with the bundle key. The terminus is
    reached with TLS-PSK: identity `psk_identity`, key `terminus_psk(channel secret, serial)`."""
    TYPE = 23
    serial: str = f(1, min_len=1, max_len=64)
    terminus_host: str = f(2, min_len=1, max_len=253)
    terminus_port: int = f(3)
    topic_prefix: str = f(4, min_len=1, max_len=128)
    psk_identity: str = f(5, min_len=1, max_len=64)
    settings: dict = f(6, max_len=64)
    issued: int = f(7)


@dataclass(frozen=True)
class PskCredentials(Message):
    """Gateway -> device, MAC'd: the wrapped channel secret and the MAC'd bundle."""
    TYPE = 22
    session: bytes = f(1, min_len=SESSION_LEN, max_len=SESSION_LEN)
    nonce: bytes = f(2, min_len=NONCE_LEN, max_len=NONCE_LEN)
    wrapped_secret: bytes = f(3, min_len=WRAP_NONCE + 16, max_len=256)
    bundle: bytes = f(4, min_len=1, max_len=1024)   # COSE_Mac0 over a PskBundle


class PskIdentityError(ValueError):
    """A PSK or a PSK device's files are unusable (the message never names a key)."""


def bundle_hash(bundle_raw: bytes) -> bytes:
    """What a PSK device's Done reports in `ldevid_fp`: the hash of the bundle it stored."""
    return hashlib.sha256(bundle_raw).digest()


def parse_psk_hex(value: Optional[str], name: str = "cpsk") -> bytes | None:
    """A 32-byte key given as 64 hex digits (claim field `cpsk`: K_rv)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MalformedMessage(f"{name} must be a string")
    v = value.strip().lower()
    try:
        raw = bytes.fromhex(v)
    except ValueError:
        raw = b""
    if len(raw) != KEY_LEN:
        raise MalformedMessage(f"{name} (the device's rendezvous key K_rv) must be 64 hex digits")
    return raw
