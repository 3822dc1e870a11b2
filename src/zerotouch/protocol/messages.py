"""Message types of every phase. Integer CBOR keys keep them small for CoAP devices.

Each signed message travels as a COSE_Sign1 whose payload is the message's CBOR map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .codec import Message, f

NONCE_LEN = 16
HASH_LEN = 32
SESSION_LEN = 16


# --- manufacture → rendezvous -------------------------------------------------------------
@dataclass(frozen=True)
class RvRegister(Message):
    """A device made at the factory; signed by the manufacturer CA key. No OTP, only its hash."""
    TYPE = 10
    serial: str = f(1, min_len=1, max_len=64)
    urn: str = f(2, min_len=1, max_len=128)
    idevid: bytes = f(3, min_len=1, max_len=4096)
    otp_salt: bytes = f(4, min_len=16, max_len=16)
    otp_hash: bytes = f(5, min_len=HASH_LEN, max_len=HASH_LEN)


# --- phase 3: find the owner ----------------------------------------------------------------
@dataclass(frozen=True)
class FindOwner(Message):
    """Device → rendezvous, signed by the IDevID key (x5chain carries the IDevID)."""
    TYPE = 1
    serial: str = f(1, min_len=1, max_len=64)
    nonce: bytes = f(2, min_len=NONCE_LEN, max_len=NONCE_LEN)
    time: int = f(3)


@dataclass(frozen=True)
class Redirect(Message):
    """Rendezvous → device, signed by the rendezvous key the device has pinned."""
    TYPE = 2
    serial: str = f(1, min_len=1, max_len=64)
    nonce: bytes = f(2, min_len=NONCE_LEN, max_len=NONCE_LEN)
    gateway_url: str = f(3, min_len=1, max_len=256)
    owner_fp: bytes = f(4, min_len=HASH_LEN, max_len=HASH_LEN)
    issued: int = f(5)
    expires: int = f(6)
    # SHA-256 SPKI of the gateway's EDHOC key, as the claim gave it (TTE's cfingerprint for
    # the controller's DTLS key): a device using EDHOC pins the gateway by it.
    gateway_edhoc_fp: Optional[bytes] = f(7, min_len=HASH_LEN, max_len=HASH_LEN, optional=True)


# --- phase 4: onboard -----------------------------------------------------------------------
@dataclass(frozen=True)
class Hello(Message):
    """Device → gateway, signed by the IDevID key (x5chain carries the IDevID).

    A TPM device adds its EK certificate and the public area of its attestation key (AK):
    the gateway checks the EK chain and answers with a credential only that TPM can activate.
    """
    TYPE = 3
    serial: str = f(1, min_len=1, max_len=64)
    nonce: bytes = f(2, min_len=NONCE_LEN, max_len=NONCE_LEN)
    time: int = f(3)
    ek_cert: Optional[bytes] = f(4, min_len=1, max_len=2048, optional=True)
    ak_public: Optional[bytes] = f(5, min_len=1, max_len=512, optional=True)  # TPMT_PUBLIC


@dataclass(frozen=True)
class Challenge(Message):
    """Gateway → device, signed by the owner key (x5chain carries the owner CA certificate).

    `owner_proof` = H("zt-owner-proof" | N_device | nonce): only an owner that knows
    N_device can make it, and it is bound to this device's fresh nonce.
    """
    TYPE = 4
    session: bytes = f(1, min_len=SESSION_LEN, max_len=SESSION_LEN)
    nonce: bytes = f(2, min_len=NONCE_LEN, max_len=NONCE_LEN)
    challenge: bytes = f(3, min_len=NONCE_LEN, max_len=NONCE_LEN)
    owner_proof: bytes = f(4, min_len=HASH_LEN, max_len=HASH_LEN)
    expires: int = f(5)
    # TPM devices: TPM2_MakeCredential for (EK, AK name), and the PCRs to quote over `challenge`
    cred_blob: Optional[bytes] = f(6, min_len=1, max_len=256, optional=True)    # TPM2B_ID_OBJECT
    cred_secret: Optional[bytes] = f(7, min_len=1, max_len=512, optional=True)  # TPM2B_ENCRYPTED_SECRET
    pcr_mask: Optional[int] = f(8, optional=True)   # bit i = PCR i of the sha256 bank


@dataclass(frozen=True)
class Prove(Message):
    """Device → gateway, signed by the IDevID key: answers the challenge, asks for credentials."""
    TYPE = 5
    session: bytes = f(1, min_len=SESSION_LEN, max_len=SESSION_LEN)
    challenge: bytes = f(2, min_len=NONCE_LEN, max_len=NONCE_LEN)
    csr: bytes = f(3, min_len=1, max_len=4096)
    # HPKE recipient public key (X25519 raw); absent for a TPM device, whose secret is
    # sealed to its EK instead (TPM2_Import)
    seal_key: Optional[bytes] = f(4, min_len=32, max_len=133, optional=True)
    activation: Optional[bytes] = f(5, min_len=1, max_len=64, optional=True)  # activated credential
    quote: Optional[bytes] = f(6, min_len=1, max_len=1024, optional=True)     # TPMS_ATTEST
    quote_sig: Optional[bytes] = f(7, min_len=1, max_len=512, optional=True)  # TPMT_SIGNATURE
    pcr_values: Optional[bytes] = f(8, min_len=32, max_len=24 * 32, optional=True)  # sha256, in index order


# --- phase 5: credentials -------------------------------------------------------------------
@dataclass(frozen=True)
class Bundle(Message):
    """Configuration the owner signs: where to connect and how."""
    TYPE = 7
    serial: str = f(1, min_len=1, max_len=64)
    terminus_host: str = f(2, min_len=1, max_len=253)
    terminus_port: int = f(3)
    owner_ca: bytes = f(4, min_len=1, max_len=4096)
    topic_prefix: str = f(5, min_len=1, max_len=128)
    settings: dict = f(6, max_len=64)
    issued: int = f(7)


@dataclass(frozen=True)
class Credentials(Message):
    """Gateway → device, signed by the owner key."""
    TYPE = 6
    session: bytes = f(1, min_len=SESSION_LEN, max_len=SESSION_LEN)
    nonce: bytes = f(2, min_len=NONCE_LEN, max_len=NONCE_LEN)
    ldevid: bytes = f(3, min_len=1, max_len=4096)
    sealed_secret: bytes = f(4, min_len=1, max_len=1024)  # HPKE, or a TPM2_Import blob
    bundle: bytes = f(5, min_len=1, max_len=8192)  # COSE_Sign1 over a Bundle


@dataclass(frozen=True)
class SealedSecret(Message):
    """Plaintext inside the HPKE-sealed channel secret: binds it to this onboarding."""
    TYPE = 12
    serial: str = f(1, min_len=1, max_len=64)
    secret: bytes = f(2, min_len=32, max_len=32)
    hmn: bytes = f(3, min_len=HASH_LEN, max_len=HASH_LEN)  # H(M | N_device)


@dataclass(frozen=True)
class Done(Message):
    """Device → gateway, signed by the IDevID key once everything is stored."""
    TYPE = 8
    session: bytes = f(1, min_len=SESSION_LEN, max_len=SESSION_LEN)
    serial: str = f(2, min_len=1, max_len=64)
    ldevid_fp: bytes = f(3, min_len=HASH_LEN, max_len=HASH_LEN)


@dataclass(frozen=True)
class DoneAck(Message):
    TYPE = 9
    session: bytes = f(1, min_len=SESSION_LEN, max_len=SESSION_LEN)
    serial: str = f(2, min_len=1, max_len=64)


# --- owner gateway → rendezvous ------------------------------------------------------------
@dataclass(frozen=True)
class RvRegistered(Message):
    """Owner tells the rendezvous a device reached it; signed by the owner key."""
    TYPE = 11
    serial: str = f(1, min_len=1, max_len=64)
    time: int = f(2)


@dataclass(frozen=True)
class ErrorReply(Message):
    TYPE = 99
    code: str = f(1, max_len=64)
    message: str = f(2, max_len=512)
    retry_after: Optional[int] = f(3, optional=True)
