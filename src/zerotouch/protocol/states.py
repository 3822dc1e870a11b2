"""State enums and transition tables. A transition not in a table is a protocol error."""
from __future__ import annotations

import enum

from .errors import Conflict


class DeviceState(str, enum.Enum):
    """Device side of one onboarding."""
    FACTORY = "factory"
    FINDING_OWNER = "finding_owner"
    REDIRECTED = "redirected"
    HELLO_SENT = "hello_sent"
    OWNER_VERIFIED = "owner_verified"
    PROVE_SENT = "prove_sent"
    CREDENTIALED = "credentialed"
    DONE_SENT = "done_sent"
    ONBOARDED = "onboarded"


DEVICE_TRANSITIONS: dict[DeviceState, set[DeviceState]] = {
    DeviceState.FACTORY: {DeviceState.FINDING_OWNER},
    DeviceState.FINDING_OWNER: {DeviceState.REDIRECTED, DeviceState.FACTORY},
    DeviceState.REDIRECTED: {DeviceState.HELLO_SENT},
    DeviceState.HELLO_SENT: {DeviceState.OWNER_VERIFIED, DeviceState.FACTORY},
    DeviceState.OWNER_VERIFIED: {DeviceState.PROVE_SENT},
    DeviceState.PROVE_SENT: {DeviceState.CREDENTIALED, DeviceState.FACTORY},
    DeviceState.CREDENTIALED: {DeviceState.DONE_SENT},
    DeviceState.DONE_SENT: {DeviceState.ONBOARDED, DeviceState.FACTORY},
    DeviceState.ONBOARDED: set(),
}


class RendezvousStatus(str, enum.Enum):
    """Per-device status at the rendezvous (TTE draft's statuses)."""
    NOT_MAPPED = "not_mapped"
    MAPPED = "mapped"
    REGISTERED = "registered"
    REVOKED = "revoked"


RENDEZVOUS_TRANSITIONS: dict[RendezvousStatus, set[RendezvousStatus]] = {
    RendezvousStatus.NOT_MAPPED: {RendezvousStatus.MAPPED, RendezvousStatus.REVOKED},
    RendezvousStatus.MAPPED: {RendezvousStatus.REGISTERED, RendezvousStatus.REVOKED},
    RendezvousStatus.REGISTERED: {RendezvousStatus.REVOKED},
    RendezvousStatus.REVOKED: set(),
}


class SessionState(str, enum.Enum):
    """Gateway side of one onboarding, kept in the database so any replica can continue it."""
    CHALLENGED = "challenged"
    CREDENTIALED = "credentialed"
    DONE = "done"


SESSION_TRANSITIONS: dict[SessionState, set[SessionState]] = {
    SessionState.CHALLENGED: {SessionState.CREDENTIALED},
    SessionState.CREDENTIALED: {SessionState.DONE},
    SessionState.DONE: set(),
}


class InventoryState(str, enum.Enum):
    """Owner's view of a device."""
    EXPECTED = "expected"       # registered from a label / CSV, not seen yet
    ONBOARDING = "onboarding"
    ONBOARDED = "onboarded"
    REVOKED = "revoked"


def check_transition(table: dict, current, new) -> None:
    if new not in table[current]:
        raise Conflict(f"cannot go from {current.value} to {new.value}")
