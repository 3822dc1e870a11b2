"""Revocation: retire a device or one certificate, and keep a signed CRL current.

The database is the only state: a revocation is a row update, and the CRL is rebuilt from the
revoked rows, so any gateway replica (or the terminus) serves the same list. Each process keeps
the last CRL in memory and rebuilds it when it ages past a fraction of its validity, when this
process revoked something, or when a cheap look at the revoked rows shows another replica did.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..protocol.errors import MalformedMessage, NotFound
from ..protocol.states import InventoryState
from ..util.files import atomic_write

# RFC 5280 §5.3.1 reasons an owner may give. certificateHold is left out on purpose: a hold can
# be lifted, and nothing here un-revokes; the CA-compromise reasons do not apply to devices.
REASONS = ("unspecified", "keyCompromise", "affiliationChanged", "superseded",
           "cessationOfOperation", "privilegeWithdrawn")
REFRESH_FRACTION = 0.25   # rebuild when a quarter of the validity has gone: 3/4 always remain
RECHECK_S = 5.0           # how stale another replica's revocation may be in our cached CRL
MAX_AGE_CAP_S = 60        # HTTP caches may keep a CRL this long at most


def check_reason(reason: str) -> str:
    if reason not in REASONS:
        raise MalformedMessage(f"unknown revocation reason {reason!r}; use one of: "
                               + ", ".join(REASONS))
    return reason


def normalise_cert_serial(text: str) -> str:
    """'0A:1b…', '0x0a1b…' or 'a1b…' → the store's form (lowercase hex, no leading zeros)."""
    raw = text.strip().lower().removeprefix("0x").replace(":", "")
    if not raw or len(raw) > 64 or any(c not in "0123456789abcdef" for c in raw):
        raise MalformedMessage(f"certificate serial {text!r} is not a hexadecimal number")
    return format(int(raw, 16), "x")


@dataclass(frozen=True)
class RevokeResult:
    target: str                                      # "device SN-1" or "certificate 1a2b…"
    reason: str
    revoked: list[str] = field(default_factory=list)   # certificate serials revoked now
    already: list[str] = field(default_factory=list)   # revoked before (first revocation stands)
    state_changed: bool = False                      # inventory state moved to revoked

    @property
    def changed(self) -> bool:
        return bool(self.revoked) or self.state_changed

    def describe(self) -> str:
        if not self.changed:
            return f"{self.target}: already revoked, nothing changed"
        parts = [f"{self.target}: revoked ({self.reason})"]
        if self.revoked:
            parts.append("certificates " + ", ".join(self.revoked))
        if self.already:
            parts.append("already revoked before: " + ", ".join(self.already))
        return "; ".join(parts)


@dataclass(frozen=True)
class CrlSnapshot:
    der: bytes
    pem: bytes
    this_update: float
    next_update: float
    serials: frozenset[int]


def parse_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL in PEM or DER; MalformedMessage if it is neither."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise MalformedMessage("not a PEM or DER CRL") from None


def snapshot_of(data: bytes) -> CrlSnapshot:
    crl = parse_crl(data)
    nxt = crl.next_update_utc
    return CrlSnapshot(der=crl.public_bytes(Encoding.DER), pem=crl.public_bytes(Encoding.PEM),
                       this_update=crl.last_update_utc.timestamp(),
                       next_update=nxt.timestamp() if nxt else float("inf"),
                       serials=frozenset(r.serial_number for r in crl))


class RevocationService:
    def __init__(self, store, vault, *, crl_validity_s: float = 3600,
                 clock: Callable[[], float] = time.time, recheck_s: float = RECHECK_S):
        if not 60 <= crl_validity_s <= 30 * 86400:  # what the vault will sign
            raise ValueError("crl_validity_s must be between 60 s and 30 days")
        self.store, self.vault, self.clock = store, vault, clock
        self.crl_validity_s, self.recheck_s = float(crl_validity_s), recheck_s
        self._snap: CrlSnapshot | None = None
        self._built_at = self._checked_at = 0.0
        self._key: tuple = ()
        # bumped by every local revocation; a build remembers the one it started from, so a
        # revocation that lands during a rebuild still forces the next one
        self._generation, self._built_generation = 1, 0
        self._lock = asyncio.Lock()

    # --- revoking ---------------------------------------------------------------------------
    async def revoke_device(self, serial: str, reason: str = "cessationOfOperation") -> RevokeResult:
        check_reason(reason)  # before any lookup: a bad request changes nothing
        inv = await self.store.inventory.get(serial)
        if inv is None:
            raise NotFound(f"device {serial} is not in the inventory")
        # State first: hello refuses a revoked device, so no new onboarding starts while (or
        # after) we list its certificates. A failure half-way is finished by running it again.
        state_changed = inv.state is not InventoryState.REVOKED
        if state_changed:
            await self.store.inventory.update(serial, state=InventoryState.REVOKED,
                                              last_error=f"revoked: {reason}")
        now = self.clock()
        revoked, already = [], []
        for rec in await self.store.certs.records_for_device(serial):
            if rec.revoked_at is None and await self.store.certs.revoke(rec.serial_number, now, reason):
                revoked.append(rec.serial_number)
            else:  # revoked before, or by a concurrent request a moment ago
                already.append(rec.serial_number)
        if revoked:
            self._generation += 1
        return RevokeResult(f"device {serial}", reason, revoked, already, state_changed)

    async def revoke_certificate(self, serial_number_hex: str, reason: str = "unspecified") -> RevokeResult:
        check_reason(reason)
        sn = normalise_cert_serial(serial_number_hex)
        rec = await self.store.certs.get(sn)
        if rec is None:
            raise NotFound(f"no certificate with serial {sn} was issued by this owner")
        target = f"certificate {sn} (device {rec.device_serial})"
        if rec.revoked_at is not None or not await self.store.certs.revoke(sn, self.clock(), reason):
            return RevokeResult(target, reason, already=[sn])
        self._generation += 1
        return RevokeResult(target, reason, revoked=[sn])

    # --- the CRL ----------------------------------------------------------------------------
    async def _revoked_key(self) -> tuple:
        return tuple(sorted((r.serial_number, r.reason or "") for r in await self.store.certs.revoked()))

    async def snapshot(self) -> CrlSnapshot:
        async with self._lock:  # one rebuild at a time; waiters get its result
            now = self.clock()
            if self._snap is not None and self._built_generation == self._generation \
                    and now - self._built_at < self.crl_validity_s * REFRESH_FRACTION:
                if now - self._checked_at < self.recheck_s:
                    return self._snap
                key = await self._revoked_key()
                self._checked_at = now
                if key == self._key:
                    return self._snap
            # read the rows before the vault does: a revocation in between makes the next
            # check rebuild once more (safe), never hides one
            generation = self._generation
            key = await self._revoked_key()
            self._snap = snapshot_of(await self.vault.make_crl(self.crl_validity_s))
            self._key, self._built_at, self._checked_at = key, now, now
            self._built_generation = generation
            return self._snap

    async def current_crl(self) -> bytes:
        """The current CRL, DER."""
        return (await self.snapshot()).der

    def max_age(self, snap: CrlSnapshot) -> int:
        """Seconds an HTTP cache may keep `snap`: a small slice of its remaining life."""
        left = snap.next_update - self.clock()
        return max(0, int(min(MAX_AGE_CAP_S, self.crl_validity_s / 10, left / 10)))

    async def write_crl_file(self, path: Path) -> bool:
        """Write the CRL as PEM, atomically, only if it differs; True if the file changed."""
        pem = (await self.snapshot()).pem
        path = Path(path)
        try:
            if path.read_bytes() == pem:
                return False
        except FileNotFoundError:
            pass
        atomic_write(path, pem)
        return True


def describe_crl(snap: CrlSnapshot) -> str:
    nxt = dt.datetime.fromtimestamp(snap.next_update, dt.timezone.utc).isoformat(timespec="seconds")
    return f"CRL lists {len(snap.serials)} certificate(s), next update {nxt}"


async def gateway_revoke(directory: Path, *, device: str | None = None, cert: str | None = None,
                         reason: str) -> tuple[RevokeResult, CrlSnapshot]:
    """Admin operation on a gateway directory: revoke, then rewrite DIR/crl.pem."""
    from .roles import build_gateway
    if (device is None) == (cert is None):
        raise MalformedMessage("give exactly one of a device serial or a certificate serial")
    check_reason(reason)
    gw = await build_gateway(directory)
    try:
        svc = RevocationService(gw.store, gw.service.vault)
        if device is not None:
            result = await svc.revoke_device(device, reason)
        else:
            result = await svc.revoke_certificate(cert, reason)
        await svc.write_crl_file(Path(directory) / "crl.pem")
        return result, await svc.snapshot()
    finally:
        await gw.close()


__all__ = ["REASONS", "RevocationService", "RevokeResult", "CrlSnapshot", "check_reason",
           "normalise_cert_serial", "parse_crl", "snapshot_of", "describe_crl", "gateway_revoke"]
