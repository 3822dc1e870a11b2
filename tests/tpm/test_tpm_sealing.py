"""Secrets only one TPM can open, against swtpm: the server seals with pure Python
(`attestation.duplicate`), the device imports, loads and unseals under its EK."""
from __future__ import annotations

import time

import pytest
from cryptography import x509

from zerotouch.attestation.duplicate import SealedForTpm, seal_to_tpm

try:  # without tpm2-pytss the swtpm fixtures skip (or fail in CI) with an install hint
    from zerotouch.identity.tpm import Tpm
    from zerotouch.identity.tpm.sealing import UnsealError, unseal_imported
except ImportError:  # pragma: no cover
    Tpm = None
    UnsealError = Exception


def _handles(tpm) -> tuple[list[int], list[int]]:
    """Transient objects and sessions in the TPM (the EK may be transient or persistent,
    depending on core.py and the TPM's provisioning: compare with a baseline)."""
    tpm.ek()
    return tpm.transient_handles(), tpm.session_handles()


def _ek_from_certificate(tpm) -> object:
    """What the server has: the EK public key from the EK certificate."""
    return x509.load_der_x509_certificate(tpm.ek_certificate()).public_key()


@pytest.mark.parametrize("ek_type", ["EK-RSA2048", "EK-ECC256"])
def test_sealed_secret_opens_on_its_tpm(swtpm, ek_type):
    with Tpm(swtpm.tcti, ek_type=ek_type) as tpm:
        before = _handles(tpm)
        ek = _ek_from_certificate(tpm) if ek_type == "EK-RSA2048" else tpm.ek_public_key()
        for data in (b"channel-secret-0123456789abcdef", b"\x00", b"\xff" * 128, b""):
            sealed = SealedForTpm.from_bytes(seal_to_tpm(ek, data).to_bytes())
            assert unseal_imported(tpm, sealed) == data
        # the EK's marshalled TPMT_PUBLIC works too (its own nameAlg and AES size)
        assert unseal_imported(tpm, seal_to_tpm(tpm.ek_public(), b"from-tpmt")) == b"from-tpmt"
        assert _handles(tpm) == before


def test_secret_sealed_for_one_tpm_does_not_open_on_another(swtpm_factory):
    """The attack: a blob sealed for TPM A is copied to a device with TPM B."""
    a, b = swtpm_factory(), swtpm_factory()
    with Tpm(a.tcti) as ta, Tpm(b.tcti) as tb:
        before_b = _handles(tb)
        sealed = seal_to_tpm(_ek_from_certificate(ta), b"only-for-tpm-a")
        with pytest.raises(UnsealError, match="another TPM"):
            unseal_imported(tb, sealed)
        assert _handles(tb) == before_b
        assert unseal_imported(ta, sealed) == b"only-for-tpm-a"


def _flip(data: bytes, i: int) -> bytes:
    bad = bytearray(data)
    bad[i] ^= 0x01
    return bytes(bad)


def test_tampered_blobs_are_refused(swtpm):
    with Tpm(swtpm.tcti) as tpm:
        before = _handles(tpm)
        ek = _ek_from_certificate(tpm)
        sealed = seal_to_tpm(ek, b"do-not-touch")
        d, s, p = sealed.duplicate, sealed.seed, sealed.public
        tampered = [
            SealedForTpm(p, _flip(d, 5), s),            # the outer HMAC
            SealedForTpm(p, _flip(d, len(d) - 1), s),   # the encrypted sensitive area
            SealedForTpm(p, d, _flip(s, 100)),          # the encrypted seed
            SealedForTpm(_flip(p, len(p) - 1), d, s),   # unique digest: the name changes
            SealedForTpm(p[:4] + b"\x00\x00\x04\x40" + p[8:], d, s),  # +noDA: the name changes
            SealedForTpm(p, seal_to_tpm(ek, b"other").duplicate, s),  # spliced halves
        ]
        for bad in tampered:
            with pytest.raises(UnsealError):
                unseal_imported(tpm, bad)
            assert _handles(tpm) == before
        with pytest.raises(UnsealError, match="malformed|trailing"):
            unseal_imported(tpm, SealedForTpm(p + b"\x00", d, s))
        assert unseal_imported(tpm, sealed) == b"do-not-touch"


def test_fifty_rounds_leak_no_handles(swtpm):
    with Tpm(swtpm.tcti) as tpm:
        before = _handles(tpm)
        assert before[1] == []
        ek = _ek_from_certificate(tpm)
        seal_ms = []
        for i in range(50):
            data = f"secret-{i}".encode() * 3
            t0 = time.perf_counter()
            sealed = seal_to_tpm(ek, data)
            seal_ms.append((time.perf_counter() - t0) * 1000)
            assert unseal_imported(tpm, sealed) == data
            if i % 10 == 0:  # failures in between must not leak either
                with pytest.raises(UnsealError):
                    unseal_imported(tpm, SealedForTpm(sealed.public, _flip(sealed.duplicate, 3),
                                                      sealed.seed))
            assert _handles(tpm) == before
        ms = sorted(tpm.timings["unseal_imported"])
        print(f"\nimport+load+unseal on swtpm: median {ms[len(ms) // 2]:.1f} ms, "
              f"seal_to_tpm in Python: median {sorted(seal_ms)[25]:.2f} ms")
    with Tpm(swtpm.tcti) as tpm:  # a new connection finds nothing left behind
        assert tpm.transient_handles() == [] and tpm.session_handles() == []


def test_command_count(swtpm):
    """The commands one secret costs, counted by a TCTI that forwards to swtpm."""
    import struct as _struct

    from tpm2_pytss.TCTI import PyTCTI
    from tpm2_pytss.TCTILdr import TCTILdr

    class CountingTcti(PyTCTI):
        def __init__(self, conf: str):
            super().__init__()
            self.inner, self.codes = TCTILdr("swtpm", conf), []

        def do_transmit(self, command: bytes) -> None:
            self.codes.append(_struct.unpack(">I", command[6:10])[0])
            self.inner.transmit(command)

        def do_receive(self, timeout: int) -> bytes:
            return self.inner.receive(timeout)

    tcti = CountingTcti(swtpm.tcti.split(":", 1)[1])
    with Tpm(tcti) as tpm:
        ek = _ek_from_certificate(tpm)
        unseal_imported(tpm, seal_to_tpm(ek, b"warm-up"))  # first Unseal may see TPM_RC_RETRY
        tcti.codes.clear()
        assert unseal_imported(tpm, seal_to_tpm(ek, b"counted")) == b"counted"
        # StartAuthSession, PolicySecret, Import, PolicySecret, Load, Flush, Unseal, Flush
        assert tcti.codes == [0x176, 0x151, 0x156, 0x151, 0x157, 0x165, 0x15E, 0x165]
