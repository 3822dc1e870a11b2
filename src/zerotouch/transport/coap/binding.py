"""Channel identity = message identity, where the CoAP adapter hands a body to the core.

A request that arrived under an OSCORE context tied to one device — a PSK context (claim
`zt-psk:<devid>`) or an EDHOC context authenticated by the device's key (claim
`edhoc-device:<SHA-256 SPKI>`) — may only carry that device's messages. Otherwise a device
(or whoever stole its PSK) could use its own channel to relay, probe or replay messages that
name another device, and the server would answer them under the wrong device's context.

Rules, checked before the core sees the body (the core still verifies everything itself):

* PSK: the serial in the message (find-owner, hello, done) is the context's Device ID.
* EDHOC: the device's EDHOC key is its IDevID key, so the certificate in `x5chain`
  (find-owner, hello) must certify the key EDHOC authenticated.
* Messages that name the IDevID by `kid` instead of carrying it (prove, done): the kid must be
  the SHA-256 of a certificate this same channel identity showed in an accepted hello or
  find-owner (remembered here, bounded). Like the OSCORE contexts themselves this is kept in
  the process: a device whose context moves to another replica starts again from find-owner.

Requests without such a context (plain CoAP, CoAP over TLS) are not affected.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

from cryptography import x509

from ...pki.keys import spki_fingerprint
from ...protocol import cose
from ...protocol.codec import MAX_MESSAGE
from ...protocol.errors import ProtocolError
from ...protocol.messages import Done, FindOwner, Hello
from ...protocol.psk import is_mac0, parse_mac0

PSK_CLAIM = "zt-psk:"          # oscore_psk.server_context
EDHOC_CLAIM = "edhoc-device:"  # edhoc.CLAIM_PREFIX

_SERIAL_OF = {"find-owner": FindOwner, "hello": Hello, "done": Done}
_KIDS_PER_PEER = 4


class ChannelMismatch(ProtocolError):
    def __init__(self, message: str):
        super().__init__(message, status=403, code="channel_identity")


def channel_peer(request) -> tuple[str, str] | None:
    """("psk", devid hex) or ("edhoc", fingerprint hex) for a request that came through a
    device-bound OSCORE context; None otherwise."""
    for claim in getattr(request.remote, "authenticated_claims", None) or ():
        if isinstance(claim, str):
            if claim.startswith(PSK_CLAIM):
                return "psk", claim[len(PSK_CLAIM):]
            if claim.startswith(EDHOC_CLAIM):
                return "edhoc", claim[len(EDHOC_CLAIM):]
    return None


class ChannelBinding:
    """Shared by the endpoints of one site. `check` before the core, `accepted` after it."""

    def __init__(self, max_peers: int = 100_000):
        self.max_peers = max_peers
        self._kids: OrderedDict[tuple[str, str], list[bytes]] = OrderedDict()
        self.refused = 0

    def check(self, step: str, body: bytes, peer: tuple[str, str]) -> bytes | None:
        """Raise ChannelMismatch if `body` names another device than `peer`. Returns the kid of
        the certificate the body carries (to remember once the core accepted it), or None."""
        try:
            return self._check(step, body, peer)
        except ChannelMismatch:
            self.refused += 1
            raise

    def _check(self, step, body, peer):
        kind, ident = peer
        if is_mac0(body):
            return self._check_mac0(step, body, kind, ident)
        signed = cose.parse_sign1(body, max_size=MAX_MESSAGE)  # malformed: 4.00, as the core says
        cls = _SERIAL_OF.get(step)
        serial = cls.decode(signed.payload).serial if cls is not None else None
        if kind == "psk" and serial is not None and serial.lower() != ident:
            raise ChannelMismatch(f"this PSK context belongs to device {ident}, "
                                  f"the message names {serial}")
        chain = signed.x5chain
        if chain:
            if kind == "edhoc":
                try:
                    key = x509.load_der_x509_certificate(chain[0]).public_key()
                    fp = spki_fingerprint(key).hex()
                except Exception:
                    raise ChannelMismatch("the certificate in the message is unusable") from None
                if fp != ident:
                    raise ChannelMismatch("the message's certificate is not the key this EDHOC "
                                          "channel authenticated")
            return hashlib.sha256(chain[0]).digest()
        kid = signed.kid
        if kid is None or kid not in self._kids.get(peer, ()):
            raise ChannelMismatch("the message names a certificate this channel has not shown")
        return None

    @staticmethod
    def _check_mac0(step, body, kind, ident):
        """A PSK-profile message (COSE_Mac0): its kid is its serial. Under a device's PSK
        context it must be that device's; an EDHOC device (it has keys) never sends one.
        Which session a prove belongs to is checked by the core against the MAC's key."""
        mac = parse_mac0(body, max_size=MAX_MESSAGE)
        if kind != "psk":
            raise ChannelMismatch("a MAC'd (PSK profile) message on a channel of a device with keys")
        cls = _SERIAL_OF.get(step)
        serial = cls.decode(mac.payload).serial if cls is not None else None
        kid = (mac.kid or b"").decode(errors="replace").lower()
        if kid != ident or (serial is not None and serial.lower() != ident):
            raise ChannelMismatch(f"this PSK context belongs to device {ident}, "
                                  f"the message names another")
        return None

    def accepted(self, peer: tuple[str, str], kid: bytes | None) -> None:
        """The core accepted a message carrying the certificate with this kid on `peer`."""
        if kid is None:
            return
        kids = self._kids.pop(peer, [])
        if kid in kids:
            kids.remove(kid)
        self._kids[peer] = (kids + [kid])[-_KIDS_PER_PEER:]
        while len(self._kids) > self.max_peers:
            self._kids.popitem(last=False)
