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


class LedUncertainError(LedDecodeError):
    """Not sure: a frame was found, but the recording does not single it out with enough confidence (the
    repetitions disagree, or another frame with a valid checksum is nearly as likely)."""
    code = "led_not_sure"


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



# Receiver: envelope (offset/gain) fit -> per-block bit-phase search, unwrapped and fitted by a line
# (bit clock phase and camera/LED rate) -> forward-backward over the LED levels with each sample's
# exposure window straddling bits as the model -> the timing line and exposure refined over the
# whole recording against those levels -> forward-backward again -> per-bit LLRs folded over every
# repetition -> the two best checksum-valid frames (DP over the checksum residue) -> accept on a
# margin.
KNOT = 15                 # envelope (offset and gain) knots, in samples (0.5 s at 30 fps)
SEGMENT = 80              # timing-recovery block, in samples
PHASES = 16               # bit-phase grid per block
EXPOSURES = (0.16, 0.48, 0.76, 1.0)   # exposure windows tried, fraction of the frame interval
MAX_RATE_ERROR = 3e-3     # camera/LED clock mismatch accepted
TIMING_TOLERANCE = 0.06   # bits: a sample this close to a bit boundary may straddle it
SIGMA_FLOOR = 0.03        # noise floor (fraction of the swing) in the soft decisions
LLR_CLIP = 8.0            # per-bit evidence cap in the sync search
MARGIN = 12.0             # nats the best checksum-valid frame must beat any other frame by
MAX_COST = 16.0           # nats of evidence the best frame may overrule
REFINE_EXPOSURES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
REFINE_TAU = 2.5          # x sigma: brightness slack of a sample's bounds in the timing refinement
REFINE_SLACK = 4.0        # x sigma^2: squared error the refined timing may add to the line fit's
REPEAT_AGAINST = 32.0     # nats of evidence against the frame one repetition may hold


def _solve_banded(a, rhs, bw):
    n = len(rhs)
    for k in range(n):
        piv = a[k][k]
        if abs(piv) < 1e-12:
            piv = a[k][k] = 1e-12
        for i in range(k + 1, min(n, k + bw + 1)):
            f = a[i][k] / piv
            if f:
                ri, rk = a[i], a[k]
                for j in range(k, min(n, k + bw + 1)):
                    ri[j] -= f * rk[j]
                rhs[i] -= f * rhs[k]
    x = [0.0] * n
    for k in range(n - 1, -1, -1):
        s = rhs[k]
        rk = a[k]
        for j in range(k + 1, min(n, k + bw + 1)):
            s -= rk[j] * x[j]
        x[k] = s / a[k][k]
    return x


def _envelope(y, m, smooth=10.0, wt=None):
    """Offset and swing per sample: y ~ off + swing * m (m = modelled LED level in [0, 1]), both
    piecewise linear with knots every KNOT samples and a second-difference smoothness penalty."""
    n = len(y)
    nk = (n - 1) // KNOT + 2
    size = 2 * nk
    a = [[0.0] * size for _ in range(size)]
    rhs = [0.0] * size
    for i in range(n):
        j, w = divmod(i, KNOT)
        w /= KNOT
        v = ((2 * j, 1 - w), (2 * j + 1, (1 - w) * m[i]), (2 * j + 2, w), (2 * j + 3, w * m[i]))
        c = wt[i] if wt else 1.0
        for p, vp in v:
            rhs[p] += c * vp * y[i]
            row = a[p]
            for q, vq in v:
                row[q] += c * vp * vq
    for j in range(1, nk - 1):
        for off in (0, 1):
            idx = (2 * (j - 1) + off, 2 * j + off, 2 * (j + 1) + off)
            co = (1.0, -2.0, 1.0)
            for p, cp in zip(idx, co):
                for q, cq in zip(idx, co):
                    a[p][q] += smooth * cp * cq
    for p in range(size):
        a[p][p] += 1e-6
    sol = _solve_banded(a, rhs, 5)
    off, sw = [], []
    for i in range(n):
        j, w = divmod(i, KNOT)
        w /= KNOT
        off.append((1 - w) * sol[2 * j] + w * sol[2 * j + 2])
        sw.append((1 - w) * sol[2 * j + 1] + w * sol[2 * j + 3])
    return off, sw


def _assign(xs: list[float], h: float, eps: float = 0.0) -> list[tuple[int, float, float, float]]:
    """For each sample centre x (in bits) with half exposure window h, allowing a timing error of
    +-eps bits: (k, f, flo, fhi) = the first bit the window may cover and the fraction of the
    window in bit k + 1 (nominal, least, most); fhi = 0 when the window is inside bit k."""
    out = []
    inv = 1.0 / (2 * h)
    for x in xs:
        b = math.floor(x + h + eps)
        if b > x - h - eps:
            f = min(1.0, max(0.0, (x + h - b) * inv))
            flo = min(1.0, max(0.0, (x - eps + h - b) * inv))
            fhi = min(1.0, max(1e-9, (x + eps + h - b) * inv))
            out.append((b - 1, f, flo, fhi))
        else:
            out.append((math.floor(x), 0.0, 0.0, 0.0))
    return out


def _levels_from(z, asg):
    sums, cnts = {}, {}
    for v, (k, _f, _lo, hi) in zip(z, asg):
        if not hi:
            sums[k] = sums.get(k, 0.0) + v
            cnts[k] = cnts.get(k, 0) + 1
    return {k: 1 if sums[k] > 0.5 * cnts[k] else 0 for k in sums}


def _off_range(v: float, lo: float, hi: float) -> float:
    return lo - v if v < lo else (v - hi if v > hi else 0.0)


def _rss(z, asg):
    lv = _levels_from(z, asg)
    tot = 0.0
    for v, (k, _f, flo, fhi) in zip(z, asg):
        a = lv.get(k)
        if not fhi:
            tot += (v - a) ** 2
            continue
        b = lv.get(k + 1)
        if a is None or b is None:      # a bit without a clean sample: its best level
            tot += min(_pair_res(v, a0, b0, flo, fhi) for a0 in ((a,) if a is not None else (0, 1))
                       for b0 in ((b,) if b is not None else (0, 1)))
            continue
        tot += _pair_res(v, a, b, flo, fhi)
    return tot


def _pair_res(v, a, b, flo, fhi):
    if a == b:
        return (v - a) ** 2
    if b:
        return _off_range(v, flo, fhi) ** 2
    return _off_range(v, 1 - fhi, 1 - flo) ** 2


def _block_rss(zz: list[float], xs: list[float], h: float) -> float:
    """_rss(zz, _assign(xs, h)) without the tolerance, in one pass (the timing search's inner loop)."""
    inv = 1.0 / (2 * h)
    floor = math.floor
    sums: dict[int, float] = {}
    cnts: dict[int, int] = {}
    clean, mixed = [], []
    for v, x in zip(zz, xs):
        b = floor(x + h)
        if b > x - h:
            f = (x + h - b) * inv
            mixed.append((v, b - 1, 0.0 if f < 0 else (1.0 if f > 1 else f)))
        else:
            k = floor(x)
            clean.append((v, k))
            sums[k] = sums.get(k, 0.0) + v
            cnts[k] = cnts.get(k, 0) + 1
    lv = {k: 1 if sums[k] > 0.5 * cnts[k] else 0 for k in sums}
    tot = 0.0
    for v, k in clean:
        d = v - lv[k]
        tot += d * d
    for v, k, f in mixed:
        a, b = lv.get(k), lv.get(k + 1)
        if a is not None and b is not None:
            d = v - (a + f * (b - a))
            tot += d * d
        else:
            tot += min((v - (a0 + f * (b0 - a0))) ** 2 for a0 in ((a,) if a is not None else (0, 1))
                       for b0 in ((b,) if b is not None else (0, 1)))
    return tot


def _timing(z: list[float], spb: float) -> tuple[list[float], float]:
    """Bit position of every sample: x_i = x0 + step * i, from per-block phase estimates (the
    blocks' phases, unwrapped and fitted by a line, track the clock mismatch) and the exposure."""
    n = len(z)
    step0 = 1.0 / spb
    nseg = max(1, n // SEGMENT)
    seglen = n // nseg
    blocks = [(s * seglen, (s + 1) * seglen if s < nseg - 1 else n) for s in range(nseg)]
    hs = [e * step0 / 2 for e in EXPOSURES]
    curves = []   # per block: {h: [rss per phase]}
    for i0, i1 in blocks:
        c = (i0 + i1 - 1) / 2
        zz = z[i0:i1]
        offs = [(i - c) * step0 for i in range(i0, i1)]
        per_h = {}
        for h in hs:
            per_h[h] = [_block_rss(zz, [p / PHASES + o for o in offs], h) for p in range(PHASES)]
        curves.append((c, per_h))
    h = min(hs, key=lambda hh: sum(min(pc[hh]) for _c, pc in curves))
    pts = []
    for c, per_h in curves:
        r = per_h[h]
        lo = min(r)
        ws = [math.exp(-(v - lo) / 0.5) for v in r]
        sx = sum(w * math.cos(2 * math.pi * p / PHASES) for p, w in enumerate(ws))
        sy = sum(w * math.sin(2 * math.pi * p / PHASES) for p, w in enumerate(ws))
        pts.append((c, (math.atan2(sy, sx) / (2 * math.pi)) % 1.0, math.hypot(sx, sy) / sum(ws)))
    xs = []
    for j, (c, ph, _conc) in enumerate(pts):
        if not xs:
            xs.append(ph)
            continue
        pred = xs[-1] + (c - pts[j - 1][0]) * step0
        xs.append(ph + round(pred - ph))
    use = list(range(len(pts)))
    x0, step = xs[0] - pts[0][0] * step0, step0
    for _ in range(3):
        if len(use) >= 2:
            w = [pts[j][2] + 1e-3 for j in use]
            sw = sum(w)
            mc = sum(wi * pts[j][0] for wi, j in zip(w, use)) / sw
            mx = sum(wi * xs[j] for wi, j in zip(w, use)) / sw
            sxx = sum(wi * (pts[j][0] - mc) ** 2 for wi, j in zip(w, use))
            sxy = sum(wi * (pts[j][0] - mc) * (xs[j] - mx) for wi, j in zip(w, use))
            step = sxy / sxx if sxx else step0
            step = min(max(step, step0 * (1 - MAX_RATE_ERROR)), step0 * (1 + MAX_RATE_ERROR))
            x0 = mx - step * mc
        else:
            x0, step = xs[use[0]] - pts[use[0]][0] * step0, step0
        res = [(abs(xs[j] - x0 - step * pts[j][0]), j) for j in use]
        worst = max(res)
        if worst[0] < 0.15 or len(use) <= 2:
            break
        use.remove(worst[1])
    return [x0 + step * i for i in range(n)], h


def _refine(z, xs, h, lv, kmin, sigma, spb):
    """Refine the bit timing over the whole recording, given the LED levels decided so far: every
    sample near an edge bounds its own position (a sample whose window lies before the edge shows
    the old level, one that straddles it shows the mix in proportion), so a timing line
    x_i = x0 + step * i and an exposure h must satisfy one interval per sample. For each candidate
    (clock ratio, exposure) the offset minimising the total violation is found exactly (a median of
    the interval ends); the candidate with the least violation, then the widest feasible range of
    offsets, wins, and the offset is taken from the centre of that range."""
    n = len(z)
    step0 = 1.0 / spb
    x0, step = xs[0], xs[1] - xs[0]
    ic = (n - 1) / 2
    tau = min(0.45, REFINE_TAU * sigma)
    nb = len(lv)
    cons = []
    for i in range(n):
        x = x0 + step * i
        kb = round(x)
        for k in (kb - 1, kb, kb + 1):
            d = x - k
            if abs(d) >= 0.75:
                continue
            j = k - kmin
            if j < 1 or j >= nb or lv[j - 1] == lv[j]:
                continue
            u = z[i] if lv[j] else 1 - z[i]
            cons.append((i - ic, d, u - tau, u + tau))
    # lower bounds on the offset correction c: A * h - d - ds * t (A = 2 * ulo - 1), upper bounds
    # likewise from uhi; a sample inside a bit bounds one side only
    lo_c = [(2 * min(ulo, 1.0) - 1, d, t) for t, d, ulo, _uhi in cons if ulo > 0]
    hi_c = [(2 * max(uhi, 0.0) - 1, d, t) for t, d, _ulo, uhi in cons if uhi < 1]
    if len(lo_c) < 4 or len(hi_c) < 4:
        return xs, h
    lo_t = [t for _a, _d, t in lo_c]
    hi_t = [t for _a, _d, t in hi_c]
    nlo = len(lo_c)
    bases = {}

    def score(ds, e):
        if e not in bases:
            hh = e * step0 / 2
            bases[e] = ([a * hh - d for a, d, _t in lo_c], [a * hh - d for a, d, _t in hi_c])
        blo, bhi = bases[e]
        lo = [b - ds * t for b, t in zip(blo, lo_t)]
        hi = [b - ds * t for b, t in zip(bhi, hi_t)]
        lo.sort()
        hi.sort()
        m = sorted(lo + hi)
        c = (m[nlo - 1] + m[nlo]) / 2
        j = bisect.bisect_right(lo, c)
        jh = bisect.bisect_left(hi, c)
        cost = sum(lo[j:]) - c * (nlo - j) + c * jh - sum(hi[:jh])
        return cost - (m[nlo] - m[nlo - 1]), c

    best = None
    for e in REFINE_EXPOSURES:
        for r in range(-15, 16, 3):
            sc, c = score(r * 1e-4 * step0, e)
            if best is None or sc < best[0]:
                best = (sc, c, r * 1e-4, e)
    r0, e0 = best[2], best[3]
    for e in REFINE_EXPOSURES:
        if abs(e - e0) > 0.11:
            continue
        for r in range(-6, 7):
            rr = r0 + r * 5e-5
            sc, c = score(rr * step0, e)
            if sc < best[0]:
                best = (sc, c, rr, e)
    _sc, c, rr, e = best
    ds, hh = rr * step0, e * step0 / 2
    x0n = x0 + c - ds * ic
    return [x0n + (step + ds) * i for i in range(n)], hh


def _lse(a, b):
    return a + math.log1p(math.exp(b - a)) if a >= b else b + math.log1p(math.exp(a - b))


def _bcjr(z, asg, sigma):
    """Forward-backward over the LED levels (2 states), every sample's likelihood given the level
    of the bit(s) under its exposure window. Returns kmin, per-level posterior P(1) and per-bit
    LLR (log P(toggle) / P(hold)) of the NRZI bit carried by level k (toggle from k - 1)."""
    kmin = min(a[0] for a in asg)
    kmax = max(k + (1 if hi else 0) for k, _f, _lo, hi in asg)
    nb = kmax - kmin + 1
    inv = 1.0 / (2 * sigma * sigma)
    e0, e1 = [0.0] * nb, [0.0] * nb
    g = [[0.0, 0.0, 0.0, 0.0] for _ in range(nb)]
    for v, (k, _f, flo, fhi) in zip(z, asg):
        k -= kmin
        if not fhi:
            e0[k] -= v * v * inv
            e1[k] -= (v - 1) ** 2 * inv
        else:
            gk = g[k]
            gk[0] -= v * v * inv
            gk[1] -= _off_range(v, flo, fhi) ** 2 * inv
            gk[2] -= _off_range(v, 1 - fhi, 1 - flo) ** 2 * inv
            gk[3] -= (v - 1) ** 2 * inv
    al = [(e0[0], e1[0])]
    for k in range(nb - 1):
        a0, a1 = al[-1]
        gk = g[k]
        al.append((_lse(a0 + gk[0], a1 + gk[2]) + e0[k + 1], _lse(a0 + gk[1], a1 + gk[3]) + e1[k + 1]))
        m = max(al[-1])
        al[-1] = (al[-1][0] - m, al[-1][1] - m)
    be = [(0.0, 0.0)] * nb
    for k in range(nb - 2, -1, -1):
        b0, b1 = be[k + 1]
        gk = g[k]
        t0, t1 = e0[k + 1] + b0, e1[k + 1] + b1
        x0, x1 = _lse(gk[0] + t0, gk[1] + t1), _lse(gk[2] + t0, gk[3] + t1)
        m = max(x0, x1)
        be[k] = (x0 - m, x1 - m)
    p1 = []
    for (a0, a1), (b0, b1) in zip(al, be):
        d = (a1 + b1) - (a0 + b0)
        p1.append(1.0 / (1.0 + math.exp(-d)) if d > -700 else 0.0)
    llr = [0.0]
    for k in range(nb - 1):
        a0, a1 = al[k]
        b0, b1 = be[k + 1]
        gk = g[k]
        t0, t1 = e0[k + 1] + b0, e1[k + 1] + b1
        hold = _lse(a0 + gk[0] + t0, a1 + gk[3] + t1)
        tog = _lse(a0 + gk[1] + t1, a1 + gk[2] + t0)
        llr.append(tog - hold)
    return kmin, p1, llr


def _mix(asg, lv, kmin):
    out = []
    for k, f, _lo, _hi in asg:
        a = lv[k - kmin]
        out.append(a if not f else a + f * (lv[k + 1 - kmin] - a))
    return out


def _sigma(z, m):
    r = sorted(abs(a - b) for a, b in zip(z, m))
    return max(SIGMA_FLOOR, r[len(r) // 2] / 0.6745)


def _best_two(hard, cost):
    """The two cheapest sets of bit flips that make the frame's byte sum 0 mod 256 (DP over the
    checksum residue, the flippable bits being those cheaper than MAX_COST + MARGIN)."""
    s0 = sum(_from_bits(hard)) & 0xFF
    bound = MAX_COST + MARGIN
    states = {s0: [(0.0, 0)]}
    for b in range(16, FRAME_BITS):
        c = cost[b]
        if c >= bound:
            continue
        w = 1 << (7 - b % 8)
        d = -w if hard[b] else w
        new = {s: list(v) for s, v in states.items()}
        for s, lst in states.items():
            t = (s + d) & 0xFF
            for cc, mask in lst:
                nc = cc + c
                if nc >= bound:
                    continue
                cur = new.setdefault(t, [])
                cur.append((nc, mask | (1 << b)))
        for s in new:
            if len(new[s]) > 2:
                new[s].sort()
                del new[s][2:]
        states = new
    return sorted(states.get(0, []))


def decode_led(samples: list[float], fps: float = FPS, bit_rate: float = BIT_RATE, *,
               track_drift: bool = True) -> LedFrame:
    """Recover the LED frame from a brightness series (one value per video frame).

    1. Offset and swing of the LED in the picture (ambient light, auto exposure): piecewise
       linear in time, fitted to the samples against the modelled LED level.
    2. Bit timing: in blocks of SEGMENT samples the bit phase and the exposure window are chosen
       by least squares (levels decided from the samples inside one bit, a sample whose window
       straddles two bits modelled as their mix); the block phases, unwrapped, are fitted by a
       line, whose slope is the camera/LED clock ratio (drift up to MAX_RATE_ERROR is tracked).
    3. Forward-backward over the LED levels (2 states) with that timing gives each NRZI bit a
       log-likelihood ratio and the LED levels.
    4. The timing is refined over the whole recording against those levels (`_refine`): each
       sample near an edge bounds where it may lie (before the edge, across it in proportion to
       its brightness, or after it); the clock ratio and the exposure are chosen on a grid
       around the line fit, the offset exactly, so that the samples violate their bounds the least
       and the margin left is the widest. A short exposure leaves the block phases ill-defined
       (any phase within half a bit fits a block), so the block line may miss the drift; the
       bounds of all the samples together do not. The refined timing is kept unless the least
       squares fit of the whole recording clearly prefers the line fit (a noisy picture loosens
       the bounds). Steps 1-3 run first, then step 1, this refinement and step 3, then steps 1
       and 3 once more, each on the previous decisions.
    5. The sync word (16 preamble 1s, the start constant) is found in the LLRs folded modulo
       UNIT_BITS; every repetition of each frame bit in the recording is summed (bits before the
       first preamble are used only when they agree: they may be the idle LED before power-on).
    6. The two most likely frames whose checksum verifies are found exactly (dynamic programming
       over the checksum residue). The best is returned only when it overrules at most MAX_COST
       nats of evidence and beats the runner-up by MARGIN nats: an 8-bit checksum alone passes
       1 corrupted frame in 256.

    Raises LedDecodeError when no frame is found (or the recording misses part of it),
    LedChecksumError when a frame is found but no frame with a valid checksum is near it, and
    LedUncertainError ("not sure") when two checksum-valid frames are about as likely, e.g. when
    the repetitions disagree. `track_drift` is kept for compatibility: drift is always tracked."""
    del track_drift
    y = [float(v) for v in samples]
    if any(math.isnan(v) or math.isinf(v) for v in y):
        raise LedDecodeError("brightness series contains NaN/inf")
    spb = fps / bit_rate
    n = len(y)
    if n < spb * UNIT_BITS:
        raise LedDecodeError("brightness series too short for one LED frame")
    thr = _thresholds(y, int(round(fps)))   # refuses a series without any signal
    m = [1.0 if v > t else 0.0 for v, t in zip(y, thr)]
    wt, smooth, asg = None, 10.0, None
    for npass in range(3):
        off, sw = _envelope(y, m, smooth, wt)
        floor = 0.2 * max(abs(s) for s in sw)
        sw = [max(s, floor) for s in sw]
        z = [(v - o) / s for v, o, s in zip(y, off, sw)]
        if npass == 0:
            xs, h = _timing(z, spb)
        if npass < 2:
            if npass:
                # keep the refined timing unless the least-squares fit of the whole recording
                # clearly prefers the line fit (noisy pictures loosen the refinement's bounds)
                xr, hr = _refine(z, xs, h, lv, kmin, sigma, spb)
                if _block_rss(z, xr, hr) <= _block_rss(z, xs, h) + REFINE_SLACK * sigma * sigma:
                    xs, h = xr, hr
            asg = _assign(xs, h, TIMING_TOLERANCE)
            kmin0 = min(a[0] for a in asg)
            lv0 = _levels_from(z, asg)
            hard = [lv0.get(k, 0) for k in range(kmin0, max(a[0] for a in asg) + 2)]
            sigma = _sigma(z, _mix(asg, hard, kmin0))
        kmin, p1, llr = _bcjr(z, asg, sigma)
        lv = [1 if p > 0.5 else 0 for p in p1]
        m = _mix(asg, lv, kmin)
        sigma = _sigma(z, m)
        sig_y = sigma * sum(sw) / len(sw)
        smooth = max(0.5, 450 * sig_y * sig_y)   # smoother envelope when the picture is noisy
        wt = [0.5 if hi else 1.0 for _k, _f, _lo, hi in asg]
    return _frame_from_llr(kmin, llr)


def _frame_from_llr(kmin: int, llr: list[float]) -> LedFrame:
    nb = len(llr)
    kfirst = kmin + 1                   # llr[0] carries no bit
    res = [0.0] * UNIT_BITS
    for i in range(1, nb):
        v = llr[i]
        res[(kmin + i) % UNIT_BITS] += max(-LLR_CLIP, min(LLR_CLIP, v))
    pat = [1] * PREAMBLE_BITS + [-1] * 15 + [1]
    scores = []
    for u in range(UNIT_BITS):
        scores.append((sum(p * res[(u - PREAMBLE_BITS + j) % UNIT_BITS] for j, p in enumerate(pat)), u))
    scores.sort(reverse=True)
    best, u = scores[0]
    agree = [p * res[(u - PREAMBLE_BITS + j) % UNIT_BITS] for j, p in enumerate(pat)]
    if sum(1 for a in agree if a < 0) > 3 or sum(1 for a in agree if a > 0) < 24:
        raise LedDecodeError("no LED frame found (no preamble and start constant)")
    # the first preamble seen: bits before it may be the idle LED before the first transmission
    first_pre = u - PREAMBLE_BITS
    while first_pre - UNIT_BITS >= kfirst - PREAMBLE_BITS:
        first_pre -= UNIT_BITS
    while first_pre < kfirst - PREAMBLE_BITS:
        first_pre += UNIT_BITS
    main = [0.0] * FRAME_BITS
    cov = [0] * FRAME_BITS
    pre = {}
    obs = []                            # (frame bit, repetition, llr)
    for b in range(FRAME_BITS):
        k = u + b
        while k - UNIT_BITS >= kfirst:
            k -= UNIT_BITS
        while k < kfirst:
            k += UNIT_BITS
        while k < kmin + nb:
            v = llr[k - kmin]
            if k < first_pre:
                pre[b] = v
            else:
                main[b] += v
                cov[b] += 1
                obs.append((b, (k - first_pre) // UNIT_BITS, v))
            k += UNIT_BITS
    if not all(cov[16:]):
        raise LedDecodeError("recording too short: part of the LED frame was not seen")
    if not any(cov[b] and abs(main[b]) > 4 and abs(v) > 4 and (main[b] > 0) != (v > 0)
               for b, v in pre.items()):
        for b, v in pre.items():
            main[b] += v
            obs.append((b, -1, v))
    hard = [(START >> (15 - b)) & 1 for b in range(16)] + [1 if v > 0 else 0 for v in main[16:]]
    cost = [abs(v) for v in main]
    cands = _best_two(hard, cost)
    if not cands or cands[0][0] > MAX_COST:
        raise LedChecksumError("LED frame found but its checksum does not match")
    if len(cands) > 1 and cands[1][0] - cands[0][0] < MARGIN:
        raise LedUncertainError(
            f"LED frame not sure: two frames with a valid checksum within "
            f"{cands[1][0] - cands[0][0]:.1f} nats (repetitions disagree or too much noise)")
    mask = cands[0][1]
    bits = [hb ^ ((mask >> b) & 1) for b, hb in enumerate(hard)]
    # Every repetition must agree with the frame on its own: strong evidence against it in one
    # repetition, outweighed by another, means the repetitions differ (a corrupted transmission).
    against: dict[int, float] = {}
    for b, rep, v in obs:
        if b >= 16 and (v > 0) != bool(bits[b]):
            against[rep] = against.get(rep, 0.0) + abs(v)
    if against and max(against.values()) > REPEAT_AGAINST:
        raise LedUncertainError(
            f"LED frame not sure: a repetition contradicts it ({max(against.values()):.0f} nats)")
    return parse_frame(_from_bits(bits))
