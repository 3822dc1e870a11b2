"""Read a device label from a photo: the QR code in a PNG or JPEG, decoded with zxing-cpp.

Pillow loads the image when it is installed (any format it knows, JPEG included); without it
only PNG is read, by the small reader below. Exactly one QR code holding a TTE label URL is
accepted: none, several, or a code that is not a label is a readable error.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from ..protocol.errors import MalformedMessage
from ..protocol.tte import parse_label

MAX_PHOTO_BYTES = 16 * 1024 * 1024
MAX_PIXELS = 40_000_000          # a 40-megapixel photo; more is refused (decompression bombs)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PhotoError(MalformedMessage):
    """The photo cannot be read, or does not show exactly one TTE label QR code."""

    def __init__(self, message: str):
        super().__init__(message, code="bad_photo")


def decode_label_photo(path: str | Path) -> str:
    """The TTE label URL in the QR code of the photo at `path`."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise PhotoError(f"cannot read the photo {p}: {exc.strerror or exc}") from None
    if size > MAX_PHOTO_BYTES:
        raise PhotoError(f"photo is larger than {MAX_PHOTO_BYTES // (1024 * 1024)} MiB")
    return decode_label_bytes(p.read_bytes())


def decode_label_bytes(data: bytes) -> str:
    """The TTE label URL in the QR code of an image given as bytes (PNG, or JPEG with Pillow)."""
    if len(data) > MAX_PHOTO_BYTES:
        raise PhotoError(f"photo is larger than {MAX_PHOTO_BYTES // (1024 * 1024)} MiB")
    width, height, grey = _load_grey(data)
    texts = _qr_texts(width, height, grey)
    if not texts:
        raise PhotoError("no QR code found in the photo; take it closer, sharp and well lit")
    if len(texts) > 1:
        raise PhotoError(f"the photo shows {len(texts)} QR codes; photograph one label at a time")
    text = texts[0]
    try:
        return parse_label(text).url
    except MalformedMessage as exc:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise PhotoError(f"the QR code is not a device label ({exc.message}): {shown!r}") from None


def _qr_texts(width: int, height: int, grey: bytes) -> list[str]:
    try:
        import zxingcpp
    except ImportError:  # pragma: no cover - an install without the extra
        raise PhotoError("reading photos needs zxing-cpp: pip install 'zxing-cpp>=2.2,<3'") from None
    image = memoryview(grey).cast("B", (height, width))
    found = zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode, try_rotate=True,
                                   try_downscale=True)
    return list(dict.fromkeys(r.text for r in found if r.valid))


def _load_grey(data: bytes) -> tuple[int, int, bytes]:
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise PhotoError(f"photo has more than {MAX_PIXELS} pixels")
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")
                    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(bg, rgba)
                grey = img.convert("L")
                return grey.width, grey.height, grey.tobytes()
        except PhotoError:
            raise
        except Exception as exc:  # PIL raises many kinds for a broken or unknown file
            raise PhotoError(f"the file is not an image that can be read ({type(exc).__name__})") from None
    if not data.startswith(PNG_MAGIC):
        raise PhotoError("without Pillow only PNG photos can be read (pip install pillow for JPEG)")
    return _png_grey(data)


def _png_grey(data: bytes) -> tuple[int, int, bytes]:
    """PNG (any colour type, 8-bit, or 1–8-bit grey/palette; not interlaced) -> 8-bit grey."""
    try:
        pos, idat, palette, alpha, hdr = 8, [], None, None, None
        while pos + 12 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos:pos + 8])
            body = data[pos + 8:pos + 8 + length]
            if kind == b"IHDR":
                hdr = struct.unpack(">IIBBBBB", body)
            elif kind == b"PLTE":
                palette = [body[i:i + 3] for i in range(0, len(body), 3)]
            elif kind == b"tRNS":
                alpha = body
            elif kind == b"IDAT":
                idat.append(body)
            elif kind == b"IEND":
                break
            pos += 12 + length
        if hdr is None:
            raise ValueError("no IHDR")
        width, height, depth, ctype, _c, _f, interlace = hdr
        if width * height > MAX_PIXELS:
            raise PhotoError(f"photo has more than {MAX_PIXELS} pixels")
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
        if interlace or depth > 8 or (depth != 8 and ctype not in (0, 3)):
            raise PhotoError("this PNG layout (interlaced or 16-bit) needs Pillow: pip install pillow")
        d = zlib.decompressobj()
        raw = d.decompress(b"".join(idat), height * (1 + (width * channels * depth + 7) // 8) + 1)
    except PhotoError:
        raise
    except (struct.error, KeyError, ValueError, zlib.error):
        raise PhotoError("the file is not a PNG image that can be read") from None
    bpp = max(1, channels * depth // 8)
    stride = (width * channels * depth + 7) // 8
    if len(raw) < height * (stride + 1):
        raise PhotoError("the PNG image data is truncated")
    prev = bytearray(stride)
    out = bytearray()
    maxval = (1 << depth) - 1
    for row in range(height):
        start = row * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev))
        elif ftype == 3:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + (a + prev[i]) // 2) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else (b if pb <= pc else c))) & 0xFF
        prev = line
        if channels == 1 and depth == 8 and palette is None:
            out += line
            continue
        for x in range(width):
            if depth < 8:
                bit = x * depth
                v = (line[bit // 8] >> (8 - depth - bit % 8)) & maxval
            else:
                v = line[x * channels]
            if ctype == 3:
                rgb = palette[v] if palette and v < len(palette) else b"\0\0\0"
                g = sum(rgb) // 3
                a = alpha[v] if alpha and v < len(alpha) else 255
            elif ctype == 0:
                g, a = v * 255 // maxval, 255
            elif ctype == 4:
                g, a = v, line[x * 2 + 1]
            else:
                px = line[x * channels:x * channels + 3]
                g = (px[0] * 299 + px[1] * 587 + px[2] * 114) // 1000
                a = line[x * 4 + 3] if ctype == 6 else 255
            out.append((g * a + 255 * (255 - a)) // 255)  # over white
    return width, height, bytes(out)
