"""Label pictures made here: segno's QR matrix turned into pixels by hand (scale, rotate, noise)."""
from __future__ import annotations

import math
import random
import struct
import zlib

import segno


def qr_pixels(text: str, scale: int = 8, border: int = 4) -> tuple[int, int, list[list[int]]]:
    m = segno.make(text, error="h", micro=False).matrix
    n = len(m)
    size = (n + 2 * border) * scale
    rows = [[255] * size for _ in range(size)]
    for y, row in enumerate(m):
        for x, dark in enumerate(row):
            if dark:
                for dy in range(scale):
                    r = rows[(y + border) * scale + dy]
                    for dx in range(scale):
                        r[(x + border) * scale + dx] = 0
    return size, size, rows


def transform(rows: list[list[int]], *, angle_deg: float = 0.0, zoom: float = 1.0, noise: int = 0,
              pad: int = 40, seed: int = 7, background: int = 200) -> list[list[int]]:
    """Rotate and scale (nearest neighbour) onto a larger grey canvas, then add noise."""
    h, w = len(rows), len(rows[0])
    out_w = int((w * zoom) * 1.5) + 2 * pad
    cx, cy, ox, oy = w / 2, h / 2, out_w / 2, out_w / 2
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    rnd = random.Random(seed)
    out = []
    for y in range(out_w):
        line = []
        for x in range(out_w):
            dx, dy = (x - ox) / zoom, (y - oy) / zoom
            sx, sy = int(ca * dx + sa * dy + cx), int(-sa * dx + ca * dy + cy)
            v = rows[sy][sx] if 0 <= sx < w and 0 <= sy < h else background
            if noise:
                v = max(0, min(255, v + rnd.randint(-noise, noise)))
            line.append(v)
        out.append(line)
    return out


def png_grey(rows: list[list[int]]) -> bytes:
    h, w = len(rows), len(rows[0])
    raw = b"".join(b"\x00" + bytes(r) for r in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def side_by_side(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    h = max(len(a), len(b))
    blank_a, blank_b = [255] * len(a[0]), [255] * len(b[0])
    return [(a[i] if i < len(a) else blank_a) + [255] * 20 + (b[i] if i < len(b) else blank_b)
            for i in range(h)]
