"""Server-side checks shared by the rendezvous and the gateway (pure functions)."""
from __future__ import annotations

import datetime as dt
from typing import TypeVar

from cryptography import x509

from ..pki.ca import device_identity, load_der_cert, public_key_of, verify_device_chain
from . import cose
from .codec import MAX_MESSAGE, Message
from .errors import BadSignature, NotAuthorized, StaleMessage

M = TypeVar("M", bound=Message)

FRESHNESS = 300  # seconds a device-stamped time may differ from ours


def verify_device_signed(data: bytes, cls: type[M], anchors: list[x509.Certificate],
                         now: float) -> tuple[M, x509.Certificate]:
    """A message signed by a device's IDevID key, with the IDevID in x5chain.

    Checks: the certificate chains to a trusted manufacturer CA, the signature verifies
    with the certificate's key, and the serial in the message is the certificate's.
    """
    signed = cose.parse_sign1(data, max_size=MAX_MESSAGE)
    chain = signed.x5chain
    if not chain:
        raise BadSignature("device message carries no certificate (x5chain)")
    cert = load_der_cert(chain[0])
    verify_device_chain(cert, anchors, dt.datetime.fromtimestamp(now, dt.timezone.utc))
    msg = cls.decode(signed.verify(public_key_of(cert)))
    serial, _urn = device_identity(cert)
    if getattr(msg, "serial", serial) != serial:
        raise NotAuthorized("message names another device than its certificate")
    return msg, cert


def verify_signed_by(data: bytes, cls: type[M], public_key) -> M:
    signed = cose.parse_sign1(data, max_size=MAX_MESSAGE)
    return cls.decode(signed.verify(public_key))


def check_fresh(stamp: int, now: float, window: float = FRESHNESS) -> None:
    if abs(stamp - now) > window:
        raise StaleMessage(f"message time is {int(stamp - now)} s off; allowed ±{int(window)} s")
