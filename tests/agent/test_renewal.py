"""Operational-certificate renewal: when a fleet renews, and a swap that never loses a working pair."""
from __future__ import annotations

import os
import random
import stat
import statistics
import time
from collections import Counter
from pathlib import Path

import pytest
from cryptography import x509

from zerotouch.agent.est_client import EstRefused, Pending
from zerotouch.agent.renewal import (LATEST, OperationalFiles, RenewalResult, is_due, renew_at,
                                     swap, validity)
from zerotouch.pki.ca import CertificateAuthority, make_root
from zerotouch.pki.keys import generate_p256, load_cert, public_key_der
from zerotouch.protocol.errors import TryLater

DAY = 86400.0
SERIAL, URN = "ZT-REN-0001", "urn:dev:zerotouch:ZT-REN-0001"


# --- timing -----------------------------------------------------------------------------------
def test_a_fleet_with_one_validity_spreads_its_renewals():
    nb, na = 1_700_000_000.0, 1_700_000_000.0 + DAY
    rng = random.Random(4242)
    times = [renew_at(nb, na, rng.random) for _ in range(1000)]
    fractions = [(t - nb) / DAY for t in times]
    assert max(fractions) <= LATEST
    assert all(2 / 3 - 0.05 <= f <= 2 / 3 + 0.05 for f in fractions)   # ±5 % of the lifetime
    assert abs(statistics.fmean(fractions) - 2 / 3) < 0.005             # mean near two thirds
    assert max(fractions) - min(fractions) > 0.095                      # the whole window is used
    assert len(set(times)) == 1000
    # no thundering herd: the busiest minute sees a few devices, not the fleet (~7 on average)
    assert max(Counter(int(t // 60) for t in times).values()) <= 25


def test_renew_at_bounds():
    nb, na = 0.0, 1000.0
    assert renew_at(nb, na, lambda: 0.5) == pytest.approx(2000 / 3)
    assert renew_at(nb, na, lambda: 0.0) == pytest.approx(1000 * (2 / 3 - 0.05))
    assert renew_at(nb, na, lambda: 0.999999, jitter=0.5) == pytest.approx(900)  # never after 90 %
    assert renew_at(nb, na, lambda: 0.5, now=950) == 950                          # never in the past
    assert renew_at(nb, na, lambda: 0.5, now=10) == pytest.approx(2000 / 3)


def _cert(ca, days: float = 1.0, key=None):
    key = key or generate_p256()
    return ca.issue_device(key.public_key(), serial=SERIAL, urn=URN, days=days), key


def test_is_due():
    ca = _ca()
    cert, _ = _cert(ca)
    nb, na = validity(cert)
    planned = renew_at(nb, na, lambda: 0.9)
    assert is_due(None, nb)                                   # nothing yet: enroll
    assert not is_due(cert, planned - 1, planned)
    assert is_due(cert, planned, planned)
    assert is_due(cert, nb + 0.91 * (na - nb), na + 10_000)   # a plan from another cert is ignored
    assert not is_due(cert, nb + 0.5 * (na - nb), None)       # no plan: two thirds
    assert is_due(cert, nb + 0.7 * (na - nb), None)


# --- the swap ---------------------------------------------------------------------------------
def _ca(name: str = "owner CA") -> CertificateAuthority:
    key = generate_p256()
    return CertificateAuthority(key, make_root(key, name))


class PowerLoss(BaseException):
    """Nothing after this runs."""


class Est:
    """Enrollment stand-in: issues from `ca`; `plan` lists what each call does instead."""

    def __init__(self, ca: CertificateAuthority, plan=(), days: float = 1):
        self.ca, self.plan, self.csrs, self.days = ca, list(plan), [], days

    async def __call__(self, csr_der: bytes) -> x509.Certificate:
        self.csrs.append(csr_der)
        step = self.plan.pop(0) if self.plan else None
        if isinstance(step, BaseException):
            raise step
        ca = step if isinstance(step, CertificateAuthority) else self.ca
        return ca.issue_device(x509.load_der_x509_csr(csr_der).public_key(), serial=SERIAL,
                               urn=URN, days=self.days)


class Terminus:
    """Connection test stand-in: takes the pairs whose certificate is in `accepts` (None: any)."""

    def __init__(self, accepts=None, crash: bool = False):
        self.accepts, self.crash, self.tried = accepts, crash, []

    async def __call__(self, cert_file: Path, key_file: Path) -> None:
        cert = load_cert(cert_file)
        self.tried.append(cert)
        if self.crash:
            raise PowerLoss("power lost while testing the new certificate")
        if self.accepts is not None and cert.serial_number not in self.accepts:
            raise ConnectionRefusedError("terminus closed the connection before CONNACK")


async def _run(files, est, terminus, ca, now=None) -> RenewalResult:
    return await swap(files, enroll=est, check=terminus, owner_ca=ca.cert, serial=SERIAL, urn=URN,
                      now=now or time.time())


def _snapshot(files: OperationalFiles) -> tuple[bytes, bytes]:
    return files.cert_file.read_bytes(), files.key_file.read_bytes()


@pytest.fixture
async def installed(tmp_path):
    """A device dir with a working operational pair (first enrollment, test passed)."""
    ca = _ca()
    files = OperationalFiles(tmp_path)
    result = await _run(files, Est(ca), Terminus(), ca)
    assert result.outcome == "promoted" and result.tested
    return ca, files


async def test_first_enrollment_promotes_a_0600_key_and_leaves_nothing_pending(installed):
    ca, files = installed
    cert = files.current()
    cert.verify_directly_issued_by(ca.cert)
    assert stat.S_IMODE(os.stat(files.key_file).st_mode) == 0o600
    assert not any(p.exists() for p in (files.new_cert_file, files.new_key_file, files.new_csr_file))
    assert not files.prev_cert_file.exists()


async def test_a_working_new_pair_is_promoted_and_the_old_kept_as_prev(installed):
    ca, files = installed
    old = _snapshot(files)
    terminus = Terminus()
    result = await _run(files, Est(ca), terminus, ca)
    assert result.outcome == "promoted" and result.tested
    assert [c.serial_number for c in terminus.tried] == [result.cert.serial_number]  # tested first
    assert files.current().serial_number == result.cert.serial_number
    assert (files.prev_cert_file.read_bytes(), files.prev_key_file.read_bytes()) == old
    assert stat.S_IMODE(os.stat(files.prev_key_file).st_mode) == 0o600


async def test_a_new_pair_the_terminus_refuses_is_dropped_and_the_old_kept(installed):
    ca, files = installed
    old = _snapshot(files)
    old_serial = files.current().serial_number
    result = await _run(files, Est(ca), Terminus(accepts={old_serial}), ca)
    assert result.outcome == "kept_old" and "refused" in result.error
    assert _snapshot(files) == old
    assert files.staged() is None and not files.new_key_file.exists()
    # next round: a fresh enrollment that works is promoted
    est = Est(ca)
    assert (await _run(files, est, Terminus(), ca)).outcome == "promoted"
    assert len(est.csrs) == 1 and files.current().serial_number != old_serial


async def test_when_nothing_works_the_new_pair_is_kept_and_retested_without_enrolling(installed):
    ca, files = installed
    old = _snapshot(files)
    result = await _run(files, Est(ca), Terminus(accepts=set()), ca)   # terminus away
    assert result.outcome == "kept_old" and "cannot test" in result.error
    assert _snapshot(files) == old and files.staged() is not None
    staged_serial = files.staged().serial_number
    est = Est(ca)
    result = await _run(files, est, Terminus(), ca)                    # terminus back
    assert result.outcome == "promoted" and est.csrs == []
    assert files.current().serial_number == staged_serial


async def test_crash_between_enroll_and_promote_leaves_the_old_pair_working(installed):
    ca, files = installed
    old = _snapshot(files)
    with pytest.raises(PowerLoss):
        await _run(files, Est(ca), Terminus(crash=True), ca)
    # after the reboot: the old pair, whole and matching, is what the device uses
    assert _snapshot(files) == old and files.current() is not None
    staged = files.staged()
    assert staged is not None
    est = Est(ca)
    result = await _run(files, est, Terminus(), ca)
    assert result.outcome == "promoted" and est.csrs == []   # the staged pair, tested this time
    assert files.current().serial_number == staged.serial_number
    assert (files.prev_cert_file.read_bytes(), files.prev_key_file.read_bytes()) == old


async def test_crash_inside_promote_is_finished_by_recover(installed, monkeypatch):
    ca, files = installed
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst) == files.key_file:
            raise PowerLoss("power lost between renaming the certificate and the key")
        return real_replace(src, dst, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(PowerLoss):
            await _run(files, Est(ca), Terminus(), ca)
    assert files.current() is None                 # certificate new, key old: not usable as is
    files.recover()
    cert = files.current()
    assert cert is not None and cert.serial_number != load_cert(files.prev_cert_file).serial_number
    assert not files.new_key_file.exists() and not files.new_csr_file.exists()


async def test_pending_keeps_key_and_csr_and_sends_the_same_csr_again(tmp_path):
    ca = _ca()
    files = OperationalFiles(tmp_path)
    est = Est(ca, plan=[Pending("waiting for approval", retry_after=30), TryLater("busy")])
    result = await _run(files, est, Terminus(), ca)
    assert (result.outcome, result.retry_after) == ("pending", 30)
    assert files.new_key_file.exists() and files.current() is None
    assert (await _run(files, est, Terminus(), ca)).outcome == "failed"   # transient: keep CSR
    result = await _run(OperationalFiles(tmp_path), est, Terminus(), ca)  # as after a reboot
    assert result.outcome == "promoted"
    assert est.csrs[0] == est.csrs[1] == est.csrs[2]
    assert public_key_der(files.current().public_key()) == \
        public_key_der(x509.load_der_x509_csr(est.csrs[0]).public_key())


async def test_a_refused_csr_is_dropped_and_the_next_round_uses_a_new_key(tmp_path):
    ca = _ca()
    files = OperationalFiles(tmp_path)
    est = Est(ca, plan=[EstRefused("key type refused (HTTP 400)", status=400)])
    result = await _run(files, est, Terminus(), ca)
    assert result.outcome == "failed" and "key type refused" in result.error
    assert not files.new_key_file.exists()
    assert (await _run(files, est, Terminus(), ca)).outcome == "promoted"
    assert est.csrs[0] != est.csrs[1]


async def test_a_certificate_from_another_ca_is_never_staged(installed):
    ca, files = installed
    old = _snapshot(files)
    terminus = Terminus()
    result = await _run(files, Est(ca, plan=[_ca("impostor")]), terminus, ca)
    assert result.outcome == "failed" and "owner CA" in result.error
    assert terminus.tried == [] and _snapshot(files) == old and files.staged() is None


async def test_an_expired_old_pair_gives_way_to_an_untested_valid_one(tmp_path):
    ca = _ca()
    files = OperationalFiles(tmp_path)
    assert (await _run(files, Est(ca, days=60 / DAY), Terminus(), ca)).outcome == "promoted"
    old_serial = files.current().serial_number
    expiry = validity(files.current())[1]
    # the terminus refuses every pair (for the old one, because it expired)
    result = await _run(files, Est(ca), Terminus(accepts=set()), ca, now=expiry - 10)
    assert result.outcome == "kept_old"                 # the old one is still valid: keep it
    result = await _run(files, Est(ca), Terminus(accepts=set()), ca, now=expiry + 1)
    assert result.outcome == "promoted" and not result.tested and result.error
    assert files.current().serial_number != old_serial
