"""Owner gateway: verifies devices, proves the owner, issues credentials and configuration.

All state of an onboarding in flight is in the store, so any gateway process can take any
message. Secrets and keys are asked of the vault, never held here.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import io
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from cryptography import x509

from ..pki.ca import device_identity
from ..pki.keys import cert_fingerprint
from ..protocol.errors import (BadSignature, Conflict, MalformedMessage, NotAuthorized, NotFound,
                               ProtocolError, StaleMessage)
from ..protocol.messages import (Bundle, Challenge, Credentials, Done, DoneAck, Hello, Prove,
                                 RvRegistered)
from ..protocol.states import SESSION_TRANSITIONS, InventoryState, SessionState
from ..protocol.tte import parse_label
from ..protocol.verify import check_fresh, verify_device_signed
from ..storage.base import InventoryRecord, SessionRecord, Store
from ..protocol.sealing import check_seal_key
from .vault import Vault, check_csr

log = logging.getLogger(__name__)
MAX_CSV_ROWS = 100_000


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


Notifier = Callable[[bytes], Awaitable[None]]


class GatewayService:
    def __init__(self, store: Store, vault: Vault, config: GatewayConfig,
                 notify_rendezvous: Notifier | None = None):
        self.store = store
        self.vault = vault
        self.cfg = config
        self.notify_rendezvous = notify_rendezvous

    # --- inventory ----------------------------------------------------------------------
    async def register_label(self, label_url: str, description: str = "") -> InventoryRecord:
        label = parse_label(label_url)
        return await self._register(label.devid, label.otp_bytes, description)

    async def _register(self, serial: str, n_device: bytes, description: str) -> InventoryRecord:
        if len(description) > 256:
            raise MalformedMessage("description is longer than 256 characters")
        rec = InventoryRecord(serial=serial, description=description, created_at=self.cfg.clock())
        # The row first: whoever loses a race gets Conflict before touching the vault, so a
        # second registration can never overwrite the N_device of the first.
        if not await self.store.inventory.add(rec):
            raise Conflict(f"device {serial} is already in the inventory")
        try:
            await self.vault.put_device_secret(serial, n_device)
        except BaseException:
            await self.store.inventory.remove(serial)
            raise
        return rec

    async def register_csv(self, text: str) -> list[InventoryRecord]:
        """CSV with a header: `label_url[,description]`. All rows are checked before any is stored."""
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "label_url" not in reader.fieldnames:
            raise MalformedMessage("CSV needs a header row with a label_url column")
        rows, seen = [], set()
        try:
            for count, row in enumerate(reader, start=1):
                lineno = reader.line_num  # the physical line, whatever blank or multi-line rows came before
                if count > MAX_CSV_ROWS:
                    raise MalformedMessage(f"CSV has more than {MAX_CSV_ROWS} rows")
                try:
                    label = parse_label(row.get("label_url") or "")
                except MalformedMessage as exc:
                    raise MalformedMessage(f"CSV line {lineno}: {exc.message}") from None
                desc = (row.get("description") or "").strip()
                if len(desc) > 256:
                    raise MalformedMessage(f"CSV line {lineno}: description is longer than 256 characters")
                if label.devid in seen or await self.store.inventory.get(label.devid):
                    raise Conflict(f"CSV line {lineno}: device {label.devid} is already in the inventory")
                seen.add(label.devid)
                rows.append((label, desc))
        except csv.Error as exc:
            raise MalformedMessage(f"CSV line {reader.line_num}: {exc}") from None
        # Every row is valid; if storing still fails (a race, the vault away), undo the rows
        # already stored so an upload is all or nothing.
        done: list[InventoryRecord] = []
        try:
            for lb, desc in rows:
                done.append(await self._register(lb.devid, lb.otp_bytes, desc))
        except BaseException:
            for rec in done:
                await self.store.inventory.remove(rec.serial)
            raise
        return done

    # --- onboarding ---------------------------------------------------------------------
    async def hello(self, body: bytes) -> bytes:
        now = self.cfg.clock()
        msg, cert = verify_device_signed(body, Hello, self.cfg.manufacturer_cas, now)
        check_fresh(msg.time, now)
        not_ours = NotAuthorized("device is not in the owner's inventory", code="not_in_inventory")
        inv = await self.store.inventory.get(msg.serial)
        if inv is None:
            raise not_ours
        if inv.state is InventoryState.REVOKED:
            raise NotAuthorized("device is revoked by its owner", code="revoked")
        session, challenge = self.cfg.rng(16), self.cfg.rng(16)
        try:
            proof = await self.vault.owner_proof(msg.serial, msg.nonce)
        except NotFound:
            raise not_ours from None
        expires = now + self.cfg.session_ttl
        await self.store.sessions.start(SessionRecord(
            id=session, serial=msg.serial, nonce=msg.nonce, challenge=challenge,
            idevid_fp=cert_fingerprint(cert), state=SessionState.CHALLENGED, expires=expires))
        return await self.vault.sign(Challenge(session=session, nonce=msg.nonce, challenge=challenge,
                                               owner_proof=proof, expires=int(expires)).encode())

    async def _session(self, session_id: bytes, cert: x509.Certificate, target: SessionState):
        """The session this message continues, if the transition table lets it go to `target`
        and the owner has not revoked the device meanwhile."""
        now = self.cfg.clock()
        sess = await self.store.sessions.get(session_id)
        if sess is None or sess.expires < now:
            raise StaleMessage("unknown or expired onboarding session; start again with hello")
        if not hmac.compare_digest(sess.idevid_fp, cert_fingerprint(cert)):
            raise NotAuthorized("session belongs to another device")
        if target not in SESSION_TRANSITIONS[sess.state]:
            raise Conflict(f"session is {sess.state.value}; this message was already processed")
        inv = await self.store.inventory.get(sess.serial)
        if inv is None or inv.state is InventoryState.REVOKED:
            raise NotAuthorized("device is revoked by its owner", code="revoked")
        return sess

    async def prove(self, body: bytes) -> bytes:
        msg, cert = verify_device_signed(body, Prove, self.cfg.manufacturer_cas, self.cfg.clock())
        sess = await self._session(msg.session, cert, SessionState.CREDENTIALED)
        try:
            if not hmac.compare_digest(msg.challenge, sess.challenge):
                raise BadSignature("challenge answer does not match")
            _serial, urn = device_identity(cert)
            # Check everything the device sent before the session moves or anything is issued.
            check_csr(msg.csr)
            check_seal_key(msg.seal_key)
            # Compare-and-set first: a replayed or concurrent prove gets nothing issued.
            if not await self.store.sessions.advance(sess.id, SessionState.CHALLENGED,
                                                     SessionState.CREDENTIALED):
                raise Conflict("session was already answered")
            ldevid = await self.vault.issue_ldevid(msg.csr, sess.serial, urn, self.cfg.ldevid_days)
            sealed = await self.vault.seal_channel_secret(sess.serial, seal_key=msg.seal_key,
                                                          session=sess.id, nonce=sess.nonce)
            owner_ca = await self.vault.owner_ca_der()
            bundle = await self.vault.sign(Bundle(
                serial=sess.serial, terminus_host=self.cfg.terminus_host,
                terminus_port=self.cfg.terminus_port, owner_ca=owner_ca,
                topic_prefix=f"{self.cfg.topic_root}/{sess.serial}", settings=dict(self.cfg.settings),
                issued=int(self.cfg.clock())).encode())
            ldevid_serial = format(x509.load_der_x509_certificate(ldevid).serial_number, "x")
            await self.store.sessions.store_ldevid(sess.id, sess.serial, ldevid, ldevid_serial)
        except ProtocolError as exc:
            await self.store.inventory.update(sess.serial, last_error=f"prove: {exc.message}"[:512])
            raise
        return await self.vault.sign(Credentials(session=sess.id, nonce=sess.nonce, ldevid=ldevid,
                                                 sealed_secret=sealed, bundle=bundle).encode())

    async def done(self, body: bytes) -> bytes:
        msg, cert = verify_device_signed(body, Done, self.cfg.manufacturer_cas, self.cfg.clock())
        sess = await self._session(msg.session, cert, SessionState.DONE)
        if not sess.ldevid_der or not hmac.compare_digest(
                msg.ldevid_fp, hashlib.sha256(sess.ldevid_der).digest()):
            raise NotAuthorized("device reports another certificate than the one issued")
        now = self.cfg.clock()
        if not await self.store.sessions.finish(sess.id, sess.serial, now):
            raise Conflict("session was already completed")
        if self.notify_rendezvous is not None:
            report = await self.vault.sign(RvRegistered(serial=sess.serial, time=int(now)).encode())
            try:
                await self.notify_rendezvous(report)
            except Exception as exc:  # onboarded either way; the device must still get its ack
                log.warning("could not report %s to the rendezvous: %s", sess.serial, exc)
        return await self.vault.sign(DoneAck(session=sess.id, serial=sess.serial).encode())
