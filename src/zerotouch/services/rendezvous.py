"""Rendezvous: registers devices from the factory, takes one claim per device, and answers a
device's first call with a signed, nonce-fresh redirect to its owner. It never holds owner
secrets or OTPs (only salted hashes)."""
from __future__ import annotations

import ipaddress
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..pki.ca import device_identity, load_der_cert, public_key_of, verify_device_chain
from ..pki.keys import cert_fingerprint, spki_fingerprint
from ..protocol import cose, psk
from ..protocol.codec import MAX_MESSAGE
from ..protocol.errors import (Conflict, MalformedMessage, NotAuthorized, NotFound, ProtocolError,
                               TryLater)
from ..protocol.messages import FindOwner, Redirect, RvRegister, RvRegistered
from ..protocol.proofs import check_otp
from ..protocol.states import RENDEZVOUS_TRANSITIONS, RendezvousStatus, check_transition
from ..protocol.verify import check_fresh, verify_device_signed
from ..storage.base import RendezvousRepo, RvDeviceRecord

HEX_RE = re.compile(r"[0-9a-fA-F]+")
MAX_FAILED_CLAIMS = 10  # wrong OTPs per device per window before claims are refused
STATUS_QUERY_TYPE = "zt-rv-status-query/1"  # payload marker: this signature is only a status query
MAX_STATUS_QUERY = 1000                     # serials per owner status query


@dataclass
class RendezvousConfig:
    manufacturer_cas: list[x509.Certificate]
    redirect_ttl: int = 300
    retry_after: int = 5
    clock: Callable[[], float] = time.time
    # Failed OTP guesses (wrong OTP or unknown devid) per source address (an IPv6 address by
    # its /64): `source_failures` per fixed window of `source_window` seconds. Counted in the
    # database, so every replica on it shares the budget; only counts are stored.
    source_failures: int = 10
    source_window: float = 600.0
    # Wrong OTPs per device: `device_failures` per window of `device_window` seconds lock the
    # device's claims and status until the window ends (429 + Retry-After).
    device_failures: int = MAX_FAILED_CLAIMS
    device_window: float = 3600.0
    prune_every: int = 256    # failures noted by this process between sweeps of ended windows


def source_key(source: str) -> str:
    """The key a source address is limited by: an IPv4 address as is, an IPv6 address by its
    /64 (one subscriber's prefix: rotating addresses inside it gains nothing)."""
    try:
        ip = ipaddress.ip_address(source.strip().split("%")[0])
    except ValueError:
        return source.strip()[:64]
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _retry_after(window_start: float, window: float, now: float) -> int:
    return max(1, math.ceil(window_start + window - now))


class SourceLimiter:
    """Failed guesses per source address, counted in the database in fixed windows: an
    installer who types the right OTPs is never slowed (one indexed read), a guesser gets
    429 + Retry-After after `source_failures` misses until the window ends, on every replica."""

    def __init__(self, repo: RendezvousRepo, config: "RendezvousConfig"):
        self.repo = repo
        self.cfg = config
        self._noted = 0

    async def check(self, source: str | None) -> None:
        if source is None:
            return
        got = await self.repo.source_failures(source_key(source))
        if got is None:
            return
        failures, start = got
        now = self.cfg.clock()
        if failures >= self.cfg.source_failures and start > now - self.cfg.source_window:
            raise ProtocolError("too many wrong OTPs from this address; try again later",
                                status=429, code="rate_limited",
                                retry_after=_retry_after(start, self.cfg.source_window, now))

    async def failed(self, source: str | None) -> None:
        if source is None:
            return
        now = self.cfg.clock()
        await self.repo.note_source_failure(source_key(source), now, self.cfg.source_window)
        self._noted += 1
        if self._noted % self.cfg.prune_every == 0:  # bounded table: forget ended windows
            await self.repo.prune_source_failures(now - self.cfg.source_window)


@dataclass
class ClaimResult:
    urn: str
    fingerprint: str
    status: str
    serial: str
    extra: dict = field(default_factory=dict)


def parse_owner_address(cip: str, cport: str | int, cfingerprint: str) -> tuple[str, bytes]:
    """Validate the TTE claim fields; return (gateway URL, owner key fingerprint)."""
    if not isinstance(cip, str) or not isinstance(cfingerprint, str):
        raise MalformedMessage("cip and cfingerprint must be strings")
    cip = cip.strip()
    if not cip or len(cip) > 253:
        raise MalformedMessage("cip (controller address) is required")
    try:
        ip = ipaddress.ip_address(cip)
        host = f"[{ip}]" if ip.version == 6 else str(ip)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", cip):
            raise MalformedMessage("cip must be an IP address or a host name") from None
        host = cip.lower()
    # A bool or a float must not pass as a port: the claim is one-time, a wrong owner is final.
    if isinstance(cport, str) and cport.strip().isdigit():
        port = int(cport.strip())
    elif isinstance(cport, int) and not isinstance(cport, bool):
        port = cport
    else:
        raise MalformedMessage("cport must be a port number")
    if not 0 < port < 65536:
        raise MalformedMessage("cport must be between 1 and 65535")
    fp = (cfingerprint or "").strip().replace(":", "").lower()
    if len(fp) != 64 or not HEX_RE.fullmatch(fp):
        raise MalformedMessage("cfingerprint must be the 64-hex-digit SHA-256 of the owner key")
    return f"https://{host}:{port}", bytes.fromhex(fp)


def parse_edhoc_fingerprint(cedhoc) -> bytes | None:
    """The optional claim field `cedhoc`: SHA-256 (64 hex digits) of the gateway's EDHOC key."""
    if cedhoc is None or cedhoc == "":
        return None
    if not isinstance(cedhoc, str):
        raise MalformedMessage("cedhoc must be a string")
    fp = cedhoc.strip().replace(":", "").lower()
    if len(fp) != 64 or not HEX_RE.fullmatch(fp):
        raise MalformedMessage("cedhoc (the gateway EDHOC key fingerprint) must be 64 hex digits, "
                               "the SHA-256 of the gateway's EDHOC key as `gateway init` prints it; "
                               "leave it empty if the devices do not use EDHOC")
    return bytes.fromhex(fp)


class RendezvousService:
    def __init__(self, repo: RendezvousRepo, signer: cose.Signer, config: RendezvousConfig,
                 psk_keys=None):
        self.repo = repo
        self.signer = signer
        self.cfg = config
        self._ca_fps = {cert_fingerprint(c) for c in config.manufacturer_cas}
        self.limiter = SourceLimiter(repo, config)
        # PSK devices (rendezvous_psk.RvPskKeys): commitments and K_rv, encrypted at rest.
        # None: this rendezvous refuses PSK devices, saying so.
        self.psk_keys = psk_keys

    def _psk(self):
        if self.psk_keys is None:
            raise NotAuthorized("this rendezvous is not set up for PSK devices")
        return self.psk_keys

    @property
    def public_key(self):
        return self.signer.public_key()

    async def register(self, body: bytes) -> RvDeviceRecord:
        """Manufacturer registers a device; the registration is signed by the manufacturer CA key."""
        signed = cose.parse_sign1(body, max_size=MAX_MESSAGE)
        chain = signed.x5chain
        if not chain:
            raise NotAuthorized("registration is not signed by a manufacturer CA")
        ca = load_der_cert(chain[0])
        if cert_fingerprint(ca) not in self._ca_fps:
            raise NotAuthorized("registration is signed by an unknown manufacturer")
        payload = signed.verify(public_key_of(ca))
        if _message_type(payload) == psk.RvRegisterPsk.TYPE:
            return await self._register_psk(psk.RvRegisterPsk.decode(payload))
        reg = RvRegister.decode(payload)
        idevid = load_der_cert(reg.idevid)
        verify_device_chain(idevid, [ca])
        serial, urn = device_identity(idevid)
        if serial != reg.serial or urn != reg.urn:
            raise MalformedMessage("registration names another device than its IDevID")
        rec = RvDeviceRecord(serial=reg.serial, urn=reg.urn, idevid_der=reg.idevid,
                             otp_salt=reg.otp_salt, otp_hash=reg.otp_hash,
                             created_at=self.cfg.clock())
        await self.repo.add(rec)
        return rec

    async def claim(self, *, otp_hex: str, devid_hex: str, cip: str, cport, cfingerprint: str,
                    source: str | None = None, cedhoc: str | None = None,
                    cpsk: str | None = None) -> ClaimResult:
        """One-time claim by OTP (TTE). A second claim is refused and changes nothing.
        `source`: the client address, for the per-source limit on wrong OTPs. `cedhoc`
        (optional): the gateway's EDHOC key fingerprint, signed into the device's redirect.
        `cpsk`: for a PSK device, its rendezvous key K_rv (64 hex digits), checked against the
        manufacturer's commitment; ignored (never stored) for a certificate device."""
        serial, otp = _parse_label_ids(devid_hex, otp_hex)
        gateway_url, owner_fp = parse_owner_address(cip, cport, cfingerprint)
        edhoc_fp = parse_edhoc_fingerprint(cedhoc)
        k_rv = psk.parse_psk_hex(cpsk)
        rec = await self._check_otp(serial, otp, source)
        if rec.status is RendezvousStatus.REVOKED:
            raise ProtocolError("device is revoked", status=410, code="revoked")
        if _is_psk_device(rec) and rec.status is RendezvousStatus.NOT_MAPPED:
            # Stored before the mapping: any K_rv that matches the commitment is the one, so a
            # concurrent claim that loses the race below has written the same value.
            keys = self._psk()
            if k_rv is None:
                raise MalformedMessage("this is a PSK device: the claim needs cpsk, its rendezvous "
                                       "key K_rv (64 hex digits, derived from the device's PSK: "
                                       "`introducer claim --device-psk` or `box claim` derive it)")
            if not keys.matches(await keys.commit(serial), psk.psk_commitment(k_rv, serial)):
                raise NotAuthorized("cpsk is not this device's rendezvous key (the manufacturer's "
                                    "commitment differs)")
            await keys.put_key(serial, k_rv)
        if rec.status is not RendezvousStatus.NOT_MAPPED or not await self.repo.claim(
                serial, gateway_url, owner_fp, self.cfg.clock(), gateway_edhoc_fp=edhoc_fp):
            raise Conflict("this OTP was already used: the device is claimed. If you did not "
                           "claim it, its label may have been copied.")
        return await self._result(await self.repo.get(serial))

    async def status(self, *, otp_hex: str, devid_hex: str, source: str | None = None) -> ClaimResult:
        """The device's status for whoever holds its OTP (the OTP keeps answering after the
        claim): not_mapped, mapped, registered or revoked."""
        serial, otp = _parse_label_ids(devid_hex, otp_hex)
        return await self._result(await self._check_otp(serial, otp, source))

    async def _check_otp(self, serial: str, otp: bytes, source: str | None = None) -> RvDeviceRecord:
        await self.limiter.check(source)
        rec = await self.repo.get(serial)
        if rec is None:
            await self.limiter.failed(source)  # probing devids is guessing too
            raise NotFound("no device with this devid is registered here")
        now, window = self.cfg.clock(), self.cfg.device_window
        # Per device, in the database (every replica sees it). A count from before migration
        # 0005 has no window start: its window ended long ago.
        if (rec.failed_claims >= self.cfg.device_failures and rec.failed_since is not None
                and rec.failed_since > now - window):
            raise ProtocolError("too many wrong OTPs for this device; try again later",
                                status=429, code="locked",
                                retry_after=_retry_after(rec.failed_since, window, now))
        if not check_otp(otp, rec.otp_salt, rec.otp_hash):
            await self.limiter.failed(source)
            await self.repo.note_failed_claim(serial, now, window)
            raise NotAuthorized("the OTP does not match this device")
        return rec

    async def owner_statuses(self, body: bytes) -> dict:
        """Messages 7/8: an owner asks for the status of devices it expects. The query is a
        COSE_Sign1 by the owner key (owner CA certificate in x5chain) over a JSON payload
        {type, time, serials}; only devices mapped to that key are answered, every other
        serial (another owner's, unmapped or unknown) comes back in `unknown` alike."""
        signed = cose.parse_sign1(body, max_size=MAX_MESSAGE)
        chain = signed.x5chain
        if not chain:
            raise NotAuthorized("status query is not signed by an owner key")
        owner_key = public_key_of(load_der_cert(chain[0]))
        try:
            q = json.loads(signed.verify(owner_key))
        except ValueError:
            raise MalformedMessage("status query payload is not JSON") from None
        if not isinstance(q, dict) or q.get("type") != STATUS_QUERY_TYPE:
            raise MalformedMessage(f"status query payload must have type {STATUS_QUERY_TYPE}")
        stamp, serials = q.get("time"), q.get("serials")
        if not isinstance(stamp, int) or isinstance(stamp, bool):
            raise MalformedMessage("status query needs an integer time")
        check_fresh(stamp, self.cfg.clock())
        if (not isinstance(serials, list) or len(serials) > MAX_STATUS_QUERY
                or not all(isinstance(x, str) and len(x) == 8 and HEX_RE.fullmatch(x) for x in serials)):
            raise MalformedMessage(f"serials must be a list of up to {MAX_STATUS_QUERY} 8-hex-digit device ids")
        owner_fp = spki_fingerprint(owner_key)
        devices, unknown = [], []
        for serial in dict.fromkeys(x.lower() for x in serials):
            rec = await self.repo.get(serial)
            if rec is None or rec.owner_fp is None or rec.owner_fp != owner_fp:
                unknown.append(serial)
                continue
            devices.append({"serial": rec.serial, "urn": rec.urn, "status": rec.status.value,
                            "fingerprint": (await self._fingerprint(rec)).hex()})
        return {"devices": devices, "unknown": unknown}

    async def _fingerprint(self, rec: RvDeviceRecord) -> bytes:
        """TTE's device fingerprint: of the IDevID, or a PSK device's K_rv commitment."""
        if _is_psk_device(rec):
            return (await self._psk().commit(rec.serial)) or b""
        return cert_fingerprint(load_der_cert(rec.idevid_der))

    async def _result(self, rec: RvDeviceRecord | None) -> ClaimResult:
        assert rec is not None
        return self._claim_result(rec, (await self._fingerprint(rec)).hex())

    @staticmethod
    def _claim_result(rec: RvDeviceRecord | None, fp: str | None = None) -> ClaimResult:
        assert rec is not None
        if fp is None:
            fp = cert_fingerprint(load_der_cert(rec.idevid_der)).hex()
        extra = {"gateway_url": rec.gateway_url} if rec.gateway_url else {}
        if rec.owner_fp:  # lets the introducer tell "claimed by us before" from "stolen OTP"
            extra["owner_fingerprint"] = rec.owner_fp.hex()
        return ClaimResult(urn=rec.urn, fingerprint=fp, status=rec.status.value, serial=rec.serial,
                           extra=extra)

    async def find_owner(self, body: bytes) -> bytes:
        now = self.cfg.clock()
        if psk.is_mac0(body):
            return await self._find_owner_psk(body, now)
        msg, cert = verify_device_signed(body, FindOwner, self.cfg.manufacturer_cas, now)
        check_fresh(msg.time, now)
        rec = await self.repo.get(msg.serial)
        if rec is None:
            raise NotFound("device is not registered at this rendezvous",
                           retry_after=self.cfg.retry_after * 6)
        if rec.idevid_der != cert.public_bytes(Encoding.DER):
            raise NotAuthorized("certificate differs from the one registered for this device")
        if rec.status is RendezvousStatus.REVOKED:
            raise ProtocolError("device is revoked", status=410, code="revoked")
        if rec.status is RendezvousStatus.NOT_MAPPED:
            raise TryLater("device is not claimed by an owner yet", retry_after=self.cfg.retry_after)
        assert rec.gateway_url and rec.owner_fp
        redirect = Redirect(serial=rec.serial, nonce=msg.nonce, gateway_url=rec.gateway_url,
                            owner_fp=rec.owner_fp, issued=int(now),
                            expires=int(now) + self.cfg.redirect_ttl,
                            gateway_edhoc_fp=rec.gateway_edhoc_fp)
        return cose.sign1(redirect.encode(), self.signer)

    # --- PSK devices (protocol/psk.py) --------------------------------------------------------
    async def _register_psk(self, reg: psk.RvRegisterPsk) -> RvDeviceRecord:
        keys = self._psk()
        rec = RvDeviceRecord(serial=reg.serial, urn=reg.urn, idevid_der=b"",   # no IDevID
                             otp_salt=reg.otp_salt, otp_hash=reg.otp_hash,
                             created_at=self.cfg.clock())
        await self.repo.add(rec)   # a second registration is refused before anything is written
        await keys.put_commit(reg.serial, reg.psk_commit)
        return rec

    async def _find_owner_psk(self, body: bytes, now: float) -> bytes:
        """A PSK device's find-owner, MAC'd with its K_rv; the redirect MAC'd back with it."""
        mac = psk.parse_mac0(body, max_size=MAX_MESSAGE)
        unverified = FindOwner.decode(mac.payload)   # only to find the key: trusted after verify
        if mac.kid != psk.device_kid(unverified.serial):
            raise NotAuthorized("message names another device than its kid")
        rec = await self.repo.get(unverified.serial)
        if rec is None:
            raise NotFound("device is not registered at this rendezvous",
                           retry_after=self.cfg.retry_after * 6)
        if not _is_psk_device(rec):
            raise NotAuthorized("a certificate device must sign its messages (this one is MAC'd)")
        if rec.status is RendezvousStatus.REVOKED:
            raise ProtocolError("device is revoked", status=410, code="revoked")
        k_rv = await self._psk().key(rec.serial)
        if rec.status is RendezvousStatus.NOT_MAPPED or k_rv is None:
            # Before the claim no key exists to check the MAC with: all anyone learns is what
            # the status query (with the OTP) would say anyway.
            raise TryLater("device is not claimed by an owner yet", retry_after=self.cfg.retry_after)
        legs = psk.RendezvousLegKeys.from_rv_key(k_rv, rec.serial)
        msg = FindOwner.decode(mac.verify(legs.up))
        check_fresh(msg.time, now)
        assert rec.gateway_url and rec.owner_fp
        redirect = Redirect(serial=rec.serial, nonce=msg.nonce, gateway_url=rec.gateway_url,
                            owner_fp=rec.owner_fp, issued=int(now),
                            expires=int(now) + self.cfg.redirect_ttl,
                            gateway_edhoc_fp=rec.gateway_edhoc_fp)
        return psk.mac0(redirect.encode(), legs.down)

    async def registered(self, body: bytes) -> None:
        """The owner reports the device reached it: mapped → registered."""
        signed = cose.parse_sign1(body, max_size=MAX_MESSAGE)
        chain = signed.x5chain
        if not chain:
            raise NotAuthorized("report is not signed by an owner key")
        owner_key = public_key_of(load_der_cert(chain[0]))
        msg = RvRegistered.decode(signed.verify(owner_key))
        now = self.cfg.clock()
        check_fresh(msg.time, now)
        rec = await self.repo.get(msg.serial)
        if rec is None:
            raise NotFound("device is not registered here")
        if rec.owner_fp != spki_fingerprint(owner_key):
            raise NotAuthorized("only the owner that claimed the device may report it")
        if rec.status is RendezvousStatus.REGISTERED:
            return  # reports are retried: the second one changes nothing
        await self._move(rec, RendezvousStatus.REGISTERED, now)

    async def revoke(self, serial: str) -> RvDeviceRecord:
        """The device is retired or stolen: it is never redirected again."""
        rec = await self.repo.get(serial)
        if rec is None:
            raise NotFound(f"no device {serial} is registered here")
        if rec.status is not RendezvousStatus.REVOKED:
            await self._move(rec, RendezvousStatus.REVOKED, self.cfg.clock())
        if _is_psk_device(rec) and self.psk_keys is not None:
            await self.psk_keys.forget(serial)   # never redirected again: K_rv has no use left
        return await self.repo.get(serial)

    async def _move(self, rec: RvDeviceRecord, new: RendezvousStatus, now: float) -> None:
        check_transition(RENDEZVOUS_TRANSITIONS, rec.status, new)
        if not await self.repo.set_status(rec.serial, rec.status, new, now):
            raise Conflict(f"device {rec.serial} changed status meanwhile; try again")


def _is_psk_device(rec: RvDeviceRecord) -> bool:
    return rec.idevid_der == b""


def _message_type(payload: bytes):
    import cbor2
    try:
        obj = cbor2.loads(payload)
    except Exception:
        return None
    return obj.get(0) if isinstance(obj, dict) else None


def _parse_label_ids(devid_hex: str, otp_hex: str) -> tuple[str, bytes]:
    devid = (devid_hex or "").strip().lower()
    otp = (otp_hex or "").strip().lower()
    if len(devid) != 8 or not HEX_RE.fullmatch(devid):
        raise MalformedMessage("devid must be 8 hex digits")
    if len(otp) != 16 or not HEX_RE.fullmatch(otp):
        raise MalformedMessage("otp must be 16 hex digits")
    return devid, bytes.fromhex(otp)
