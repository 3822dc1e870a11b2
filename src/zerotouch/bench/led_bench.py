"""`zerotouch bench led`: LED decoder failure rate per camera/LED clock drift and noise level.

Each trial blinks a random frame (random MotherShip ID, Device ID, OTP) repeated back to back,
films it with the simulated phone camera of `protocol.led` (30 fps, random phase and exposure,
auto-exposure gain drift +-20 %, offset drift +-0.3, Gaussian noise, start anywhere) for two
repetitions plus a second, and decodes it. A trial fails when the decoder raises (`failures`;
of those, `unsure` are the decoder's "not sure" answers, LedUncertainError: a checksum-valid frame
that did not beat every other one by the required likelihood margin) or returns another frame
(`wrong`, counted separately: a wrong frame whose checksum happens to verify). Seeded: the same
arguments give the same figures.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from ..protocol.led import (BIT_RATE, FPS, UNIT_BITS, LedDecodeError, LedFrame,
                            LedUncertainError, decode_led, encode_led, led_levels,
                            sample_brightness)

DEFAULT_DRIFTS = (-2e-3, -1e-3, 0.0, 1e-3, 2e-3)
DEFAULT_NOISES = (0.0, 0.05, 0.10, 0.15)


@dataclass
class LedCell:
    drift: float
    noise: float
    trials: int
    failures: int = 0     # decode error (no frame, checksum never matched, not sure)
    unsure: int = 0       # of the failures: "not sure" (LedUncertainError)
    wrong: int = 0        # decoded a frame that is not the one sent
    seconds: float = 0.0

    @property
    def failure_rate(self) -> float:
        return (self.failures + self.wrong) / self.trials if self.trials else 0.0


@dataclass
class LedBenchResult:
    trials: int
    seed: int
    cells: list[LedCell] = field(default_factory=list)


def film(rng: random.Random, frame: bytes, *, drift: float, noise: float) -> list[float]:
    """A phone filming a repeating LED from a random moment for two repetitions + 1 s."""
    sig = led_levels(frame, repeats=4, idle_bits=15)
    duration = 2 * UNIT_BITS / BIT_RATE + 1
    start = rng.uniform(0, sig.duration / (1 + max(drift, 0.0)) - duration - 0.5)
    return sample_brightness(sig, fps=FPS, start=start, duration=duration, noise=noise,
                             exposure=rng.uniform(0.1, 1.0), gain_drift=0.2, offset_drift=0.3,
                             clock_error=drift, rng=rng)


def run_cell(drift: float, noise: float, trials: int, seed: int, *,
             track_drift: bool = False) -> LedCell:
    rng = random.Random(f"led-bench/{seed}/{drift!r}/{noise!r}")
    cell = LedCell(drift=drift, noise=noise, trials=trials)
    t0 = time.perf_counter()
    for _ in range(trials):
        msid, devid, otp = rng.getrandbits(32), rng.getrandbits(32), rng.randbytes(8)
        y = film(rng, encode_led(msid, devid, otp), drift=drift, noise=noise)
        try:
            got = decode_led(y, track_drift=track_drift)
        except LedDecodeError as err:
            cell.failures += 1
            cell.unsure += isinstance(err, LedUncertainError)
            continue
        if got != LedFrame(msid, devid, otp):
            cell.wrong += 1
    cell.seconds = time.perf_counter() - t0
    return cell


def run_led_bench(*, trials: int = 400, drifts=DEFAULT_DRIFTS, noises=DEFAULT_NOISES,
                  seed: int = 1, track_drift: bool = False, on_cell=None) -> LedBenchResult:
    result = LedBenchResult(trials=trials, seed=seed)
    for drift in drifts:
        for noise in noises:
            cell = run_cell(drift, noise, trials, seed, track_drift=track_drift)
            result.cells.append(cell)
            if on_cell:
                on_cell(cell)
    return result


def format_cell(cell: LedCell) -> str:
    return (f"{cell.drift:+9.1e} {cell.noise:6.2f} {cell.trials:7d} {cell.failures:9d} "
            f"{cell.unsure:7d} {cell.wrong:6d} {100 * cell.failure_rate:8.2f}% "
            f"{1000 * cell.seconds / max(cell.trials, 1):9.1f}")


HEADER = f"{'drift':>9} {'noise':>6} {'trials':>7} {'failures':>9} {'unsure':>7} {'wrong':>6} {'rate':>9} {'ms/trial':>9}"
