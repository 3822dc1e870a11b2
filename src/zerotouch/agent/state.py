"""The agent's persisted state in its data directory.

Layout of a device data directory:
  factory.json          serial, URN, rendezvous URL, rendezvous key pin, rendezvous TLS CA (factory)
  n_device.secret       N_device / OTP, hex (0600, factory)
  idevid.key / .pem     IDevID key (0600) and certificate (factory)
  manufacturer-ca.pem   manufacturer CA (factory)
  ldevid.key / .pem     LDevID key (0600) and certificate from the owner CA (onboarding)
  owner-ca.pem          owner CA (onboarding)
  bundle.cose           owner-signed config bundle (onboarding)
  channel.secret        channel secret (0600, onboarding)
  state.json            phase and what the agent needs to reach the terminus; written last,
                        so it is the commit point of an onboarding

With short-lived operational certificates (bundle setting `est_operational`, see renewal.py):
  operational.key / .pem        operational key (0600) and certificate over EST, used for the
                                terminus instead of the LDevID
  operational.new.key / .csr    key and CSR of an enrollment in flight (kept across a 202)
  operational.new.pem           enrolled, not yet proven at the terminus
  operational.prev.key / .pem   the pair before the last renewal
state.json then also records `operational` (on/off, from the bundle), `operational_not_after`
and `renew_at` (epoch seconds; renew_at carries this device's jitter). The certificate files
are the truth: a state.json that describes another certificate is recomputed from them.
Older state.json files without these fields load with operational certificates off.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..util.files import atomic_write, atomic_write_json, fsync_dir, read_json

STATE_FILE = "state.json"


@dataclass
class AgentState:
    phase: str = "factory"           # factory | onboarded
    gateway_url: str | None = None
    owner_fp: str | None = None
    terminus_host: str | None = None
    terminus_port: int | None = None
    topic_prefix: str | None = None
    onboarded_at: float | None = None
    onboarding_ms: float | None = None
    operational: bool = False                 # enroll/renew operational certificates over EST
    operational_not_after: float | None = None
    renew_at: float | None = None
    operational_renewed_at: float | None = None

    @property
    def onboarded(self) -> bool:
        return self.phase == "onboarded"


def load_state(device_dir: Path) -> AgentState:
    path = Path(device_dir) / STATE_FILE
    if not path.exists():
        return AgentState()
    data = read_json(path)
    known = {k: data[k] for k in AgentState.__dataclass_fields__ if k in data}
    return AgentState(**known)


def save_state(device_dir: Path, state: AgentState) -> None:
    atomic_write_json(Path(device_dir) / STATE_FILE, asdict(state))


def store_credentials(device_dir: Path, *, ldevid_pem: bytes, owner_ca_pem: bytes, bundle: bytes,
                      channel_secret: bytes) -> None:
    """Each file is replaced atomically; state.json (saved after this) commits them as a set."""
    d = Path(device_dir)
    atomic_write(d / "ldevid.pem", ldevid_pem, sync_dir=False)
    atomic_write(d / "owner-ca.pem", owner_ca_pem, sync_dir=False)
    atomic_write(d / "bundle.cose", bundle, sync_dir=False)
    atomic_write(d / "channel.secret", channel_secret.hex().encode(), mode=0o600, sync_dir=False)
    fsync_dir(d)
