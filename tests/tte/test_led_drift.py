"""LED decoder under camera/LED clock drift (29.97 vs 30 fps is 1e-3): seeded round trips with
drift tracking, the default decoder unchanged, and a wrong checksum still refused."""
from __future__ import annotations

import random

import pytest

from zerotouch.bench.led_bench import film, run_cell
from zerotouch.protocol.led import (UNIT_BITS, LedChecksumError, LedFrame, decode_led, encode_led,
                                    led_levels, sample_brightness)


@pytest.mark.parametrize("drift", [1e-3, -1e-3])
def test_seeded_round_trips_at_drift_1e3_with_tracking(drift):
    rng = random.Random(f"drift/{drift}")
    for _ in range(25):
        msid, devid, otp = rng.getrandbits(32), rng.getrandbits(32), rng.randbytes(8)
        y = film(rng, encode_led(msid, devid, otp), drift=drift, noise=rng.uniform(0.0, 0.1))
        assert decode_led(y, track_drift=True) == LedFrame(msid, devid, otp)


def test_bench_cell_counts_failures_and_wrong_frames():
    cell = run_cell(1e-3, 0.05, 10, seed=3, track_drift=True)
    assert (cell.trials, cell.failures, cell.wrong) == (10, 0, 0)


@pytest.mark.parametrize("drift", [1e-3, -1e-3])
def test_wrong_checksum_is_still_detected_under_drift(drift):
    rng = random.Random(int(drift * 1e6))
    frame = bytearray(encode_led(0x1234, 0xABCDEF01, bytes.fromhex("123456789abcdef0")))
    frame[12] ^= 0x10
    sig = led_levels(bytes(frame), repeats=4, idle_bits=15)
    y = sample_brightness(sig, fps=30, start=0.0, duration=4 * UNIT_BITS / 15 - 1, noise=0.05,
                          exposure=0.5, gain_drift=0.2, offset_drift=0.3, clock_error=drift, rng=rng)
    for track in (False, True):
        with pytest.raises(LedChecksumError):
            decode_led(y, track_drift=track)
