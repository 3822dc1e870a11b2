"""The agent with short-lived operational certificates: enrolled after onboarding with the
LDevID, used for the terminus, renewed when due with the current pair, and never lost to a
crash. EST is an in-memory stand-in issuing from the fleet's owner CA on the agent's clock;
the last test uses a real Mosquitto terminus for the connection test."""
from __future__ import annotations

import datetime as dt
import json
import random
import socket
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from zerotouch.agent.backoff import Backoff
from zerotouch.agent.est_client import EstRefused, Pending
from zerotouch.agent.renewal import OperationalFiles, validity
from zerotouch.agent.runtime import Agent
from zerotouch.agent.state import STATE_FILE, load_state
from zerotouch.pki.ca import device_identity
from zerotouch.pki.keys import load_cert
from zerotouch.services.terminus import Terminus, find_mosquitto, write_terminus_config
from zerotouch.services.vault import load_owner_ca

from support import need

DAY = 86400.0


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Transport:
    """Onboarding straight into the fleet's server cores."""

    def __init__(self, fleet):
        self.fleet = fleet

    async def find_owner(self, url, body):
        return await self.fleet.rendezvous.find_owner(body)

    async def gateway(self, url, step, body):
        return await getattr(self.fleet.gateway, step)(body)


class Est:
    """EST stand-in: `calls` records (op, label, serial number of the TLS client cert)."""

    def __init__(self, ca, clock, *, lifetime: float = DAY, plan=()):
        self.ca, self.clock, self.lifetime, self.plan = ca, clock, lifetime, list(plan)
        self.calls: list[tuple[str, str | None, int]] = []
        self.times: list[float] = []

    def __call__(self, base_url, *, ca_pem, client_cert_file, client_key_file, **kw):
        est, client_cert = self, load_cert(client_cert_file)

        class Client:
            bytes_sent = bytes_received = 100

            async def simpleenroll(self, csr, label=None):
                return est.enroll("simpleenroll", label, client_cert, csr)

            async def simplereenroll(self, csr, label=None):
                return est.enroll("simplereenroll", label, client_cert, csr)

            async def close(self):
                pass
        return Client()

    def enroll(self, op, label, client_cert, csr_der):
        self.calls.append((op, label, client_cert.serial_number))
        self.times.append(self.clock())
        if self.plan:
            raise self.plan.pop(0)
        serial, urn = device_identity(client_cert)
        csr = x509.load_der_x509_csr(csr_der)
        san = x509.SubjectAlternativeName
        if op == "simplereenroll" and (
                csr.subject != client_cert.subject or csr.extensions.get_extension_for_class(san)
                != client_cert.extensions.get_extension_for_class(san)):   # RFC 7030 §4.2.2
            raise EstRefused("simplereenroll: CSR subject must equal the renewed certificate's",
                             status=400)
        now = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)
        # names from "the owner's records", in a form the device cannot guess (an O, reordered)
        name = x509.Name([x509.NameAttribute(x509.NameOID.SERIAL_NUMBER, serial),
                          x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "owner org"),
                          x509.NameAttribute(x509.NameOID.COMMON_NAME, serial)])
        return (x509.CertificateBuilder().subject_name(name).issuer_name(self.ca.cert.subject)
                .public_key(csr.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + dt.timedelta(seconds=self.lifetime))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(urn)]),
                               critical=False)
                .sign(self.ca.key, hashes.SHA256()))


class Check:
    def __init__(self, ok: bool = True):
        self.ok, self.tried = ok, []

    async def __call__(self, cert_file, key_file):
        self.tried.append(load_cert(cert_file).serial_number)
        if not self.ok:
            raise ConnectionRefusedError("terminus refused")


class Sleeps:
    """Fake sleep that moves the clock."""

    def __init__(self, clock):
        self.clock, self.delays = clock, []

    async def __call__(self, delay):
        self.delays.append(delay)
        self.clock.now += delay


def agent(dev, fleet, clock, est, check=None, **kw) -> Agent:
    kw.setdefault("backoff", Backoff(rand=random.Random(1)))
    return Agent(dev.device_dir, transport=Transport(fleet), clock=clock, est_factory=est,
                 terminus_check=check or Check(), renewal_rand=random.Random(7), **kw)


@pytest.fixture
async def env(fleet):
    clock = Clock()
    return fleet, clock, Est(load_owner_ca(fleet.tmp / "vault"), clock)


async def onboarded_with_operational(env, **kw):
    fleet, clock, est = env
    fleet.gateway.cfg.settings = {**fleet.gateway.cfg.settings, "est_operational": True}
    dev = await fleet.make()
    report = await agent(dev, fleet, clock, est, **kw).run(telemetry=0)
    assert report.error is None and report.operational == "promoted", report
    return dev


# --- on and off -------------------------------------------------------------------------------
async def test_off_by_default_nothing_changes(env):
    fleet, clock, est = env
    dev = await fleet.make()
    report = await agent(dev, fleet, clock, est).run(telemetry=0)
    assert report.error is None and report.onboarded and report.operational is None
    assert est.calls == [] and not list(dev.device_dir.glob("operational*"))
    state = load_state(dev.device_dir)
    assert not state.operational and state.renew_at is None
    a = agent(dev, fleet, clock, est)
    assert a.terminus_credentials(state)[0] == dev.device_dir / "ldevid.pem"
    assert await a.renew_if_due() is None


async def test_bundle_setting_enrolls_with_the_ldevid_and_the_terminus_uses_it(env):
    fleet, clock, est = env
    check = Check()
    dev = await onboarded_with_operational(env, check=check)
    d = dev.device_dir
    ldevid = load_cert(d / "ldevid.pem")
    assert est.calls == [("simpleenroll", "operational", ldevid.serial_number)]
    op = OperationalFiles(d).current()
    op.verify_directly_issued_by(load_cert(d / "owner-ca.pem"))
    assert check.tried == [op.serial_number]
    state = json.loads((d / STATE_FILE).read_text())
    nb, na = validity(op)
    assert state["operational"] is True and state["operational_not_after"] == na
    assert nb + (2 / 3 - 0.05) * DAY <= state["renew_at"] <= nb + (2 / 3 + 0.05) * DAY
    a = agent(dev, fleet, clock, est)
    assert a.terminus_credentials(load_state(d)) == (d / "operational.pem", d / "operational.key")


async def test_constructor_flag_turns_it_on_without_the_bundle(env):
    fleet, clock, est = env
    dev = await fleet.make()
    report = await agent(dev, fleet, clock, est, operational=True).run(telemetry=0)
    assert report.operational == "promoted" and len(est.calls) == 1
    # recorded at onboarding: a restart without the flag keeps it on; operational=False overrides
    state = load_state(dev.device_dir)
    assert state.operational
    assert agent(dev, fleet, clock, est).terminus_credentials(state)[0].name == "operational.pem"
    off = agent(dev, fleet, clock, est, operational=False)
    assert off.terminus_credentials(state)[0].name == "ldevid.pem"
    assert await off.renew_if_due() is None


async def test_old_state_files_still_load(env):
    fleet, clock, est = env
    dev = await fleet.make()
    old = {"phase": "onboarded", "gateway_url": "https://127.0.0.1:8444", "owner_fp": "00",
           "terminus_host": "127.0.0.1", "terminus_port": 8883, "topic_prefix": "devices/x",
           "onboarded_at": 1.0, "onboarding_ms": 2.0}
    (dev.device_dir / STATE_FILE).write_text(json.dumps(old))
    state = load_state(dev.device_dir)
    assert state.onboarded and not state.operational and state.renew_at is None
    report = await agent(dev, fleet, clock, est).run(telemetry=0)
    assert report.straight_to_terminus and report.error is None and est.calls == []
    assert json.loads((dev.device_dir / STATE_FILE).read_text()) == old   # not rewritten


# --- renewal ----------------------------------------------------------------------------------
async def test_renews_when_due_with_the_current_certificate(env):
    fleet, clock, est = env
    dev = await onboarded_with_operational(env)
    d = dev.device_dir
    first = OperationalFiles(d).current()
    planned = load_state(d).renew_at
    a = agent(dev, fleet, clock, est)
    clock.now = planned - 60
    assert (await a.renew_if_due()).outcome == "not_due" and len(est.calls) == 1
    clock.now = planned + 1
    result = await a.renew_if_due()
    assert result.outcome == "promoted" and result.tested
    assert est.calls[1] == ("simplereenroll", "operational", first.serial_number)
    assert load_cert(d / "operational.prev.pem").serial_number == first.serial_number
    state = load_state(d)
    assert state.operational_renewed_at == clock.now
    assert state.renew_at > planned + 0.6 * DAY and result.next_at == state.renew_at


async def test_an_expired_certificate_is_replaced_through_the_ldevid(env):
    fleet, clock, est = env
    dev = await onboarded_with_operational(env)
    clock.now = validity(OperationalFiles(dev.device_dir).current())[1] + 3600   # device was off
    a = agent(dev, fleet, clock, est)
    assert a.terminus_credentials(load_state(dev.device_dir))[0].name == "ldevid.pem"
    assert (await a.renew_if_due()).outcome == "promoted"
    assert est.calls[-1] == ("simpleenroll", "operational",
                             load_cert(dev.device_dir / "ldevid.pem").serial_number)


async def test_maintain_sleeps_until_due_and_honours_retry_after(env):
    fleet, clock, est = env
    dev = await onboarded_with_operational(env)
    planned = load_state(dev.device_dir).renew_at
    est.plan = [Pending("waiting for approval", retry_after=600)]
    sleeps = Sleeps(clock)
    a = agent(dev, fleet, clock, est, sleep=sleeps)
    results = await a.maintain(rounds=30)
    assert [r.outcome for r in results] == ["pending", "promoted"]
    assert [c[0] for c in est.calls] == ["simpleenroll", "simplereenroll", "simplereenroll"]
    # asleep (waking at least hourly) until the plan, then Retry-After (+ at most 20 %)
    assert all(0 <= s <= 3600 for s in sleeps.delays)
    assert planned <= est.times[1] < planned + 1
    assert 600 <= est.times[2] - est.times[1] <= 720
    assert load_state(dev.device_dir).renew_at > planned + 0.6 * DAY


async def test_crash_between_enroll_and_promote_keeps_the_old_pair(env):
    fleet, clock, est = env
    dev = await onboarded_with_operational(env)
    d = dev.device_dir
    before = (d / "operational.pem").read_bytes(), (d / "operational.key").read_bytes()
    clock.now = load_state(d).renew_at + 1

    class PowerLoss(BaseException):
        pass

    async def crash(cert_file, key_file):
        raise PowerLoss()

    with pytest.raises(PowerLoss):
        await agent(dev, fleet, clock, est, check=crash).renew_if_due()
    # reboot: the old pair is whole and is what the terminus gets
    a = agent(dev, fleet, clock, est)
    assert ((d / "operational.pem").read_bytes(), (d / "operational.key").read_bytes()) == before
    assert a.terminus_credentials(load_state(d))[0].name == "operational.pem"
    calls = len(est.calls)
    assert (await a.renew_if_due()).outcome == "promoted" and len(est.calls) == calls


# --- a real terminus --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_operational_certificate_works_at_a_real_terminus(env, tmp_path):
    if find_mosquitto() is None:
        need("Mosquitto", "apt-get install mosquitto")
    fleet, clock, est = env
    files = write_terminus_config(tmp_path / "terminus", ca=load_owner_ca(fleet.tmp / "vault"),
                                  port=_free_port())
    fleet.gateway.cfg.terminus_port = files.port
    fleet.gateway.cfg.settings = {**fleet.gateway.cfg.settings, "est_operational": True}
    dev = await fleet.make()
    d = dev.device_dir
    async with Terminus(files):
        a = Agent(d, transport=Transport(fleet), est_factory=est)   # the real connection test
        report = await a.run(telemetry=2)
        assert report.error is None, report.error
        assert report.operational == "promoted" and a.renewals[-1].tested
        assert report.telemetry_sent == 2
    # terminus away: a forced renewal keeps the old pair and the new one for a later test
    before = (d / "operational.pem").read_bytes()
    result = await Agent(d, transport=Transport(fleet), est_factory=est).renew_if_due(force=True)
    assert result.outcome == "kept_old" and "cannot test" in result.error
    assert (d / "operational.pem").read_bytes() == before
    assert OperationalFiles(d).staged() is not None
