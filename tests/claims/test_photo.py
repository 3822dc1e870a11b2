"""`decode_label_photo`: the label URL from a photo of its QR code (zxing-cpp)."""
from __future__ import annotations

import io

import pytest

from zerotouch.introducer import photo
from zerotouch.introducer.photo import PhotoError, decode_label_bytes, decode_label_photo

from images import png_grey, qr_pixels, side_by_side, transform

LABEL = "https://127.0.0.1:8443/.well-known/tte?otp=0011223344556677&devid=a1b2c3d4"


@pytest.fixture(params=["pillow", "builtin-png"])
def loader(request, monkeypatch):
    if request.param == "builtin-png":
        import builtins
        real = builtins.__import__

        def no_pil(name, *a, **kw):
            if name == "PIL" or name.startswith("PIL."):
                raise ImportError("no Pillow here")
            return real(name, *a, **kw)
        monkeypatch.setattr(builtins, "__import__", no_pil)
    else:
        pytest.importorskip("PIL")
    return request.param


async def test_the_manufacturers_own_label_png(fleet, loader):
    dev = await fleet.make(claim=False, inventory=False)
    png = fleet.tmp / "factory" / "labels" / f"{dev.serial}.png"
    assert decode_label_photo(png) == dev.label.url


@pytest.mark.parametrize("angle, zoom, noise", [(0, 0.5, 0), (17, 1.0, 0), (90, 1.3, 0),
                                                (-33, 0.8, 60), (180, 1.0, 90)])
def test_scaled_rotated_noisy_label(tmp_path, loader, angle, zoom, noise):
    _w, _h, rows = qr_pixels(LABEL, scale=6)
    p = tmp_path / "photo.png"
    p.write_bytes(png_grey(transform(rows, angle_deg=angle, zoom=zoom, noise=noise)))
    assert decode_label_photo(p) == LABEL


def test_jpeg_photo_with_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    _w, _h, rows = qr_pixels(LABEL, scale=6)
    rows = transform(rows, angle_deg=8, noise=20)
    img = Image.frombytes("L", (len(rows[0]), len(rows)), bytes(v for r in rows for v in r)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70)
    (tmp_path / "p.jpg").write_bytes(buf.getvalue())
    assert decode_label_photo(tmp_path / "p.jpg") == LABEL


def test_image_without_a_code(tmp_path, loader):
    p = tmp_path / "blank.png"
    p.write_bytes(png_grey(transform([[255] * 50 for _ in range(50)], noise=40)))
    with pytest.raises(PhotoError, match="no QR code"):
        decode_label_photo(p)


def test_two_codes_are_refused(tmp_path, loader):
    other = LABEL.replace("a1b2c3d4", "deadbeef")
    img = side_by_side(qr_pixels(LABEL, scale=5)[2], qr_pixels(other, scale=5)[2])
    with pytest.raises(PhotoError, match="2 QR codes"):
        decode_label_bytes(png_grey(img))


@pytest.mark.parametrize("text", ["http://example.com/", "https://evil.example/.well-known/tte?otp=1&devid=2",
                                  "WIFI:S:net;T:WPA;P:secret;;"])
def test_a_code_that_is_not_a_label(loader, text):
    with pytest.raises(PhotoError, match="not a device label"):
        decode_label_bytes(png_grey(qr_pixels(text, scale=6)[2]))


def test_not_an_image_and_missing_file(tmp_path, loader):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnonsense")
    with pytest.raises(PhotoError):
        decode_label_photo(tmp_path / "x.png")
    with pytest.raises(PhotoError, match="cannot read"):
        decode_label_photo(tmp_path / "missing.png")


def test_too_many_pixels_is_refused(monkeypatch, loader):
    monkeypatch.setattr(photo, "MAX_PIXELS", 100)
    with pytest.raises(PhotoError, match="pixels"):
        decode_label_bytes(png_grey(qr_pixels(LABEL, scale=2)[2]))
