"""LED based enrollment (draft §5.1): the device blinks its enrollment data, a phone films it.

Frame (19 bytes, network byte order)::

    0x0001 (16-bit start of message constant) | MotherShip ID (32) | Device ID (32) | OTP (64)
    | checksum (8): two's complement of the sum of all previous bytes, so that the sum of all
      19 bytes is 0 mod 256

Line code: NRZI, most significant bit first, a ``1`` bit toggles the LED, a ``0`` bit keeps it;
15 bit/s.

Preamble (ours, the draft defines none): every transmission of the frame is preceded by
``PREAMBLE_BITS`` = 16 ``1`` bits. In NRZI that is a 7.5 Hz square wave (16 edges in ~1.07 s)
from which a receiver learns the two brightness levels and the bit clock. The frame's own start
constant (15 ``0`` bits then a ``1``) follows: a 1 s steady level ended by an edge. Together the
32 bits ``1*16 0*15 1`` are the sync word the decoder looks for. Before the first transmission the
LED idles at level 0 (off); a device repeats ``preamble + frame`` (168 bits, 11.2 s) back to back,
so a receiver may start filming at any moment and needs at most two repetitions (~22.4 s).

`sample_brightness` simulates a phone camera filming the LED; `decode_led` recovers the frame
from such a brightness series. Pure Python (no numpy).
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

from .errors import MalformedMessage
from .tte import Label, mothership_url

START = 0x0001
FRAME_LEN = 19
FRAME_BITS = FRAME_LEN * 8
PREAMBLE_BITS = 16
BIT_RATE = 15
FPS = 30
SYNC = [1] * PREAMBLE_BITS + [0] * 15 + [1]
UNIT_BITS = PREAMBLE_BITS + FRAME_BITS


class LedDecodeError(MalformedMessage):
    """No LED frame could be found in the brightness series."""
    code = "led_no_frame"


class LedChecksumError(LedDecodeError):
    """A frame was found but its checksum does not match."""
    code = "led_checksum"


@dataclass(frozen=True)
class LedFrame:
    msid: int
    devid: int
    otp: bytes

    def label(self, domain: str = "net", *, examples: bool = False) -> Label:
        """The equivalent QR label (MotherShip host per §3.4)."""
        return Label(rendezvous=mothership_url(self.msid, domain, examples=examples),
                     devid=f"{self.devid:08x}", otp=self.otp.hex())


def checksum(data: bytes) -> int:
    """8-bit two's complement checksum: (-sum(data)) mod 256."""
    return -sum(data) & 0xFF


def encode_led(msid: int, devid: int, otp: bytes) -> bytes:
    for name, v in (("msid", msid), ("devid", devid)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFFFFFF:
            raise ValueError(f"{name} must be a 32-bit unsigned integer")
    if not isinstance(otp, (bytes, bytearray)) or len(otp) != 8:
        raise ValueError("otp must be 8 bytes")
    body = START.to_bytes(2, "big") + msid.to_bytes(4, "big") + devid.to_bytes(4, "big") + bytes(otp)
    return body + bytes([checksum(body)])


def parse_frame(frame: bytes) -> LedFrame:
    """Check a 19-byte frame (start constant, checksum) and split it."""
    if len(frame) != FRAME_LEN or int.from_bytes(frame[:2], "big") != START:
        raise LedDecodeError("not an LED frame (length or start constant)")
    if sum(frame) & 0xFF:
        raise LedChecksumError(
            f"LED frame checksum mismatch: got 0x{frame[-1]:02x}, want 0x{checksum(frame[:-1]):02x}")
    return LedFrame(msid=int.from_bytes(frame[2:6], "big"), devid=int.from_bytes(frame[6:10], "big"),
                    otp=bytes(frame[10:18]))


def _bits(data: bytes) -> list[int]:
    return [(b >> (7 - i)) & 1 for b in data for i in range(8)]


def _from_bits(bits: list[int]) -> bytes:
    return bytes(sum(bit << (7 - i) for i, bit in enumerate(bits[k:k + 8]))
                 for k in range(0, len(bits), 8))


def _nrzi(bits: list[int], level: int = 0) -> list[int]:
    out = []
    for b in bits:
        level ^= b
        out.append(level)
    return out


def nrzi_bits(frame: bytes, level: int = 0) -> list[int]:
    """LED levels (one per bit, MSB first) of `frame` in NRZI: a 1 bit toggles, a 0 keeps.
    `level` is the LED level before the first bit."""
    return _nrzi(_bits(frame), level)


@dataclass(frozen=True)
class LedSignal:
    """A piecewise constant LED level: `levels[k]` during [k, k+1) / bit_rate seconds."""
    levels: tuple[int, ...]
    bit_rate: float = BIT_RATE

    @property
    def duration(self) -> float:
        return len(self.levels) / self.bit_rate

    def mean_level(self, t0: float, t1: float) -> float:
        """Average level over [t0, t1] in seconds (0 outside the signal)."""
        if t1 <= t0:
            return float(self.levels[min(max(int(t0 * self.bit_rate), 0), len(self.levels) - 1)])
        a, b = t0 * self.bit_rate, t1 * self.bit_rate
        total, k = 0.0, math.floor(a)
        while k < b:
            lo, hi = max(a, k), min(b, k + 1)
            if 0 <= k < len(self.levels):
                total += self.levels[k] * (hi - lo)
            k += 1
        return total / (b - a)


def led_levels(frame: bytes, bit_rate: float = BIT_RATE, *, repeats: int = 1,
               idle_bits: int = 0) -> LedSignal:
    """The LED waveform: `idle_bits` at level 0, then (preamble + frame) `repeats` times, NRZI
    continuous across repetitions."""
    bits = ([1] * PREAMBLE_BITS + _bits(frame)) * repeats
    return LedSignal(tuple([0] * idle_bits + _nrzi(bits, 0)), bit_rate)


def sample_brightness(signal: LedSignal, fps: float = FPS, *, start: float = 0.0,
                      duration: float | None = None, phase: float | None = None,
                      noise: float = 0.0, exposure: float = 0.5, gain_drift: float = 0.0,
                      offset_drift: float = 0.0, clock_error: float = 0.0,
                      rng: random.Random | None = None) -> list[float]:
    """Brightness of the LED as a phone camera sees it, one value per video frame.

    Frames are taken at `fps` from `start` + `phase` seconds (`phase` random in [0, 1/fps) when
    None); each integrates the light over `exposure` x frame interval centred on its time stamp.
    The LED's swing is 1; the camera adds Gaussian noise of std `noise` (in units of the swing),
    an offset (ambient + auto exposure) of 0.2 + `offset_drift` x a slow sine and a gain of
    1 + `gain_drift` x another slow sine (periods 5-20 s, random phases). `clock_error` makes the
    LED clock run that fraction fast relative to the camera."""
    rng = rng or random.Random()
    if phase is None:
        phase = rng.uniform(0.0, 1.0 / fps)
    if duration is None:
        duration = signal.duration - start
    g_per, g_ph = rng.uniform(5, 20), rng.uniform(0, 2 * math.pi)
    o_per, o_ph = rng.uniform(5, 20), rng.uniform(0, 2 * math.pi)
    half = exposure / fps / 2
    out = []
    for i in range(int(duration * fps)):
        t = start + phase + i / fps
        tl = t * (1 + clock_error)
        level = signal.mean_level(tl - half, tl + half)
        gain = 1 + gain_drift * math.sin(2 * math.pi * t / g_per + g_ph)
        offset = 0.2 + offset_drift * math.sin(2 * math.pi * t / o_per + o_ph)
        out.append(offset + gain * level + (rng.gauss(0.0, noise) if noise else 0.0))
    return out


# --- receiver -----------------------------------------------------------------------------------

def _quantile(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def _fill(points: dict[int, float], n: int) -> list[float]:
    """Interpolate values known at some indices over 0..n-1 (flat beyond the ends)."""
    keys = sorted(points)
    out = []
    for i in range(n):
        j = bisect.bisect_left(keys, i)
        if j < len(keys) and keys[j] == i:
            out.append(points[i])
        elif j == 0:
            out.append(points[keys[0]])
        elif j == len(keys):
            out.append(points[keys[-1]])
        else:
            a, b = keys[j - 1], keys[j]
            out.append(points[a] + (points[b] - points[a]) * (i - a) / (b - a))
    return out


def _near_mean(v: list[float], idx: list[int], i: int, k: int = 3) -> float:
    """Mean of v over the (about) 2k indices of `idx` nearest to i, k on each side when there."""
    j = bisect.bisect_left(idx, i)
    lo, hi = max(0, j - k), min(len(idx), j + k)
    if hi - lo < 2 * k:
        lo, hi = max(0, hi - 2 * k), min(len(idx), lo + 2 * k)
    sel = idx[lo:hi]
    return sum(v[t] for t in sel) / len(sel)


def _thresholds(v: list[float], half_window: int) -> list[float]:
    """Adaptive decision threshold for every item of `v`: the midpoint between the local means of
    the high and the low items, tracking slow offset and gain drift. Windows that do not show
    both levels (long runs without an edge) borrow from their neighbours."""
    n = len(v)
    if n < 8:
        raise LedDecodeError("brightness series too short")
    s = sorted(v)
    spread = _quantile(s, 0.95) - _quantile(s, 0.05)
    if spread <= 1e-9:
        raise LedDecodeError("no LED signal: brightness does not vary")
    stride = max(1, half_window // 4)
    centres = list(range(0, n, stride)) + ([n - 1] if (n - 1) % stride else [])
    rough = {}
    for c in centres:
        w = sorted(v[max(0, c - half_window):c + half_window + 1])
        lo, hi = _quantile(w, 0.1), _quantile(w, 0.9)
        if hi - lo >= 0.35 * spread:
            rough[c] = (lo + hi) / 2
    thr = _fill(rough or {0: (_quantile(s, 0.1) + _quantile(s, 0.9)) / 2}, n)
    for _ in range(3):  # refine: midpoint of the nearest high and low items' means
        highs = [i for i in range(n) if v[i] > thr[i]]
        lows = [i for i in range(n) if v[i] <= thr[i]]
        if len(highs) < 3 or len(lows) < 3:
            break
        thr = [(_near_mean(v, highs, i) + _near_mean(v, lows, i)) / 2 for i in range(n)]
    return thr


def _soft_bits(y: list[float], spb: float) -> list[float]:
    """Brightness of each bit, threshold-free bit timing.

    At 2 samples per bit (30 fps, 15 bit/s) the clock phase cannot be read from the edges' timing
    (their fundamental sits at the Nyquist frequency), but the pairing can: of the two ways to
    group consecutive samples into bits, the right one has the smaller steps inside the pairs.
    A sample whose exposure straddles an edge has caught some of the neighbouring bit; how much
    (alpha for the first sample of a bit, beta for the second) is estimated by regressing the
    step inside a bit on the edge before and after it, and the samples are weighted by
    0.5 - alpha and 0.5 - beta. Offset and gain drift do not bias any of it."""
    if abs(spb - round(spb)) > 1e-9 or round(spb) < 2:
        raise LedDecodeError("the frame rate must be a whole multiple (>= 2) of the bit rate")
    m = int(round(spb))
    n = len(y)
    best = None
    for p in range(m):  # pairing (grouping) candidates
        inner = sum(abs(y[i + 1] - y[i]) for i in range(n - 1) if (i - p) % m != m - 1)
        if best is None or inner < best[0]:
            best = (inner, p)
    p = best[1]
    groups = [y[i:i + m] for i in range(p, n - m + 1, m)]
    if len(groups) < 3:
        raise LedDecodeError("brightness series too short")
    first = [g[0] for g in groups]
    last = [g[-1] for g in groups]
    inside = [g[-1] - g[0] for g in groups]
    edge_before = [0.0] + [first[k] - last[k - 1] for k in range(1, len(groups))]
    edge_after = [first[k + 1] - last[k] for k in range(len(groups) - 1)] + [0.0]
    e2b = sum(e * e for e in edge_before) or 1.0
    e2a = sum(e * e for e in edge_after) or 1.0
    alpha = max(0.0, min(0.5, sum(w * e for w, e in zip(inside, edge_before)) / e2b))
    beta = max(0.0, min(0.5, sum(w * e for w, e in zip(inside, edge_after)) / e2a))
    wf, wl = 0.5 - alpha, 0.5 - beta
    if wf + wl < 1e-6:
        wf = wl = 0.5
    out = []
    for g in groups:
        mid = g[1:-1]
        tot = wf * g[0] + wl * g[-1] + sum(mid)
        out.append(tot / (wf + wl + len(mid)))
    return out, groups, alpha, beta


def _cancel_isi(groups, alpha, beta, est):
    """Second pass: remove from each bit's first/last sample the share of the neighbouring bit
    (alpha/beta of its decided brightness `est`), then combine both samples fully."""
    out = []
    for k, g in enumerate(groups):
        prev = est[k - 1] if k else est[k]
        nxt = est[k + 1] if k + 1 < len(est) else est[k]
        ea = (g[0] - alpha * prev) / (1 - alpha)
        eb = (g[-1] - beta * nxt) / (1 - beta)
        wa, wb = (1 - alpha) ** 2, (1 - beta) ** 2
        mid = g[1:-1]
        out.append((wa * ea + wb * eb + sum(mid)) / (wa + wb + len(mid)))
    return out


def _find_frames(levels: list[int]) -> tuple[list[int], list[int]]:
    """Indices where a frame starts: the start constant exactly, preceded by a preamble with at
    most 2 wrong bits; also returns the NRZI-decoded bits."""
    bits = [a ^ b for a, b in zip(levels, levels[1:])]  # bits[k] is the bit of levels[k + 1]
    starts = []
    for k in range(PREAMBLE_BITS, len(bits) - FRAME_BITS + 1):
        if bits[k + 15] != 1 or any(bits[k:k + 15]):
            continue
        if sum(bits[k - PREAMBLE_BITS:k]) >= PREAMBLE_BITS - 2:
            starts.append(k)
    return starts, bits


def decode_led(samples: list[float], fps: float = FPS, bit_rate: float = BIT_RATE, *,
               track_drift: bool = False) -> LedFrame:
    """Recover the LED frame from a brightness series (one value per video frame).

    Bit timing (pairing of samples, exposure overlap) -> per-bit brightness -> adaptive threshold
    (local means of the high and the low bits, tracking gain/offset drift) -> a second pass that
    cancels the neighbouring bits' share in straddling samples -> NRZI decode -> sync word
    (preamble + start constant) -> checksum. This first pass assumes the camera and LED clocks
    agree (a mismatch above ~5e-4 makes the sample pairing slip within the recording).
    Every complete repetition in the series is tried; when none checks out alone, a bitwise
    majority vote over three or more repetitions is tried. When that finds nothing and
    `track_drift` is set, the clock drift is tracked (`_decode_drifting`): bit centres are placed on a grid of clock ratios
    within +-MAX_DRIFT and phases, the grids whose centres fall on clean samples are decoded
    and their repetitions soft-combined; only a frame whose checksum verifies is returned.
    Opt-in because it can return a wrong frame whose 8-bit checksum happens to verify (about
    1 in 400 recordings at drift 1e-3 and noise 0.15, `zerotouch bench led --track-drift`).
    Raises LedDecodeError when no frame is found, LedChecksumError when frames were found but
    none has a valid checksum."""
    y = [float(x) for x in samples]
    if any(math.isnan(x) or math.isinf(x) for x in y):
        raise LedDecodeError("brightness series contains NaN/inf")
    try:
        return _decode_aligned(y, fps, bit_rate)
    except LedDecodeError as first:
        if track_drift and (isinstance(first, LedChecksumError) or "frame found" in str(first)):
            found = _decode_drifting(y, fps, bit_rate)
            if found is not None:
                return found
        raise


def _decode_aligned(y: list[float], fps: float, bit_rate: float) -> LedFrame:
    spb = fps / bit_rate
    _thresholds(y, int(round(fps)))  # refuses a series without any signal
    soft, groups, alpha, beta = _soft_bits(y, spb)
    if len(soft) < UNIT_BITS:
        raise LedDecodeError("brightness series too short for one LED frame")
    for second_pass in (False, True):
        bthr = _thresholds(soft, int(round(bit_rate)))
        levels = [1 if s > t else 0 for s, t in zip(soft, bthr)]
        if second_pass or (alpha < 0.02 and beta < 0.02):
            break
        highs = [i for i, lv in enumerate(levels) if lv]
        lows = [i for i, lv in enumerate(levels) if not lv]
        if len(highs) < 3 or len(lows) < 3:
            break
        est = [_near_mean(soft, highs if lv else lows, i) for i, lv in enumerate(levels)]
        soft = _cancel_isi(groups, alpha, beta, est)
    starts, bits = _find_frames(levels)
    if not starts:
        raise LedDecodeError("no LED frame found (no preamble and start constant)")
    frames = [_from_bits(bits[s:s + FRAME_BITS]) for s in starts]
    for frame in frames:
        try:
            return parse_frame(frame)
        except LedChecksumError:
            continue
    if len(frames) >= 3:
        voted = [1 if 2 * sum(col) > len(col) else 0
                 for col in zip(*(_bits(f) for f in frames))]
        try:
            return parse_frame(_from_bits(voted))
        except LedDecodeError:
            pass
    raise LedChecksumError(f"LED frame found {len(frames)} time(s) but its checksum never matched")


# --- clock drift ------------------------------------------------------------------------------
MAX_DRIFT = 2e-3          # camera/LED clock mismatch tracked (29.97 vs 30 fps is 1e-3)
DRIFT_STEP = 5e-4         # ratio grid: the residual mismatch is <= 2.5e-4, which decodes
PHASE_STEP = 0.25         # bit-centre grid, in samples
DRIFT_TRIES = 12          # best-scoring (ratio, phase) candidates decoded


def _soft_at(x: list[float], c0: float, step: float, width: float) -> list[float]:
    """Brightness at bit centres c0, c0 + step, ...: a triangular kernel of half-width `width`
    (samples) around each centre, so samples near a bit boundary count little."""
    n, out, c = len(x), [], c0
    while c + width < n - 1 + 1e-9:
        tw = tv = 0.0
        for i in range(max(0, math.ceil(c - width)), min(n - 1, math.floor(c + width)) + 1):
            w = 1.0 - abs(i - c) / width
            if w > 0:
                tw += w
                tv += w * x[i]
        out.append(tv / tw if tw else 0.0)
        c += step
    return out


def _combined_frames(soft: list[float]) -> list[bytes]:
    """Frames found by their sync word in `soft` (per-bit brightness), each decided from every
    repetition at a whole number of UNIT_BITS from it, soft-combined (sum of the products of
    neighbouring margins: negative = the level toggled = a 1 bit)."""
    thr = _thresholds(soft, 15)
    mg = [s - t for s, t in zip(soft, thr)]
    starts, _bits = _find_frames([1 if m > 0 else 0 for m in mg])
    frames, seen = [], set()
    for k in starts:
        base = k % UNIT_BITS
        if base in seen:
            continue
        seen.add(base)
        reps = [j for j in range(base, len(mg) - FRAME_BITS, UNIT_BITS)]
        # bits[k] is the bit of levels[k + 1]: the toggle between levels k and k + 1
        bits = [1 if sum(mg[j + b] * mg[j + b + 1] for j in reps) < 0 else 0
                for b in range(FRAME_BITS)]
        frames.append(_from_bits(bits))
    return frames


def _decode_drifting(y: list[float], fps: float, bit_rate: float) -> LedFrame | None:
    """Track a camera/LED clock mismatch up to MAX_DRIFT: for each clock ratio and phase on a
    grid, sample the (threshold-normalised) series at the predicted bit centres; the candidates
    whose centres fall on clean samples (largest mean |margin|) are decoded. A frame counts only
    if its checksum verifies and two or more candidates found it; the one found most often wins."""
    spb = fps / bit_rate
    thr = _thresholds(y, int(round(fps)))
    x = [v - t for v, t in zip(y, thr)]
    width = 0.625 * spb
    steps = int(round(MAX_DRIFT / DRIFT_STEP))
    cands = []
    for r in (k * DRIFT_STEP for k in range(-steps, steps + 1)):
        for p in range(int(round(spb / PHASE_STEP))):
            soft = _soft_at(x, p * PHASE_STEP, spb / (1 + r), width)
            if len(soft) >= UNIT_BITS:
                cands.append((sum(abs(v) for v in soft) / len(soft), soft))
    cands.sort(key=lambda c: -c[0])
    tally: dict[bytes, int] = {}
    for _score, soft in cands[:DRIFT_TRIES]:
        try:
            frames = _combined_frames(soft)
        except LedDecodeError:
            continue
        for frame in set(frames):
            if len(frame) == FRAME_LEN and frame[:2] == START.to_bytes(2, "big") and not sum(frame) & 0xFF:
                tally[frame] = tally.get(frame, 0) + 1
    # An 8-bit checksum passes 1 corrupted frame in 256: a frame must be found by at least two
    # candidates (neighbouring ratios or phases agree on the right one) to be believed.
    best = max(tally, key=tally.get, default=None)
    if best is None or tally[best] < 2:
        return None
    return parse_frame(best)
