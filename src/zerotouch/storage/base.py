"""Repository interfaces and records. Servers keep no session state in memory: everything an
in-flight onboarding needs is here, so any replica can take any message."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..protocol.states import InventoryState, RendezvousStatus, SessionState


@dataclass
class RvDeviceRecord:
    serial: str
    urn: str
    idevid_der: bytes
    otp_salt: bytes
    otp_hash: bytes
    status: RendezvousStatus = RendezvousStatus.NOT_MAPPED
    gateway_url: str | None = None
    owner_fp: bytes | None = None
    created_at: float = 0.0
    claimed_at: float | None = None
    registered_at: float | None = None
    failed_claims: int = 0            # wrong OTPs in the window that began at failed_since
    failed_since: float | None = None
    gateway_edhoc_fp: bytes | None = None  # the owner gateway's EDHOC key (claim's cedhoc)


@dataclass
class InventoryRecord:
    serial: str
    state: InventoryState = InventoryState.EXPECTED
    description: str = ""
    idevid_fp: bytes | None = None
    ldevid_serial: str | None = None
    last_error: str | None = None
    created_at: float = 0.0
    onboarded_at: float | None = None
    attestation: str | None = None    # how the TPM was attested, or why it was refused


@dataclass
class SessionRecord:
    id: bytes
    serial: str
    nonce: bytes
    challenge: bytes
    idevid_fp: bytes
    state: SessionState
    expires: float
    ldevid_der: bytes | None = None
    idevid_der: bytes | None = None   # so prove/done may name the key by kid instead of carrying it
    attestation: bytes | None = None  # TPM evidence from hello (services/attestation.py)


class RendezvousRepo(Protocol):
    async def add(self, rec: RvDeviceRecord) -> None:
        """Insert; raises Conflict if the serial exists."""
    async def get(self, serial: str) -> RvDeviceRecord | None: ...
    async def claim(self, serial: str, gateway_url: str, owner_fp: bytes, now: float,
                    gateway_edhoc_fp: bytes | None = None) -> bool:
        """Map a not-mapped device; False if it was already mapped (atomic)."""
    async def set_status(self, serial: str, old: RendezvousStatus, new: RendezvousStatus,
                         now: float) -> bool: ...
    async def note_failed_claim(self, serial: str, now: float | None = None,
                                window: float | None = None) -> None:
        """Count a wrong OTP for the device (atomically, no lost updates). With `window`, a
        count whose window began `window` seconds or more before `now` restarts at 1 from `now`;
        without, it only grows. `now` defaults to the wall clock."""
    async def source_failures(self, source: str) -> tuple[int, float] | None:
        """(failures, window start) recorded for a source address; None if none."""
    async def note_source_failure(self, source: str, now: float, window: float) -> int:
        """Count a failed guess from `source` in its fixed window (restarted at `now` when it
        began `window` seconds or more before); returns the count (atomic across replicas)."""
    async def prune_source_failures(self, before: float) -> int:
        """Forget sources whose window began before `before`; returns how many."""
    async def count_by_status(self) -> dict[str, int]: ...


class InventoryRepo(Protocol):
    async def add(self, rec: InventoryRecord) -> bool:
        """Insert; False if the serial is already in the inventory (nothing changes)."""
    async def get(self, serial: str) -> InventoryRecord | None: ...
    async def list(self, limit: int = 1000) -> list[InventoryRecord]: ...
    async def update(self, serial: str, **fields) -> None: ...
    async def remove(self, serial: str) -> None: ...


class SessionRepo(Protocol):
    async def create(self, rec: SessionRecord) -> None: ...
    async def start(self, rec: SessionRecord) -> None:
        """Create the session and mark the inventory device onboarding, in one transaction."""
    async def store_ldevid(self, session_id: bytes, serial: str, ldevid_der: bytes,
                           ldevid_serial: str) -> None:
        """Remember the issued LDevID on the session and on the inventory record (one transaction)."""
    async def finish(self, session_id: bytes, serial: str, now: float) -> bool:
        """CREDENTIALED → DONE and the device onboarded, in one transaction; False if lost a race."""
    async def get(self, session_id: bytes) -> SessionRecord | None: ...
    async def advance(self, session_id: bytes, old: SessionState, new: SessionState,
                      **fields) -> bool:
        """Compare-and-set the state; False if another request moved it first."""
    async def delete_expired(self, now: float) -> int: ...


class SecretRepo(Protocol):
    """Vault storage: values arrive already encrypted by the vault."""
    async def put(self, kind: str, name: str, ciphertext: bytes) -> None: ...
    async def get(self, kind: str, name: str) -> bytes | None: ...


@dataclass
class CertRecord:
    serial_number: str          # certificate serial, lowercase hex
    device_serial: str
    der: bytes
    not_after: float
    kind: str = "ldevid"        # ldevid | operational | idevid | server
    issued_at: float = 0.0
    revoked_at: float | None = None
    reason: str | None = None   # RFC 5280 reason name when revoked


class CertRepo(Protocol):
    async def add(self, serial_number: str, device_serial: str, der: bytes, not_after: float,
                  *, kind: str = "ldevid", issued_at: float = 0.0) -> None: ...
    async def for_device(self, device_serial: str) -> list[bytes]: ...
    async def get(self, serial_number: str) -> CertRecord | None: ...
    async def records_for_device(self, device_serial: str) -> list[CertRecord]: ...
    async def revoke(self, serial_number: str, now: float, reason: str) -> bool:
        """Mark revoked; False if unknown or already revoked (the first revocation stands)."""
    async def revoked(self) -> list[CertRecord]:
        """Every revoked certificate not yet expired (what a CRL must list)."""


@dataclass
class EnrollRequest:
    """An EST enrollment waiting for (or decided by) a person: RFC 7030 §4.2.3 202 + Retry-After."""
    id: str                     # hex SHA-256 of the CSR: the retried request finds its record
    device_serial: str
    label: str
    csr_der: bytes
    state: str = "pending"      # pending | approved | rejected | issued
    created_at: float = 0.0
    decided_at: float | None = None
    cert_serial: str | None = None


class EnrollRequestRepo(Protocol):
    async def add(self, req: EnrollRequest) -> bool:
        """Insert; False if a request with this id exists (nothing changes)."""
    async def get(self, request_id: str) -> EnrollRequest | None: ...
    async def list(self, state: str | None = None, limit: int = 1000) -> list[EnrollRequest]: ...
    async def decide(self, request_id: str, old: str, new: str, now: float,
                     cert_serial: str | None = None) -> bool:
        """Compare-and-set the state."""


class Store(Protocol):
    rendezvous: RendezvousRepo
    inventory: InventoryRepo
    sessions: SessionRepo
    secrets: SecretRepo
    certs: CertRepo
    enroll_requests: EnrollRequestRepo

    async def close(self) -> None: ...
