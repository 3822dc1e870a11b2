"""TTE §5.1 LED variant: frame, NRZI, simulated phone camera, decoder."""
from __future__ import annotations

import random

import pytest

from zerotouch.protocol.led import (PREAMBLE_BITS, UNIT_BITS, LedChecksumError, LedDecodeError,
                                    LedFrame, checksum, decode_led, encode_led, led_levels,
                                    nrzi_bits, parse_frame, sample_brightness)
from zerotouch.protocol.tte import Label

OTP = bytes.fromhex("123456789abcdef0")


def test_frame_layout_and_checksum_by_hand():
    frame = encode_led(10, 0xABCDEF01, OTP)
    # 00 01 | 00 00 00 0A | AB CD EF 01 | 12 34 56 78 9A BC DE F0 | checksum
    # sum = 0x01 + 0x0A (11) + AB+CD+EF+01 (171+205+239+1 = 616)
    #     + 12+34+56+78+9A+BC+DE+F0 (18+52+86+120+154+188+222+240 = 1080) = 1707
    # 1707 mod 256 = 171 = 0xAB; two's complement: 256 - 171 = 85 = 0x55
    assert frame == bytes.fromhex("0001" "0000000A" "ABCDEF01" "123456789ABCDEF0" "55")
    assert checksum(frame[:-1]) == 0x55
    assert sum(frame) % 256 == 0
    assert parse_frame(frame) == LedFrame(10, 0xABCDEF01, OTP)
    assert parse_frame(frame).label() == Label("https://tte-00000A.net", "abcdef01",
                                               "123456789abcdef0")


def test_encode_refuses_bad_fields():
    for args in ((-1, 0, OTP), (1 << 32, 0, OTP), (1, 1 << 32, OTP), (1, 1, OTP[:7])):
        with pytest.raises(ValueError):
            encode_led(*args)


def test_nrzi_one_toggles_zero_holds():
    assert nrzi_bits(b"\x00\x01") == [0] * 15 + [1]
    assert nrzi_bits(b"\xff") == [1, 0, 1, 0, 1, 0, 1, 0]
    assert nrzi_bits(b"\x80", level=1) == [0] + [0] * 7
    sig = led_levels(b"\x00\x01", bit_rate=15, idle_bits=3)
    assert sig.levels == tuple([0] * 3 + [1, 0] * 8 + [0] * 15 + [1])   # idle, preamble, start
    assert sig.duration == pytest.approx((3 + PREAMBLE_BITS + 16) / 15)


def _film(rng, frame, *, noise, repeats=4, start=None, duration=None):
    sig = led_levels(frame, repeats=repeats, idle_bits=15)
    if start is None:
        start = rng.uniform(0, sig.duration - 2 * UNIT_BITS / 15 - 1)
    return sample_brightness(sig, fps=30, start=start,
                             duration=duration or 2 * UNIT_BITS / 15 + 1,  # >= 1 whole frame
                             noise=noise, exposure=rng.uniform(0.1, 1.0),
                             gain_drift=0.2, offset_drift=0.3, rng=rng)


def test_clean_round_trip_from_power_on():
    rng = random.Random(1)
    frame = encode_led(10, 0xABCDEF01, OTP)
    y = _film(rng, frame, noise=0.0, repeats=1, start=0.0,
              duration=(15 + UNIT_BITS) / 15 + 0.5)
    assert decode_led(y) == LedFrame(10, 0xABCDEF01, OTP)


def test_noisy_round_trips_from_any_point_of_a_repeated_transmission():
    """Random ids, Gaussian noise up to 0.15 of the swing, random camera phase and exposure,
    auto-exposure gain (+-20 %) and offset (+-0.3) drift, filming starts anywhere."""
    rng = random.Random(2024)
    for _ in range(40):
        msid, devid, otp = rng.getrandbits(32), rng.getrandbits(32), rng.randbytes(8)
        y = _film(rng, encode_led(msid, devid, otp), noise=rng.uniform(0.0, 0.15))
        assert decode_led(y) == LedFrame(msid, devid, otp)


def test_worst_noise_round_trips():
    rng = random.Random(7)
    for _ in range(10):
        msid, devid, otp = rng.getrandbits(24), rng.getrandbits(32), rng.randbytes(8)
        assert decode_led(_film(rng, encode_led(msid, devid, otp), noise=0.15)) == \
            LedFrame(msid, devid, otp)


@pytest.mark.parametrize("bit", [10 * 8 + 3, 14 * 8, 18 * 8 + 7, 2 * 8 + 1])
def test_flipped_bit_is_a_checksum_error(bit):
    rng = random.Random(bit)
    frame = bytearray(encode_led(0x1234, 0xABCDEF01, OTP))
    frame[bit // 8] ^= 0x80 >> (bit % 8)
    with pytest.raises(LedChecksumError):
        parse_frame(bytes(frame))
    y = _film(rng, bytes(frame), noise=0.05, repeats=4, start=0.0, duration=4 * UNIT_BITS / 15)
    with pytest.raises(LedChecksumError):
        decode_led(y)


def test_pure_noise_and_flat_series_are_decode_errors():
    rng = random.Random(3)
    for _ in range(5):
        with pytest.raises(LedDecodeError) as err:
            decode_led([rng.gauss(0.5, 0.2) for _ in range(900)])
        assert not isinstance(err.value, LedChecksumError)
    with pytest.raises(LedDecodeError):
        decode_led([0.3] * 900)
    with pytest.raises(LedDecodeError):
        decode_led([])


def test_too_short_a_recording_is_a_decode_error():
    rng = random.Random(4)
    y = _film(rng, encode_led(1, 2, OTP), noise=0.02, start=3.0, duration=5.0)
    with pytest.raises(LedDecodeError):
        decode_led(y)
