"""The device agent driven against the in-memory fleet: retries, limits, what it stores,
power loss while storing, and a lying gateway.

The transport below hands the agent's bytes straight to the server cores; it has no
`gateway_peer_cert`, so the agent's TLS pin check is skipped (as for OSCORE).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import stat
import statistics
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from zerotouch.agent.backoff import Backoff
from zerotouch.agent.runtime import Agent
from zerotouch.agent.state import STATE_FILE, AgentState, load_state, save_state
from zerotouch.pki.keys import generate_p256, load_private_key, public_key_der
from zerotouch.protocol import cose
from zerotouch.protocol.codec import MAX_MESSAGE
from zerotouch.protocol.errors import TryLater
from zerotouch.protocol.messages import Bundle, Challenge, Credentials
from zerotouch.protocol.states import InventoryState, RendezvousStatus

from fleet import make_fleet

CREDENTIAL_FILES = ("ldevid.pem", "owner-ca.pem", "bundle.cose", "channel.secret")
COSE_SIGN1_TAG = 18


# --- helpers -------------------------------------------------------------------------------
class MemoryTransport:
    """Agent transport over the fleet's server cores; `tamper` may rewrite any answer."""

    def __init__(self, fleet, *, gateway=None, tamper=None):
        self.fleet = fleet
        self.gw = gateway or fleet.gateway
        self.tamper = tamper
        self.calls: list[tuple[str, str]] = []

    async def find_owner(self, url: str, body: bytes) -> bytes:
        self.calls.append(("find_owner", url))
        return await self.fleet.rendezvous.find_owner(body)

    async def gateway(self, url: str, step: str, body: bytes) -> bytes:
        self.calls.append((step, url))
        answer = await getattr(self.gw, step)(body)
        if self.tamper is not None:
            answer = await self.tamper(step, answer)
        return answer


class DeadTransport:
    """Fails on any use: an onboarded device must not need it."""

    def __init__(self):
        self.calls = 0

    async def find_owner(self, url, body):
        self.calls += 1
        raise AssertionError("an onboarded device called the rendezvous")

    async def gateway(self, url, step, body):
        self.calls += 1
        raise AssertionError(f"an onboarded device called the gateway ({step})")


class Sleeps:
    """A fake `sleep` that records the delays and may act after the n-th one."""

    def __init__(self, after=None, on_call=None):
        self.delays: list[float] = []
        self.after, self.on_call = after, on_call

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.on_call is not None and len(self.delays) == self.after:
            await self.on_call()




def agent_for(dev, transport, **kw) -> Agent:
    kw.setdefault("backoff", Backoff(rand=random.Random(1)))
    return Agent(dev.device_dir, transport=transport, **kw)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def sign1_with_payload(original: bytes, payload: bytes) -> bytes:
    """The same COSE_Sign1 (header, signature) around another payload."""
    s = cose.parse_sign1(original, max_size=MAX_MESSAGE)
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [s.protected_raw, {}, payload, s.signature]))


async def assert_onboarded_files(fleet, dev) -> None:
    d = dev.device_dir
    state = json.loads((d / STATE_FILE).read_text())
    assert state["phase"] == "onboarded"
    assert state["owner_fp"] == fleet.owner_fp_hex
    assert (state["terminus_host"], state["terminus_port"]) == ("127.0.0.1", 8883)
    assert state["topic_prefix"] == f"devices/{dev.serial}"
    assert load_state(d).onboarded

    owner_ca = x509.load_pem_x509_certificate((d / "owner-ca.pem").read_bytes())
    assert owner_ca.public_bytes(serialization.Encoding.DER) == await fleet.vault.owner_ca_der()
    ldevid = x509.load_pem_x509_certificate((d / "ldevid.pem").read_bytes())
    ldevid.verify_directly_issued_by(owner_ca)
    manufacturer_ca = fleet.manufacturer.ca.cert
    with pytest.raises(Exception):
        ldevid.verify_directly_issued_by(manufacturer_ca)   # not the IDevID: an owner credential
    key = load_private_key(d / "ldevid.key")
    assert public_key_der(key.public_key()) == public_key_der(ldevid.public_key())
    assert mode_of(d / "ldevid.key") == 0o600
    assert mode_of(d / "channel.secret") == 0o600

    bundle_signed = cose.parse_sign1((d / "bundle.cose").read_bytes(), max_size=MAX_MESSAGE)
    bundle = Bundle.decode(bundle_signed.verify(owner_ca.public_key()))
    assert bundle.serial == dev.serial
    assert bundle.owner_ca == owner_ca.public_bytes(serialization.Encoding.DER)
    secret_hex = (d / "channel.secret").read_text().strip()
    assert len(bytes.fromhex(secret_hex)) == 32


# --- backoff -------------------------------------------------------------------------------
def test_backoff_without_retry_after_grows_exponentially_with_full_jitter():
    base, cap = 0.5, 8.0
    b = Backoff(base=base, cap=cap, rand=random.Random(20240601))
    means = []
    for attempt in range(9):
        bound = min(cap, base * 2 ** attempt)
        samples = [b.delay(attempt) for _ in range(1500)]
        assert all(0 <= s <= bound for s in samples)          # within [0, min(cap, base*2^n)]
        assert min(samples) < 0.05 * bound and max(samples) > 0.95 * bound   # full jitter
        assert len(set(samples)) > 1400
        mean = statistics.fmean(samples)
        assert abs(mean - bound / 2) < 0.06 * bound
        means.append(mean)
    # doubles each attempt until the cap (0.5, 1, 2, 4, 8 = cap from attempt 4)
    for a in range(4):
        assert 1.7 < means[a + 1] / means[a] < 2.3
    for a in range(4, 8):
        assert 0.9 < means[a + 1] / means[a] < 1.1


def test_backoff_is_reproducible_with_a_seeded_random():
    one, two = Backoff(rand=random.Random(7)), Backoff(rand=random.Random(7))
    assert [one.delay(a) for a in range(12)] == [two.delay(a) for a in range(12)]
    assert [one.delay(a, 5) for a in range(12)] == [two.delay(a, 5) for a in range(12)]


@pytest.mark.parametrize("retry_after", [0, 1, 5, 30, 120])
def test_backoff_never_retries_before_retry_after(retry_after):
    b = Backoff(rand=random.Random(retry_after))
    for attempt in range(12):
        d = b.delay(attempt, retry_after)
        assert retry_after <= d <= retry_after + max(1.0, retry_after) * 0.2


def test_backoff_survives_a_long_wait():
    b = Backoff(rand=random.Random(3))
    assert 0 <= b.delay(1100) <= b.cap
    assert 5 <= b.delay(1100, retry_after=5) <= 6


async def test_unclaimed_agent_keeps_waiting_past_1024_attempts(fleet):
    dev = await fleet.make(claim=False)

    class NotClaimed:
        async def find_owner(self, url, body):
            raise TryLater("device is not claimed by an owner yet", retry_after=5)

        async def gateway(self, url, step, body):
            raise AssertionError("no redirect was given")

    sleeps = Sleeps()
    report = await agent_for(dev, NotClaimed(), sleep=sleeps, max_attempts=1030).run(telemetry=0)
    assert report.attempts == 1030
    assert report.error == "device is not claimed by an owner yet"


# --- retry until claimed -------------------------------------------------------------------
async def test_unclaimed_device_retries_honouring_retry_after_then_onboards(fleet):
    fleet.rendezvous.cfg.retry_after = 7
    dev = await fleet.make(claim=False)

    async def claim():
        await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid,
                                     cip="127.0.0.1", cport=8444, cfingerprint=fleet.owner_fp_hex)

    sleeps = Sleeps(after=3, on_call=claim)
    transport = MemoryTransport(fleet)
    report = await agent_for(dev, transport, sleep=sleeps).run(telemetry=0)

    assert report.error is None, report.error
    assert report.onboarded and not report.straight_to_terminus
    assert report.attempts == 4
    assert len(sleeps.delays) == 3
    # never earlier than the server asked, at most 20 % later (jitter so a fleet spreads out)
    assert all(7 <= d <= 7 * 1.2 for d in sleeps.delays), sleeps.delays
    assert report.errors == ["device is not claimed by an owner yet"] * 3
    assert [c for c, _ in transport.calls] == ["find_owner"] * 4 + ["hello", "prove", "done"]
    assert {url for c, url in transport.calls if c == "find_owner"} == {"https://127.0.0.1:8443"}
    assert {url for c, url in transport.calls if c != "find_owner"} == {"https://127.0.0.1:8444"}
    await assert_onboarded_files(fleet, dev)
    assert (await fleet.store.rendezvous.get(dev.serial)).status is RendezvousStatus.REGISTERED
    assert (await fleet.store.inventory.get(dev.serial)).state is InventoryState.ONBOARDED


async def test_max_attempts_stops_and_reports_the_error(fleet):
    dev = await fleet.make(claim=False)
    sleeps = Sleeps()
    transport = MemoryTransport(fleet)
    report = await agent_for(dev, transport, sleep=sleeps, max_attempts=3).run(telemetry=0)

    assert not report.onboarded and not report.straight_to_terminus
    assert report.attempts == 3
    assert report.error == "device is not claimed by an owner yet"
    assert len(report.errors) == 3
    assert len(sleeps.delays) == 2            # no pointless sleep after the last attempt
    assert transport.calls == [("find_owner", "https://127.0.0.1:8443")] * 3
    assert not load_state(dev.device_dir).onboarded
    assert not (dev.device_dir / STATE_FILE).exists()
    assert not any((dev.device_dir / f).exists() for f in CREDENTIAL_FILES)


async def test_max_attempts_reports_a_gateway_refusal(fleet):
    dev = await fleet.make(inventory=False)     # claimed, but the owner never registered it
    report = await agent_for(dev, MemoryTransport(fleet), sleep=Sleeps(),
                             max_attempts=2).run(telemetry=0)
    assert not report.onboarded
    assert report.attempts == 2
    assert report.error == "device is not in the owner's inventory"


# --- what an onboarded device keeps ----------------------------------------------------------
async def test_onboarded_device_stores_everything_and_goes_straight_to_the_terminus(fleet):
    dev = await fleet.make()
    transport = MemoryTransport(fleet)
    report = await agent_for(dev, transport).run(telemetry=0)
    assert report.error is None, report.error
    assert report.onboarded and report.attempts == 1 and report.onboarding_ms is not None
    await assert_onboarded_files(fleet, dev)
    d = dev.device_dir
    assert (d / "owner-ca.pem").read_bytes() == x509.load_der_x509_certificate(
        await fleet.vault.owner_ca_der()).public_bytes(serialization.Encoding.PEM)
    assert bytes.fromhex((d / "channel.secret").read_text()) == \
        await fleet.vault.channel_secret(dev.serial)
    issued = await fleet.store.certs.for_device(dev.serial)
    ldevid = x509.load_pem_x509_certificate((d / "ldevid.pem").read_bytes())
    assert issued == [ldevid.public_bytes(serialization.Encoding.DER)]   # the owner's record
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    # no temporary files are left next to the real ones
    assert not [n for n in before if n.endswith(".tmp")]

    dead = DeadTransport()
    again = await agent_for(dev, dead, sleep=Sleeps()).run(telemetry=0)
    assert again.error is None, again.error
    assert again.straight_to_terminus and again.onboarded
    assert again.attempts == 0 and dead.calls == 0
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before   # nothing rewritten


# --- power loss ------------------------------------------------------------------------------
class PowerLoss(BaseException):
    """The power goes: nothing after this point runs (not even cleanup handlers)."""


def _is_temp_of(path, target: str) -> bool:
    name = os.path.basename(os.fspath(path))
    return name.startswith(f".{target}.") and name.endswith(".tmp")


class _HalfWriter:
    """A file whose write lands half the bytes on disk, then the power goes."""

    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()
        return False

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        os.fsync(self.fh.fileno())
        raise PowerLoss(f"power lost while writing {self.fh.name}")

    def __getattr__(self, name):
        return getattr(self.fh, name)


def arm_power_loss(m: pytest.MonkeyPatch, target: str, how: str) -> None:
    """Cut the power while atomic_write replaces `target`: in the middle of writing its temp
    file (`write`) or just before the rename (`replace`). The temp file stays, as it would."""
    real_replace, real_fdopen, real_unlink = os.replace, os.fdopen, os.unlink

    if how == "replace":
        def replace(src, dst, *a, **kw):
            if os.path.basename(os.fspath(dst)) == target:
                raise PowerLoss(f"power lost before renaming {target}")
            return real_replace(src, dst, *a, **kw)
        m.setattr(os, "replace", replace)
    else:
        def fdopen(fd, *a, **kw):
            fh = real_fdopen(fd, *a, **kw)
            if isinstance(fd, int) and _is_temp_of(os.readlink(f"/proc/self/fd/{fd}"), target):
                return _HalfWriter(fh)
            return fh
        m.setattr(os, "fdopen", fdopen)

    def unlink(path, *a, **kw):  # atomic_write's cleanup never runs after a real power loss
        if _is_temp_of(path, target):
            return None
        return real_unlink(path, *a, **kw)
    m.setattr(os, "unlink", unlink)


def assert_real_files_complete(d: Path) -> None:
    """Every file under its real name is a whole version, never a partial write."""
    for name in CREDENTIAL_FILES:
        p = d / name
        if not p.exists():
            continue
        data = p.read_bytes()
        if name.endswith(".pem"):
            x509.load_pem_x509_certificate(data)
        elif name == "bundle.cose":
            Bundle.decode(cose.parse_sign1(data, max_size=MAX_MESSAGE).payload)
        else:
            assert len(bytes.fromhex(data.decode().strip())) == 32
    if (d / "ldevid.key").exists():
        load_private_key(d / "ldevid.key")


@pytest.mark.parametrize("target,how", [
    ("ldevid.pem", "write"),
    ("owner-ca.pem", "replace"),
    ("bundle.cose", "write"),
    ("channel.secret", "write"),
    ("channel.secret", "replace"),
    ("state.json", "write"),
    ("state.json", "replace"),
])
async def test_power_loss_while_storing_keeps_old_state_and_device_reonboards(
        fleet, monkeypatch, target, how):
    dev = await fleet.make()
    d = dev.device_dir
    save_state(d, AgentState())                  # the old state: factory-fresh
    old_state = (d / STATE_FILE).read_bytes()

    with monkeypatch.context() as m:
        arm_power_loss(m, target, how)
        with pytest.raises(PowerLoss):
            await agent_for(dev, MemoryTransport(fleet), sleep=Sleeps()).run(telemetry=0)

    # After the reboot: the old state, byte for byte, and it parses
    assert (d / STATE_FILE).read_bytes() == old_state
    assert json.loads(old_state)["phase"] == "factory"
    assert not load_state(d).onboarded
    # a half-written temp file may lie around under its hidden temp name, never as the real file
    leftovers = [p.name for p in d.iterdir() if p.name.endswith(".tmp")]
    assert leftovers and all(_is_temp_of(n, target) for n in leftovers)
    assert_real_files_complete(d)

    # a fresh agent onboards again from the start
    transport = MemoryTransport(fleet)
    report = await agent_for(dev, transport, sleep=Sleeps()).run(telemetry=0)
    assert report.error is None, report.error
    assert report.onboarded and not report.straight_to_terminus
    assert [c for c, _ in transport.calls] == ["find_owner", "hello", "prove", "done"]
    await assert_onboarded_files(fleet, dev)
    assert bytes.fromhex((d / "channel.secret").read_text()) == \
        await fleet.vault.channel_secret(dev.serial)
    assert (await fleet.store.inventory.get(dev.serial)).state is InventoryState.ONBOARDED


# --- a lying gateway -------------------------------------------------------------------------
async def _tamper_bundle_payload(fleet, step, answer):
    """Change the terminus inside the owner-signed bundle, keep the owner's bundle signature;
    the outer Credentials are re-signed by the real owner key so only the bundle is wrong."""
    if step != "prove":
        return answer
    creds = Credentials.decode(cose.parse_sign1(answer, max_size=MAX_MESSAGE).payload)
    bundle = Bundle.decode(cose.parse_sign1(creds.bundle, max_size=MAX_MESSAGE).payload)
    evil = dataclasses.replace(bundle, terminus_host="203.0.113.66").encode()
    creds = dataclasses.replace(creds, bundle=sign1_with_payload(creds.bundle, evil))
    return await fleet.vault.sign(creds.encode())


async def _bundle_signed_by_another_key(fleet, step, answer):
    if step != "prove":
        return answer
    creds = Credentials.decode(cose.parse_sign1(answer, max_size=MAX_MESSAGE).payload)
    bundle = Bundle.decode(cose.parse_sign1(creds.bundle, max_size=MAX_MESSAGE).payload)
    evil = dataclasses.replace(bundle, terminus_host="203.0.113.66")
    owner_ca_der = await fleet.vault.owner_ca_der()
    forged = cose.sign1(evil.encode(), cose.SoftwareSigner(generate_p256()), x5chain=[owner_ca_der])
    return await fleet.vault.sign(dataclasses.replace(creds, bundle=forged).encode())


async def _challenge_signed_by_another_key(fleet, step, answer):
    """The pinned owner certificate in x5chain, but the signature is an attacker's."""
    if step != "hello":
        return answer
    signed = cose.parse_sign1(answer, max_size=MAX_MESSAGE)
    challenge = Challenge.decode(signed.payload)
    return cose.sign1(challenge.encode(), cose.SoftwareSigner(generate_p256()),
                      x5chain=signed.x5chain)


async def _tampered_credentials(fleet, step, answer):
    if step != "prove":
        return answer
    creds = Credentials.decode(cose.parse_sign1(answer, max_size=MAX_MESSAGE).payload)
    evil = dataclasses.replace(creds, ldevid=creds.ldevid[:-1] + bytes([creds.ldevid[-1] ^ 1]))
    return sign1_with_payload(answer, evil.encode())


LIES = {
    "bundle payload tampered": (_tamper_bundle_payload, "signature does not verify"),
    "bundle signed by another key": (_bundle_signed_by_another_key, "signature does not verify"),
    "challenge signed by another key": (_challenge_signed_by_another_key, "signature does not verify"),
    "credentials tampered": (_tampered_credentials, "signature does not verify"),
}


@pytest.mark.parametrize("lie", list(LIES))
async def test_lying_gateway_leaves_the_device_unonboarded(fleet, lie):
    dev = await fleet.make()
    tamper, expected = LIES[lie]

    async def hook(step, answer):
        return await tamper(fleet, step, answer)

    transport = MemoryTransport(fleet, tamper=hook)
    report = await agent_for(dev, transport, sleep=Sleeps(), max_attempts=2).run(telemetry=0)
    assert not report.onboarded
    assert report.error == expected, report.error
    assert report.attempts == 2
    assert "done" not in [c for c, _ in transport.calls]     # never reported success
    assert not load_state(dev.device_dir).onboarded
    assert not (dev.device_dir / STATE_FILE).exists()
    assert not any((dev.device_dir / f).exists() for f in CREDENTIAL_FILES)


async def test_gateway_of_another_owner_is_refused(fleet, tmp_path):
    """Someone else copied the label into their inventory and answers for the device: the
    rendezvous pinned the real owner's key, so the device refuses before sending anything."""
    dev = await fleet.make()
    other = await make_fleet(tmp_path / "other", f"sqlite:///{tmp_path}/other.db")
    try:
        other.gateway.cfg.manufacturer_cas.append(fleet.manufacturer.ca.cert)
        await other.gateway.register_label(dev.label.url, "copied label")
        transport = MemoryTransport(fleet, gateway=other.gateway)
        report = await agent_for(dev, transport, sleep=Sleeps(), max_attempts=2).run(telemetry=0)
        assert not report.onboarded
        assert report.error == "owner key is not the one the rendezvous pinned"
        assert [c for c, _ in transport.calls] == ["find_owner", "hello"] * 2   # no prove
        assert not (dev.device_dir / STATE_FILE).exists()
        assert not any((dev.device_dir / f).exists() for f in CREDENTIAL_FILES)
        assert not (dev.device_dir / "ldevid.key").exists()          # no key made for them
        assert await other.store.certs.for_device(dev.serial) == []
    finally:
        await other.store.close()
