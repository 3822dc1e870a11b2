"""Owner gateway: verifies devices, proves the owner, issues credentials and configuration.

All state of an onboarding in flight is in the store, so any gateway process can take any
message. Secrets and keys are asked of the vault, never held here.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..attestation.ek import EkVerifier
from ..pki.ca import device_identity, load_der_cert, public_key_of
from ..pki.keys import cert_fingerprint
from ..protocol import cose
from ..protocol.codec import MAX_MESSAGE
from ..protocol.errors import (BadSignature, Conflict, MalformedMessage, NotAuthorized, NotFound,
                               ProtocolError, StaleMessage, TryLater)
from ..protocol.messages import (Bundle, Challenge, Credentials, Done, DoneAck, Hello, Prove,
                                 RvRegistered)
from ..protocol.states import SESSION_TRANSITIONS, InventoryState, SessionState
from ..protocol.verify import check_fresh, verify_device_signed
from ..storage.base import SessionRecord, Store
from ..protocol.sealing import check_seal_key
from .attestation import AttestationFailed, TpmAttestation, summary as attestation_summary
from ..protocol.psk import is_mac0
from .gateway_inventory import InventoryIntake, StatusQuery
from .gateway_psk import GatewayPsk
from .vault import Vault, check_csr

log = logging.getLogger(__name__)
ADMISSION_POLICIES = ("introduced", "any")


@dataclass
class GatewayConfig:
    manufacturer_cas: list[x509.Certificate]
    terminus_host: str
    terminus_port: int
    topic_root: str = "devices"
    session_ttl: int = 120
    ldevid_days: float = 30.0
    settings: dict = field(default_factory=lambda: {"telemetry_interval_s": 60})
    clock: Callable[[], float] = time.time
    rng: Callable[[int], bytes] = os.urandom
    # config.json "admission": "introduced" (only devices in the inventory: from a label, a
    # CSV or an introducer's notice) or "any" (see GatewayService.hello).
    admission: str = "introduced"
    # The terminus' TLS-PSK listener, named in the bundle of PSK-profile devices (gateway_psk.py).
    terminus_psk_port: int | None = None


Notifier = Callable[[bytes], Awaitable[None]]


class GatewayService(InventoryIntake):
    def __init__(self, store: Store, vault: Vault, config: GatewayConfig,
                 notify_rendezvous: Notifier | None = None,
                 query_rendezvous: StatusQuery | None = None,
                 tpm: TpmAttestation | None = None,
                 psk_lookup: Callable[[str], bytes | None] | None = None):
        if config.admission not in ADMISSION_POLICIES:
            raise ValueError(f"admission must be one of {ADMISSION_POLICIES}, not {config.admission!r}")
        self.store = store
        self.vault = vault
        self.cfg = config
        self.notify_rendezvous = notify_rendezvous
        self.query_rendezvous = query_rendezvous
        # TPM evidence is checked against the owner's TPM maker roots and PCR policies; with
        # none configured, TPM devices are refused (and say why) and software ones onboard.
        self.tpm = tpm or TpmAttestation(EkVerifier([]))
        # PSK-profile devices (COSE_Mac0 messages): their PSKs by serial (psk.json), or None.
        self.psk_lookup = psk_lookup
        self.psk = GatewayPsk(self)

    # --- onboarding ---------------------------------------------------------------------
    async def hello(self, body: bytes) -> bytes:
        if is_mac0(body):   # a device without public-key crypto (the PSK profile)
            return await self.psk.hello(body)
        now = self.cfg.clock()
        msg, cert = verify_device_signed(body, Hello, self.cfg.manufacturer_cas, now)
        check_fresh(msg.time, now)
        not_ours = NotAuthorized("device is not in the owner's inventory", code="not_in_inventory")
        inv = await self.store.inventory.get(msg.serial)
        if inv is None:
            if self.cfg.admission == "any" and await self._mapped_to_us(msg.serial):
                # "any device the rendezvous sends": the device is ours by the rendezvous'
                # mapping, but the owner proof needs N_device (the OTP), which only the label
                # or the introducer's notice brings. The device waits instead of being refused.
                raise TryLater("device is mapped to this owner at the rendezvous; it is onboarded "
                               "once its OTP reaches the gateway (notice or label)",
                               retry_after=60)
            raise not_ours
        if inv.state is InventoryState.REVOKED:
            raise NotAuthorized("device is revoked by its owner", code="revoked")
        if inv.idevid_fp and not hmac.compare_digest(inv.idevid_fp, cert_fingerprint(cert)):
            # the introducer reported another IDevID for this device id (message 6)
            raise NotAuthorized("device certificate differs from the one the introducer reported",
                                code="not_in_inventory")
        session, challenge = self.cfg.rng(16), self.cfg.rng(16)
        try:
            proof = await self.vault.owner_proof(msg.serial, msg.nonce)
        except NotFound:
            raise not_ours from None
        try:
            tpm = self.tpm.begin(msg, cert)
        except AttestationFailed as exc:
            await self._attestation_failed(msg.serial, exc)
            raise
        expires = now + self.cfg.session_ttl
        await self.store.sessions.start(SessionRecord(
            id=session, serial=msg.serial, nonce=msg.nonce, challenge=challenge,
            idevid_fp=cert_fingerprint(cert), state=SessionState.CHALLENGED, expires=expires,
            idevid_der=cert.public_bytes(Encoding.DER), attestation=tpm.state if tpm else None))
        extra = {}
        if tpm:
            extra = dict(cred_blob=tpm.cred_blob, cred_secret=tpm.cred_secret, pcr_mask=tpm.pcr_mask)
        return await self.vault.sign(Challenge(session=session, nonce=msg.nonce, challenge=challenge,
                                               owner_proof=proof, expires=int(expires),
                                               **extra).encode())

    async def _attestation_failed(self, serial: str, exc: AttestationFailed) -> None:
        """The reason goes on the device's record (`gateway inventory` shows it)."""
        reason = f"attestation failed: {exc.message}"[:512]
        await self.store.inventory.update(serial, last_error=reason, attestation=reason)

    async def _session_message(self, body: bytes, cls, target: SessionState):
        """A prove/done: (message, IDevID, session). The device may carry its IDevID (x5chain)
        or name it by kid (its SHA-256, as kept on the session since hello)."""
        signed = cose.parse_sign1(body, max_size=MAX_MESSAGE)
        if signed.x5chain:
            msg, cert = verify_device_signed(body, cls, self.cfg.manufacturer_cas, self.cfg.clock())
            return msg, cert, await self._session(msg.session, cert, target)
        unverified = cls.decode(signed.payload)  # only to find the session: trusted after verify
        sess = await self._live_session(unverified.session)
        if signed.kid is None or not sess.idevid_der or not hmac.compare_digest(signed.kid, sess.idevid_fp):
            raise NotAuthorized("session belongs to another device")
        cert = load_der_cert(sess.idevid_der)
        msg = cls.decode(signed.verify(public_key_of(cert)))
        return msg, cert, await self._session(msg.session, cert, target)

    async def _live_session(self, session_id: bytes):
        sess = await self.store.sessions.get(session_id)
        if sess is None or sess.expires < self.cfg.clock():
            raise StaleMessage("unknown or expired onboarding session; start again with hello")
        return sess

    async def _session(self, session_id: bytes, cert: x509.Certificate, target: SessionState):
        """The session this message continues, if the transition table lets it go to `target`
        and the owner has not revoked the device meanwhile."""
        sess = await self._live_session(session_id)
        if not hmac.compare_digest(sess.idevid_fp, cert_fingerprint(cert)):
            raise NotAuthorized("session belongs to another device")
        if target not in SESSION_TRANSITIONS[sess.state]:
            raise Conflict(f"session is {sess.state.value}; this message was already processed")
        inv = await self.store.inventory.get(sess.serial)
        if inv is None or inv.state is InventoryState.REVOKED:
            raise NotAuthorized("device is revoked by its owner", code="revoked")
        return sess

    async def prove(self, body: bytes) -> bytes:
        if is_mac0(body):
            return await self.psk.prove(body)
        msg, cert, sess = await self._session_message(body, Prove, SessionState.CREDENTIALED)
        try:
            if not hmac.compare_digest(msg.challenge, sess.challenge):
                raise BadSignature("challenge answer does not match")
            _serial, urn = device_identity(cert)
            # Check everything the device sent before the session moves or anything is issued.
            check_csr(msg.csr)
            ek_cert = None
            if sess.attestation:
                try:
                    ek_cert = self.tpm.check(sess.attestation, msg, sess.challenge, cert)
                except AttestationFailed as exc:
                    await self._attestation_failed(sess.serial, exc)
                    raise
            elif msg.seal_key is None or msg.activation is not None or msg.quote is not None:
                raise MalformedMessage("prove needs a seal key (and TPM evidence only after a TPM hello)")
            else:
                check_seal_key(msg.seal_key)
            # Compare-and-set first: a replayed or concurrent prove gets nothing issued.
            if not await self.store.sessions.advance(sess.id, SessionState.CHALLENGED,
                                                     SessionState.CREDENTIALED):
                raise Conflict("session was already answered")
            ldevid = await self.vault.issue_ldevid(msg.csr, sess.serial, urn, self.cfg.ldevid_days)
            if ek_cert is not None:
                sealed = await self.vault.seal_channel_secret_tpm(sess.serial, ek_cert=ek_cert,
                                                                  session=sess.id, nonce=sess.nonce)
                await self.store.inventory.update(sess.serial,
                                                  attestation=attestation_summary(sess.attestation))
            else:
                sealed = await self.vault.seal_channel_secret(sess.serial, seal_key=msg.seal_key,
                                                              session=sess.id, nonce=sess.nonce)
            owner_ca = await self.vault.owner_ca_der()
            bundle = await self.vault.sign(Bundle(
                serial=sess.serial, terminus_host=self.cfg.terminus_host,
                terminus_port=self.cfg.terminus_port, owner_ca=owner_ca,
                topic_prefix=f"{self.cfg.topic_root}/{sess.serial}", settings=dict(self.cfg.settings),
                issued=int(self.cfg.clock())).encode(), with_chain=False)  # owner_ca is inside
            ldevid_serial = format(x509.load_der_x509_certificate(ldevid).serial_number, "x")
            await self.store.sessions.store_ldevid(sess.id, sess.serial, ldevid, ldevid_serial)
        except AttestationFailed:
            raise   # recorded above
        except ProtocolError as exc:
            await self.store.inventory.update(sess.serial, last_error=f"prove: {exc.message}"[:512])
            raise
        # The device has the owner CA since the challenge: no x5chain from here on.
        return await self.vault.sign(Credentials(session=sess.id, nonce=sess.nonce, ldevid=ldevid,
                                                 sealed_secret=sealed, bundle=bundle).encode(),
                                     with_chain=False)

    async def done(self, body: bytes) -> bytes:
        if is_mac0(body):
            return await self.psk.done(body)
        msg, cert, sess = await self._session_message(body, Done, SessionState.DONE)
        await self.finish(sess, msg.ldevid_fp, issued="certificate")
        return await self.vault.sign(DoneAck(session=sess.id, serial=sess.serial).encode(),
                                     with_chain=False)

    async def finish(self, sess, reported_fp: bytes, *, issued: str) -> None:
        """Done, for any kind of device: what it reports having stored must be what this
        session issued (its LDevID, or a PSK device's bundle); then the device is onboarded and
        the rendezvous told, in the background of the device's answer."""
        if not sess.ldevid_der or not hmac.compare_digest(
                reported_fp, hashlib.sha256(sess.ldevid_der).digest()):
            raise NotAuthorized(f"device reports another {issued} than the one issued")
        now = self.cfg.clock()
        if not await self.store.sessions.finish(sess.id, sess.serial, now):
            raise Conflict("session was already completed")
        if self.notify_rendezvous is not None:
            report = await self.vault.sign(RvRegistered(serial=sess.serial, time=int(now)).encode())
            try:
                await self.notify_rendezvous(report)
            except Exception as exc:  # onboarded either way; the device must still get its ack
                log.warning("could not report %s to the rendezvous: %s", sess.serial, exc)
