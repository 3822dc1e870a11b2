"""The owner gateway's side of the PSK profile (protocol/psk.py): hello, prove and done from a
device without public-key crypto, answered with COSE_Mac0 under keys from the device's PSK.

The gateway finds a device's PSK through `psk_lookup(serial)` (the CLI gives it the gateway's
`psk.json`, which `box claim --gateway-dir` fills and the OSCORE-PSK server follows too). It
never holds N_device: the owner proof comes from the vault, and the channel secret is wrapped
by the vault under a per-session key from the PSK plus N_device. The session and inventory
rules are the certificate path's: nonce used once (hello), compare-and-set before anything is
issued (prove), the issued bundle's hash confirmed (done).
"""
from __future__ import annotations

import hmac
from typing import Callable

from ..protocol import psk
from ..protocol.codec import MAX_MESSAGE
from ..protocol.errors import (BadSignature, Conflict, LocalError, NotAuthorized, NotFound,
                               ProtocolError, StaleMessage, TryLater)
from ..protocol.messages import Challenge, Done, DoneAck, Hello
from ..protocol.states import SESSION_TRANSITIONS, InventoryState, SessionState
from ..protocol.verify import check_fresh
from ..storage.base import SessionRecord

PSK_LDEVID_SERIAL = "psk"   # what the inventory shows where a certificate device has its LDevID serial

PskLookup = Callable[[str], "bytes | None"]


class GatewayPsk:
    """Bound to a GatewayService (its store, vault, config and rendezvous notifier)."""

    def __init__(self, gateway):
        self.gw = gateway

    def _keys(self, serial: str) -> tuple[bytes, psk.GatewayLegKeys]:
        lookup = self.gw.psk_lookup
        key = lookup(serial) if lookup is not None else None
        if key is None:
            raise NotAuthorized("no PSK is known for this device (psk.json)", code="not_in_inventory")
        return key, psk.GatewayLegKeys.from_psk(key, serial)

    def _answer(self, msg, keys: psk.GatewayLegKeys) -> bytes:
        return psk.mac0(msg.encode(), keys.down)

    @staticmethod
    def _kid_names(mac: psk.Mac0, serial: str) -> None:
        if mac.kid != psk.device_kid(serial):
            raise NotAuthorized("message names another device than its kid")

    async def hello(self, body: bytes) -> bytes:
        gw, cfg = self.gw, self.gw.cfg
        now = cfg.clock()
        mac = psk.parse_mac0(body, max_size=MAX_MESSAGE)
        unverified = Hello.decode(mac.payload)     # to find the key; trusted after verify
        self._kid_names(mac, unverified.serial)
        not_ours = NotAuthorized("device is not in the owner's inventory", code="not_in_inventory")
        lookup = gw.psk_lookup
        if lookup is None or lookup(unverified.serial) is None:
            if cfg.admission == "any" and await gw._mapped_to_us(unverified.serial):
                raise TryLater("device is mapped to this owner at the rendezvous; it is onboarded "
                               "once its OTP and PSK reach the gateway", retry_after=60)
        _key, keys = self._keys(unverified.serial)
        msg = Hello.decode(mac.verify(keys.up))    # nothing below is told to a stranger
        check_fresh(msg.time, now)
        inv = await gw.store.inventory.get(msg.serial)
        if inv is None:
            raise not_ours
        if msg.ek_cert is not None or msg.ak_public is not None:
            raise NotAuthorized("a PSK device has no TPM evidence to show")
        if inv.state is InventoryState.REVOKED:
            raise NotAuthorized("device is revoked by its owner", code="revoked")
        session, challenge = cfg.rng(16), cfg.rng(16)
        try:
            proof = await gw.vault.owner_proof(msg.serial, msg.nonce)
        except NotFound:
            raise not_ours from None
        expires = now + cfg.session_ttl
        # The unique (serial, nonce) index refuses a replayed hello here.
        await gw.store.sessions.start(SessionRecord(
            id=session, serial=msg.serial, nonce=msg.nonce, challenge=challenge,
            idevid_fp=psk.psk_device_fp(msg.serial), state=SessionState.CHALLENGED,
            expires=expires))
        return self._answer(Challenge(session=session, nonce=msg.nonce, challenge=challenge,
                                      owner_proof=proof, expires=int(expires)), keys)

    async def _session_message(self, body: bytes, cls, target: SessionState):
        """(message, session, keys) of a MAC'd prove/done, verified with the session device's PSK."""
        mac = psk.parse_mac0(body, max_size=MAX_MESSAGE)
        unverified = cls.decode(mac.payload)
        sess = await self.gw._live_session(unverified.session)
        if not hmac.compare_digest(sess.idevid_fp, psk.psk_device_fp(sess.serial)):
            raise NotAuthorized("session belongs to a certificate device")
        self._kid_names(mac, sess.serial)
        _key, keys = self._keys(sess.serial)
        msg = cls.decode(mac.verify(keys.up))     # only that device's PSK makes this MAC
        if getattr(msg, "serial", sess.serial) != sess.serial:
            raise NotAuthorized("session belongs to another device")
        if target not in SESSION_TRANSITIONS[sess.state]:
            raise Conflict(f"session is {sess.state.value}; this message was already processed")
        inv = await self.gw.store.inventory.get(sess.serial)
        if inv is None or inv.state is InventoryState.REVOKED:
            raise NotAuthorized("device is revoked by its owner", code="revoked")
        return msg, sess, keys

    async def prove(self, body: bytes) -> bytes:
        gw, cfg = self.gw, self.gw.cfg
        msg, sess, keys = await self._session_message(body, psk.PskProve, SessionState.CREDENTIALED)
        try:
            if not hmac.compare_digest(msg.challenge, sess.challenge):
                raise BadSignature("challenge answer does not match")
            port = cfg.terminus_psk_port
            if port is None:
                raise LocalError("this gateway has no TLS-PSK terminus listener configured "
                                 "(terminus_psk_port)", status=503, code="no_psk_terminus")
            if not await gw.store.sessions.advance(sess.id, SessionState.CHALLENGED,
                                                   SessionState.CREDENTIALED):
                raise Conflict("session was already answered")
            key, _ = self._keys(sess.serial)
            wrapped = await gw.vault.seal_channel_secret_psk(
                sess.serial, wrap_key=psk.session_wrap_key(key, sess.serial, sess.id),
                session=sess.id, nonce=sess.nonce)
            bundle = psk.mac0(psk.PskBundle(
                serial=sess.serial, terminus_host=cfg.terminus_host, terminus_port=port,
                topic_prefix=f"{cfg.topic_root}/{sess.serial}", psk_identity=sess.serial,
                settings={k: v for k, v in cfg.settings.items() if k != "est_operational"},
                issued=int(cfg.clock())).encode(), keys.bundle)
            # The session keeps the bundle (where a certificate device's keeps its LDevID):
            # done must confirm this very bundle; the inventory marks the device as PSK.
            await gw.store.sessions.store_ldevid(sess.id, sess.serial, bundle, PSK_LDEVID_SERIAL)
        except ProtocolError as exc:
            await gw.store.inventory.update(sess.serial, last_error=f"prove: {exc.message}"[:512])
            raise
        return self._answer(psk.PskCredentials(session=sess.id, nonce=sess.nonce,
                                               wrapped_secret=wrapped, bundle=bundle), keys)

    async def done(self, body: bytes) -> bytes:
        gw = self.gw
        msg, sess, keys = await self._session_message(body, Done, SessionState.DONE)
        await gw.finish(sess, msg.ldevid_fp, issued="bundle")
        return self._answer(DoneAck(session=sess.id, serial=sess.serial), keys)


__all__ = ["GatewayPsk", "PSK_LDEVID_SERIAL", "StaleMessage"]
