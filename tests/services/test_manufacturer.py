"""Manufacturer: device identity, IDevID, N_device, label (text, PNG and SVG QR) and the signed
registration the rendezvous accepts — and refuses when it comes from someone else."""
from __future__ import annotations

import dataclasses
import os
import re
import stat
import struct
import zlib
from pathlib import Path
from xml.etree import ElementTree

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from zerotouch.pki.ca import DEVICE_URN_PREFIX, device_identity, verify_device_chain
from zerotouch.pki.keys import (cert_der, generate_p256, load_private_key, public_key_der,
                                public_key_pem)
from zerotouch.protocol import cose
from zerotouch.protocol.codec import MAX_MESSAGE
from zerotouch.protocol.errors import MalformedMessage, NotAuthorized
from zerotouch.protocol.messages import RvRegister
from zerotouch.protocol.proofs import otp_hash
from zerotouch.protocol.tte import parse_label
from zerotouch.services import manufacturer as manufacturer_mod
from zerotouch.services.manufacturer import (FACTORY_FILE, SECRET_FILE, Manufacturer,
                                             RendezvousInfo, read_factory)
from zerotouch.util import files



RV_URL = "https://127.0.0.1:8443"
LABEL_RE = re.compile(r"https://127\.0\.0\.1:8443/\.well-known/tte\?otp=([0-9a-f]{16})&devid=([0-9a-f]{8})")


@pytest.fixture
def rv_info() -> RendezvousInfo:
    return RendezvousInfo(url=RV_URL, key_pem=public_key_pem(generate_p256().public_key()).decode(),
                          tls_ca_pem="")


@pytest.fixture
def maker(tmp_path) -> Manufacturer:
    return Manufacturer(tmp_path / "manufacturer")




def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def decode_png_gray(data: bytes) -> tuple[int, int, bytes]:
    """A minimal PNG reader (greyscale or palette, 1–8 bit, not interlaced) -> 8-bit grey
    pixels, so the QR can be decoded without Pillow."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, palette = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        if kind == b"IHDR":
            width, height, depth, ctype, _comp, _filt, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = [body[i:i + 3] for i in range(0, len(body), 3)]
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert ctype in (0, 3) and depth in (1, 2, 4, 8) and interlace == 0, (ctype, depth, interlace)
    raw = zlib.decompress(idat)
    stride = (width * depth + 7) // 8
    bpp = 1
    prev = bytearray(stride)
    out = bytearray()
    for row in range(height):
        ftype, line = raw[row * (stride + 1)], bytearray(raw[row * (stride + 1) + 1:(row + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        maxval = (1 << depth) - 1
        for x in range(width):
            bit = x * depth
            v = (line[bit // 8] >> (8 - depth - bit % 8)) & maxval
            if palette is not None:
                out.append(sum(palette[v]) // 3)
            else:
                out.append(v * 255 // maxval)
        prev = line
    return width, height, bytes(out)


# --- the device's identity -------------------------------------------------------------------
def test_idevid_chains_to_the_manufacturer_ca_and_names_the_device(maker, tmp_path, rv_info):
    dev = maker.make_device(tmp_path / "factory", rv_info)
    d = dev.device_dir
    idevid = x509.load_pem_x509_certificate((d / "idevid.pem").read_bytes())
    verify_device_chain(idevid, [maker.ca.cert])
    idevid.verify_directly_issued_by(maker.ca.cert)
    assert idevid.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == dev.serial
    san = idevid.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"{DEVICE_URN_PREFIX}{dev.serial}"]
    assert device_identity(idevid) == (dev.serial, dev.urn)
    assert idevid.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ExtendedKeyUsageOID.CLIENT_AUTH in idevid.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    key = load_private_key(d / "idevid.key")
    assert public_key_der(key.public_key()) == public_key_der(idevid.public_key())
    # the device trusts the same manufacturer CA, and knows its rendezvous
    assert (d / "manufacturer-ca.pem").read_bytes() == maker.ca_pem
    factory = read_factory(d)
    assert factory["serial"] == dev.serial and factory["urn"] == dev.urn
    assert factory["rendezvous_url"] == RV_URL and factory["rendezvous_key_pem"] == rv_info.key_pem
    assert (d / SECRET_FILE).read_text() not in (d / FACTORY_FILE).read_text()


def test_secrets_are_owner_only(maker, tmp_path, rv_info):
    dev = maker.make_device(tmp_path / "factory", rv_info)
    d = dev.device_dir
    assert mode_of(d / "idevid.key") == 0o600
    assert mode_of(d / SECRET_FILE) == 0o600
    assert mode_of(d) & 0o077 == 0
    assert mode_of(maker.dir / "manufacturer-ca.key") == 0o600


def test_n_device_has_64_bits_and_is_the_label_otp(maker, tmp_path, rv_info):
    dev = maker.make_device(tmp_path / "factory", rv_info)
    text = (dev.device_dir / SECRET_FILE).read_text()
    assert re.fullmatch(r"[0-9a-f]{16}", text)
    assert len(bytes.fromhex(text)) * 8 == 64
    assert dev.label.otp == text
    other = maker.make_device(tmp_path / "factory", rv_info)
    assert (other.device_dir / SECRET_FILE).read_text() != text


def test_devids_are_8_hex_digits_unique_and_never_zero(maker, tmp_path, rv_info, monkeypatch):
    # Labels and fsync do not take part in choosing IDs; leave them out to keep this fast.
    monkeypatch.setattr(manufacturer_mod, "write_label", lambda label, labels_dir: {})
    monkeypatch.setattr(files.os, "fsync", lambda fd: None)
    serials = [maker.make_device(tmp_path / "factory", rv_info).serial for _ in range(200)]
    assert all(re.fullmatch(r"[0-9a-f]{8}", s) for s in serials)
    assert "00000000" not in serials
    assert len(set(serials)) == 200


def test_devid_zero_and_ids_already_made_are_skipped(maker, tmp_path, rv_info, monkeypatch):
    real = os.urandom
    draws = iter([bytes.fromhex("deadbeef"),
                  bytes.fromhex("00000000"), bytes.fromhex("deadbeef"), bytes.fromhex("0badcafe")])

    def urandom(n):
        return next(draws) if n == 4 else real(n)

    monkeypatch.setattr(manufacturer_mod.os, "urandom", urandom)
    first = maker.make_device(tmp_path / "factory", rv_info)
    second = maker.make_device(tmp_path / "factory", rv_info)
    assert (first.serial, second.serial) == ("deadbeef", "0badcafe")


# --- the label -------------------------------------------------------------------------------
def test_label_is_the_tte_url_as_text_png_and_svg(maker, tmp_path, rv_info):
    dev = maker.make_device(tmp_path / "factory", rv_info)
    labels = tmp_path / "factory" / "labels"
    text = (labels / f"{dev.serial}.txt").read_text()
    assert text.endswith("\n")
    url = text.strip()
    m = LABEL_RE.fullmatch(url)
    assert m, url
    assert m.groups() == ((dev.device_dir / SECRET_FILE).read_text(), dev.serial)
    assert url == dev.label.url
    assert parse_label(url) == dev.label
    png = (labels / f"{dev.serial}.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    svg = ElementTree.parse(labels / f"{dev.serial}.svg").getroot()
    assert svg.tag.endswith("svg")


def test_qr_code_encodes_exactly_the_url_with_error_correction_h(maker, tmp_path, rv_info):
    zxingcpp = pytest.importorskip("zxingcpp", reason="pip install 'zxing-cpp>=2.2,<3'")
    dev = maker.make_device(tmp_path / "factory", rv_info)
    width, height, pixels = decode_png_gray(
        (tmp_path / "factory" / "labels" / f"{dev.serial}.png").read_bytes())
    image = memoryview(pixels).cast("B", (height, width))
    found = zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode)
    assert len(found) == 1
    qr = found[0]
    assert qr.valid and qr.format == zxingcpp.BarcodeFormat.QRCode
    assert qr.text == dev.label.url
    assert qr.bytes == dev.label.url.encode()
    assert qr.ec_level == "H"


# --- the registration ------------------------------------------------------------------------
def test_registration_is_signed_and_carries_no_otp(maker, tmp_path, rv_info):
    dev = maker.make_device(tmp_path / "factory", rv_info)
    n_device = bytes.fromhex((dev.device_dir / SECRET_FILE).read_text())
    signed = cose.parse_sign1(dev.registration, max_size=MAX_MESSAGE)
    assert signed.x5chain == [cert_der(maker.ca.cert)]
    reg = RvRegister.decode(signed.verify(maker.ca.cert.public_key()))
    assert (reg.serial, reg.urn) == (dev.serial, dev.urn)
    idevid = x509.load_pem_x509_certificate((dev.device_dir / "idevid.pem").read_bytes())
    assert reg.idevid == cert_der(idevid)
    assert len(reg.otp_salt) == 16
    assert reg.otp_hash == otp_hash(n_device, reg.otp_salt)
    # the OTP itself appears nowhere, neither as bytes nor as its hex text
    for needle in (n_device, n_device.hex().encode(), n_device.hex().upper().encode()):
        assert needle not in dev.registration
        assert needle not in signed.payload
    # salted: two devices never share a salt
    other = maker.make_device(tmp_path / "factory", rv_info)
    other_reg = RvRegister.decode(cose.parse_sign1(other.registration, max_size=MAX_MESSAGE).payload)
    assert other_reg.otp_salt != reg.otp_salt


async def test_rendezvous_accepts_the_registration(fleet):
    dev = fleet.manufacturer.make_device(fleet.tmp / "factory", fleet.info)
    rec = await fleet.rendezvous.register(dev.registration)
    assert (rec.serial, rec.urn) == (dev.serial, dev.urn)
    stored = await fleet.store.rendezvous.get(dev.serial)
    n_device = bytes.fromhex((dev.device_dir / SECRET_FILE).read_text())
    assert n_device not in stored.otp_hash + stored.otp_salt + stored.idevid_der


async def test_rendezvous_refuses_a_registration_by_another_manufacturer(fleet, tmp_path):
    rogue = Manufacturer(tmp_path / "rogue", name="rogue manufacturer")
    dev = rogue.make_device(tmp_path / "rogue-factory", fleet.info)
    with pytest.raises(NotAuthorized):
        await fleet.rendezvous.register(dev.registration)
    assert await fleet.store.rendezvous.get(dev.serial) is None


async def test_rendezvous_refuses_a_foreign_idevid_signed_by_a_known_manufacturer(fleet, tmp_path):
    """Our manufacturer's signature around an IDevID from another CA: the chain check fails."""
    rogue = Manufacturer(tmp_path / "rogue", name="rogue manufacturer")
    foreign = rogue.make_device(tmp_path / "rogue-factory", fleet.info)
    reg = RvRegister.decode(cose.parse_sign1(foreign.registration, max_size=MAX_MESSAGE).payload)
    resigned = cose.sign1(reg.encode(), cose.SoftwareSigner(fleet.manufacturer.ca.key),
                          x5chain=[cert_der(fleet.manufacturer.ca.cert)])
    with pytest.raises(NotAuthorized):
        await fleet.rendezvous.register(resigned)
    assert await fleet.store.rendezvous.get(foreign.serial) is None


@pytest.mark.parametrize("field", ["serial", "urn"])
async def test_rendezvous_refuses_a_registration_whose_idevid_names_another_device(fleet, field):
    dev = fleet.manufacturer.make_device(fleet.tmp / "factory", fleet.info)
    victim = fleet.manufacturer.make_device(fleet.tmp / "factory", fleet.info)
    reg = RvRegister.decode(cose.parse_sign1(dev.registration, max_size=MAX_MESSAGE).payload)
    lie = {"serial": victim.serial} if field == "serial" else {"urn": victim.urn}
    forged = dataclasses.replace(reg, **lie)
    signed = cose.sign1(forged.encode(), cose.SoftwareSigner(fleet.manufacturer.ca.key),
                        x5chain=[cert_der(fleet.manufacturer.ca.cert)])
    with pytest.raises(MalformedMessage, match="another device than its IDevID"):
        await fleet.rendezvous.register(signed)
    assert await fleet.store.rendezvous.get(victim.serial) is None
    assert await fleet.store.rendezvous.get(dev.serial) is None
    # the honest registration still goes through afterwards
    await fleet.rendezvous.register(dev.registration)
    assert (await fleet.store.rendezvous.get(dev.serial)).serial == dev.serial
