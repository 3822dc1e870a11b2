"""Channel secrets sealed to a device key with HPKE (RFC 9180, via `cryptography`).

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM. The HPKE `info` binds the
ciphertext to the device serial and the onboarding session; inside, H(M | N_device) binds it
to this onboarding's nonce and to the device's factory secret.
"""
from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

from .errors import BadSignature, MalformedMessage
from .messages import SealedSecret

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)


def hmn(nonce: bytes, n_device: bytes) -> bytes:
    return hashlib.sha256(b"zt-hmn|" + nonce + b"|" + n_device).digest()


def seal_info(serial: str, session: bytes) -> bytes:
    return b"zerotouch channel secret|" + serial.encode() + b"|" + session


def check_seal_key(recipient: bytes) -> x25519.X25519PublicKey:
    """Refuse anything but a usable X25519 key (wrong length, low-order points)."""
    try:
        pub = x25519.X25519PublicKey.from_public_bytes(recipient)
        x25519.X25519PrivateKey.generate().exchange(pub)  # fails for low-order points
    except ValueError:
        raise MalformedMessage("seal key is not a usable X25519 public key") from None
    return pub


def sealed_plaintext(*, serial: str, secret: bytes, nonce: bytes, n_device: bytes) -> bytes:
    """What is sealed, to an HPKE key or to a TPM: the secret bound to device and onboarding."""
    return SealedSecret(serial=serial, secret=secret, hmn=hmn(nonce, n_device)).encode()


def check_sealed_plaintext(plain: bytes, *, serial: str, nonce: bytes, n_device: bytes) -> bytes:
    """The channel secret inside an opened seal, if it is bound to this device and onboarding."""
    msg = SealedSecret.decode(plain)
    if msg.serial != serial or not hmac.compare_digest(msg.hmn, hmn(nonce, n_device)):
        raise BadSignature("sealed secret is not bound to this onboarding (H(M|N) differs)")
    return msg.secret


def seal_secret(recipient: bytes, *, serial: str, session: bytes, secret: bytes,
                nonce: bytes, n_device: bytes) -> bytes:
    pub = check_seal_key(recipient)
    plain = sealed_plaintext(serial=serial, secret=secret, nonce=nonce, n_device=n_device)
    try:
        return SUITE.encrypt(plain, pub, info=seal_info(serial, session))
    except ValueError:
        raise MalformedMessage("seal key is not a usable X25519 public key") from None


def open_secret(private_key: x25519.X25519PrivateKey, blob: bytes, *, serial: str,
                session: bytes, nonce: bytes, n_device: bytes) -> bytes:
    """Open and check a sealed secret; return the 32-byte channel secret."""
    try:
        plain = SUITE.decrypt(blob, private_key, info=seal_info(serial, session))
    except Exception:
        raise BadSignature("sealed secret does not open with this device's key") from None
    return check_sealed_plaintext(plain, serial=serial, nonce=nonce, n_device=n_device)
