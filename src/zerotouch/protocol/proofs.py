"""Hashes and proofs shared by the device and the servers."""
from __future__ import annotations

import hashlib
import hmac
import os


def owner_proof(n_device: bytes, nonce: bytes) -> bytes:
    """What only an owner that knows N_device can compute for this device nonce."""
    return hashlib.sha256(b"zt-owner-proof|" + n_device + b"|" + nonce).digest()


def check_owner_proof(proof: bytes, n_device: bytes, nonce: bytes) -> bool:
    return hmac.compare_digest(proof, owner_proof(n_device, nonce))


def otp_hash(otp: bytes, salt: bytes) -> bytes:
    """The rendezvous stores this, never the OTP (64+ random bits, per-device salt)."""
    return hashlib.sha256(b"zt-otp|" + salt + b"|" + otp).digest()


def check_otp(otp: bytes, salt: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(otp_hash(otp, salt), expected)


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
