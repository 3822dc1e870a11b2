"""PCR quotes against swtpm: the device quotes with its AK (`identity.tpm.quote`), the server
verifies in pure Python (`attestation.quote`) and checks the values against a PCR policy."""
from __future__ import annotations

import os
import struct

import pytest

from zerotouch.attestation.quote import (DEFAULT_PCRS, PcrPolicy, QuoteError, parse_attest,
                                         pcr_digest, verify_quote)

try:  # without tpm2-pytss the swtpm fixtures skip (or fail in CI) with an install hint
    from zerotouch.identity.tpm import Tpm
    from zerotouch.identity.tpm.quote import extend_pcr, quote, read_pcrs
except ImportError:  # pragma: no cover
    Tpm = None


class Device:
    """A TPM with a loaded AK, as the agent holds it."""

    def __init__(self, tcti: str):
        self.tpm = Tpm(tcti)
        self.ak = self.tpm.create_ak()
        self.handle = self.tpm.load_ak(self.ak)

    def attest(self, nonce: bytes, pcrs=DEFAULT_PCRS):
        attest, sig = quote(self.tpm, self.handle, nonce, pcrs)
        return attest, sig, read_pcrs(self.tpm, pcrs)


@pytest.fixture
def device(swtpm):
    d = Device(swtpm.tcti)
    yield d
    d.tpm.close()


def test_fresh_quote_verifies_and_captured_policy_accepts(device):
    nonce = os.urandom(32)
    attest, sig, values = device.attest(nonce)
    q = verify_quote(device.ak.public, attest, sig, nonce=nonce, pcr_values=values)
    assert q.nonce == nonce and sorted(q.pcr_values) == list(DEFAULT_PCRS)
    assert q.pcr_digest == pcr_digest(values) and q.safe
    policy = PcrPolicy.from_json(PcrPolicy.capture("gw-v1", values).to_json())
    assert policy.violations(values) == []
    # the next boot-time quote of the same TPM still complies
    nonce2 = os.urandom(32)
    attest2, sig2, values2 = device.attest(nonce2)
    assert policy.violations(verify_quote(device.ak.public, attest2, sig2, nonce=nonce2,
                                          pcr_values=values2).pcr_values) == []


def test_replayed_quote_is_refused(device):
    old = os.urandom(32)
    attest, sig, values = device.attest(old)
    with pytest.raises(QuoteError, match="replay"):
        verify_quote(device.ak.public, attest, sig, nonce=os.urandom(32), pcr_values=values)


def test_changed_pcr_passes_verification_but_violates_policy(device):
    nonce = os.urandom(32)
    _, _, good = device.attest(nonce)
    policy = PcrPolicy.capture("gw-v1", good)
    extend_pcr(device.tpm, 7, b"unsigned boot loader")  # Secure Boot state changed
    nonce = os.urandom(32)
    attest, sig, values = device.attest(nonce)
    assert values[7] != good[7] and all(values[i] == good[i] for i in range(7))
    q = verify_quote(device.ak.public, attest, sig, nonce=nonce, pcr_values=values)
    problems = policy.violations(q.pcr_values)
    assert len(problems) == 1 and problems[0].startswith("PCR 7 is ")
    assert "'gw-v1' allows" in problems[0]


def test_quote_signed_by_another_tpms_ak_is_refused(swtpm_factory, device):
    other = Device(swtpm_factory().tcti)
    try:
        nonce = os.urandom(32)
        attest, sig, values = other.attest(nonce)
        with pytest.raises(QuoteError, match="signature"):
            verify_quote(device.ak.public, attest, sig, nonce=nonce, pcr_values=values)
        # and the other TPM's signature over this TPM's attest does not fit either
        attest_a, _, values_a = device.attest(nonce)
        with pytest.raises(QuoteError, match="signature"):
            verify_quote(device.ak.public, attest_a, sig, nonce=nonce, pcr_values=values_a)
    finally:
        other.tpm.close()


def test_pcr_values_that_do_not_match_the_digest_are_refused(device):
    nonce = os.urandom(32)
    attest, sig, values = device.attest(nonce)
    lied = dict(values)
    lied[0] = b"\x11" * 32  # the device reports a value the TPM did not quote
    with pytest.raises(QuoteError, match="pcrDigest"):
        verify_quote(device.ak.public, attest, sig, nonce=nonce, pcr_values=lied)
    fewer = {i: values[i] for i in range(7)}  # hides PCR 7
    with pytest.raises(QuoteError, match="covers PCRs"):
        verify_quote(device.ak.public, attest, sig, nonce=nonce, pcr_values=fewer)


def test_flipped_bit_in_attest_is_refused(device):
    nonce = os.urandom(32)
    attest, sig, values = device.attest(nonce)
    for i in (0, 10, len(attest) - 1):  # magic, signer name, pcrDigest
        bad = bytearray(attest)
        bad[i] ^= 0x01
        with pytest.raises(QuoteError):
            verify_quote(device.ak.public, bytes(bad), sig, nonce=nonce, pcr_values=values)
    bad_sig = bytearray(sig)
    bad_sig[-1] ^= 0x01
    with pytest.raises(QuoteError):
        verify_quote(device.ak.public, attest, bytes(bad_sig), nonce=nonce, pcr_values=values)


def test_read_pcrs_more_than_eight_and_quote_structure(device):
    """PCR_Read returns at most 8 digests a call: 24 PCRs take several calls."""
    every = list(range(24))
    values = read_pcrs(device.tpm, every)
    assert sorted(values) == every and all(len(v) == 32 for v in values.values())
    nonce = os.urandom(32)
    attest, sig, _ = device.attest(nonce, every)
    a = parse_attest(attest)
    assert a.extra_data == nonce and a.pcr_selection == ((0x000B, tuple(every)),)
    assert verify_quote(device.ak.public, attest, sig, nonce=nonce, pcr_values=values)
    before = dict(values)
    extend_pcr(device.tpm, 16, b"debug")  # PCR 16: the debug PCR, resettable
    after = read_pcrs(device.tpm, [16])
    assert after[16] != before[16]


def test_quotes_leave_no_sessions_and_timings(device):
    before = device.tpm.transient_handles()
    for _ in range(20):
        nonce = os.urandom(32)
        attest, sig, values = device.attest(nonce)
        verify_quote(device.ak.public, attest, sig, nonce=nonce, pcr_values=values)
    assert device.tpm.transient_handles() == before and device.tpm.session_handles() == []
    t = {k: sorted(v)[len(v) // 2] for k, v in device.tpm.timings.items()}
    print(f"\nquote on swtpm: median {t['quote']:.1f} ms, read 8 PCRs {t['pcr_read']:.1f} ms")
    assert struct.unpack(">I", attest[:4])[0] == 0xFF544347


def test_command_count(swtpm):
    """One TPM command per quote; PCR_Read returns 8 values per call."""
    from tpm2_pytss.TCTI import PyTCTI
    from tpm2_pytss.TCTILdr import TCTILdr

    class CountingTcti(PyTCTI):
        def __init__(self, conf: str):
            super().__init__()
            self.inner, self.codes = TCTILdr("swtpm", conf), []

        def do_transmit(self, command: bytes) -> None:
            self.codes.append(struct.unpack(">I", command[6:10])[0])
            self.inner.transmit(command)

        def do_receive(self, timeout: int) -> bytes:
            return self.inner.receive(timeout)

    tcti = CountingTcti(swtpm.tcti.split(":", 1)[1])
    d = Device.__new__(Device)
    d.tpm = Tpm(tcti)
    try:
        d.ak = d.tpm.create_ak()
        d.handle = d.tpm.load_ak(d.ak)
        # the first DA-protected use after a TPM start may get TPM_RC_RETRY, resent by ESAPI
        quote(d.tpm, d.handle, os.urandom(32), DEFAULT_PCRS)
        tcti.codes.clear()
        quote(d.tpm, d.handle, os.urandom(32), DEFAULT_PCRS)
        assert tcti.codes == [0x158]  # TPM2_Quote
        tcti.codes.clear()
        read_pcrs(d.tpm, DEFAULT_PCRS)
        assert tcti.codes == [0x17E]  # one PCR_Read for 8 PCRs
        tcti.codes.clear()
        read_pcrs(d.tpm, range(24))
        assert tcti.codes == [0x17E] * 3
    finally:
        d.tpm.close()


def test_read_pcrs_starts_over_when_a_pcr_changes_mid_read(device, monkeypatch):
    """24 PCRs take 3 PCR_Read calls; a PCR extended between two of them bumps the
    pcrUpdateCounter, and read_pcrs must not mix values from before and after."""
    ctx = device.tpm.ctx
    real_read = ctx.pcr_read
    calls = []

    def racing_read(selection, *args, **kw):
        out = real_read(selection, *args, **kw)
        calls.append(out[0])
        if len(calls) == 1:  # firmware extends PCR 0 after our first batch (PCRs 0..7)
            extend_pcr(device.tpm, 0, b"late measurement")
        return out

    before = read_pcrs(device.tpm, range(24))
    monkeypatch.setattr(ctx, "pcr_read", racing_read)
    values = read_pcrs(device.tpm, range(24))
    monkeypatch.undo()
    assert len(calls) == 2 + 3  # the first pass stops at its 2nd read, then a full re-read
    assert values == read_pcrs(device.tpm, range(24)) and values[0] != before[0]
