"""Bulk boxes (TTE §5.2): derived OTPs/PSKs, the box label, claiming a box in one step."""
from __future__ import annotations

import pytest

from zerotouch.protocol.errors import MalformedMessage, NotAuthorized, NotFound
from zerotouch.protocol.states import RendezvousStatus
from zerotouch.services.bulk import (BOX_PATH, BoxLabel, claim_box, derive_otp, derive_psk,
                                     make_box, parse_box_label)
from zerotouch.services.manufacturer import SECRET_FILE

from bulk_support import load_png_reader

MASTER = bytes(range(16))
OWNER = ("127.0.0.1", 8444)


def test_derivation_is_deterministic_and_per_device_and_per_master():
    assert derive_otp(MASTER, "00000001") == derive_otp(MASTER, 1)
    assert len(derive_otp(MASTER, 1)) == 8 and len(derive_psk(MASTER, 1)) == 32
    otps = {derive_otp(MASTER, i) for i in range(1, 101)}
    psks = {derive_psk(MASTER, i) for i in range(1, 101)}
    assert len(otps) == 100 and len(psks) == 100
    other = bytes(16)
    assert derive_otp(other, 1) != derive_otp(MASTER, 1)
    assert derive_psk(other, 1) != derive_psk(MASTER, 1)
    # the PSK is not the OTP stretched: distinct info strings
    assert derive_psk(MASTER, 1)[:8] != derive_otp(MASTER, 1)
    # a fixed vector pins the construction (HMAC-SHA256(master, "zt-box-otp|" || devid BE)[:8])
    import hashlib, hmac
    assert derive_otp(MASTER, 0x1234abcd) == hmac.new(
        MASTER, b"zt-box-otp|\x12\x34\xab\xcd", hashlib.sha256).digest()[:8]


def test_box_url_round_trip():
    box = BoxLabel("https://rv.example:8443", MASTER.hex(), "0000a000", "0000a009")
    assert box.url.startswith(f"https://rv.example:8443{BOX_PATH}?master=")
    assert parse_box_label(box.url) == box
    assert box.count == 10 and box.devids()[0] == "0000a000" and box.devids()[-1] == "0000a009"
    upper = box.url.replace(MASTER.hex(), MASTER.hex().upper())
    assert parse_box_label(upper) == box


@pytest.mark.parametrize("query, why", [
    (f"master={MASTER.hex()}&first=00000001&last=00002711", "at most 10000"),
    (f"master={MASTER.hex()}&first=00000010&last=0000000f", "greater than"),
    (f"master={MASTER.hex()[:-1]}z&first=00000001&last=00000002", "master"),
    (f"master={MASTER.hex()[:20]}&first=00000001&last=00000002", "master"),
    (f"master={MASTER.hex()}&first=0000001&last=00000002", "first"),
    (f"master={MASTER.hex()}&first=00000001&last=0000000g", "last"),
    (f"master={MASTER.hex()}&first=00000000&last=00000002", "reserved"),
    (f"master={MASTER.hex()}&first=00000001", "exactly one"),
    (f"master={MASTER.hex()}&master={MASTER.hex()}&first=00000001&last=00000002", "exactly one"),
])
def test_malformed_box_urls(query, why):
    with pytest.raises(MalformedMessage, match=why):
        parse_box_label(f"https://rv.example{BOX_PATH}?{query}")


@pytest.mark.parametrize("url", ["http://rv.example/.well-known/tte/box?master=00&first=1&last=2",
                                 "https://rv.example/.well-known/tte?otp=0011223344556677&devid=00000001",
                                 "", "https://rv.example/.well-known/tte/box?" + "a" * 600])
def test_malformed_box_url_shapes(url):
    with pytest.raises(MalformedMessage):
        parse_box_label(url)


async def _box(fleet, n=5):
    made = make_box(fleet.manufacturer, fleet.tmp / "factory", fleet.info, n)
    for dev in made.devices:
        await fleet.rendezvous.register(dev.registration)
    return made


async def test_box_is_claimed_in_one_step_and_every_device_onboards(fleet):
    made = await _box(fleet)
    box = made.label
    assert [d.serial for d in made.devices] == box.devids()
    assert int(box.last, 16) - int(box.first, 16) == 4 and len(box.master) >= 32
    for dev in made.devices:   # each device holds its derived OTP; its own label matches
        assert (dev.device_dir / SECRET_FILE).read_text() == derive_otp(box.master_bytes, dev.serial).hex()
        assert dev.label == box.device_label(dev.serial)
    assert (fleet.tmp / "factory" / "labels" / f"box-{box.first}-{box.last}.txt").read_text().strip() == box.url

    result = await claim_box(fleet.rendezvous, box.url, *OWNER, fleet.owner_fp_hex)
    assert result.claimed == box.devids() and not result.conflicts
    assert result.to_json()["claimed"] == 5 and result.to_json()["failed"] == 0
    for dev in made.devices:
        out = next(d for d in result.devices if d.devid == dev.serial)
        assert out.urn == dev.urn and out.outcome == "claimed"
        await fleet.gateway.register_label(box.device_label(dev.serial).url, "box device")
        await fleet.onboard(fleet.core(dev))
        rec = await fleet.store.rendezvous.get(dev.serial)
        assert rec.status is RendezvousStatus.REGISTERED


async def test_wrong_master_claims_nothing_and_counts_as_failed_attempt(fleet):
    made = await _box(fleet)
    forged = BoxLabel(made.label.rendezvous, bytes(16).hex(), made.label.first, made.label.last)
    for attempt in (1, 2):
        with pytest.raises(NotAuthorized, match="nothing was claimed"):
            await claim_box(fleet.rendezvous, forged, *OWNER, fleet.owner_fp_hex)
        assert (await fleet.store.rendezvous.get(made.label.first)).failed_claims == attempt
    for devid in made.label.devids():
        assert (await fleet.store.rendezvous.get(devid)).status is RendezvousStatus.NOT_MAPPED


async def test_range_with_unregistered_device_claims_nothing(fleet):
    made = await _box(fleet, 3)
    wider = BoxLabel(made.label.rendezvous, made.label.master, made.label.first,
                     f"{int(made.label.last, 16) + 1:08x}")
    with pytest.raises(NotFound, match="nothing was claimed"):
        await claim_box(fleet.rendezvous, wider, *OWNER, fleet.owner_fp_hex)
    for devid in made.label.devids():
        assert (await fleet.store.rendezvous.get(devid)).status is RendezvousStatus.NOT_MAPPED


async def test_bad_owner_address_claims_nothing(fleet):
    made = await _box(fleet, 2)
    with pytest.raises(MalformedMessage):
        await claim_box(fleet.rendezvous, made.label, "127.0.0.1", 8444, "not-a-fingerprint")
    for devid in made.label.devids():
        assert (await fleet.store.rendezvous.get(devid)).status is RendezvousStatus.NOT_MAPPED


async def test_one_device_already_claimed_reports_conflict_others_claimed(fleet):
    made = await _box(fleet)
    box = made.label
    taken = box.devids()[2]
    thief_fp = "ab" * 32
    await fleet.rendezvous.claim(otp_hex=box.otp(taken), devid_hex=taken, cip="203.0.113.9",
                                 cport=443, cfingerprint=thief_fp)
    result = await claim_box(fleet.rendezvous, box, *OWNER, fleet.owner_fp_hex)
    assert result.conflicts == [taken]
    assert result.claimed == [d for d in box.devids() if d != taken]
    out = next(d for d in result.devices if d.devid == taken)
    assert out.status == 409 and "already used" in out.message
    # the earlier claim stands; the others point at our owner
    assert (await fleet.store.rendezvous.get(taken)).owner_fp.hex() == thief_fp
    for devid in result.claimed:
        assert (await fleet.store.rendezvous.get(devid)).owner_fp.hex() == fleet.owner_fp_hex
    # claiming the box again: every device reports a conflict, nothing changes
    again = await claim_box(fleet.rendezvous, box, *OWNER, fleet.owner_fp_hex)
    assert again.conflicts == box.devids() and not again.claimed


def test_box_label_qr_decodes_with_ec_h(tmp_path):
    zxingcpp = pytest.importorskip("zxingcpp")
    from zerotouch.services.bulk import write_box_label
    box = BoxLabel("https://127.0.0.1:8443", (MASTER * 2).hex(), "00c0ffee", "00c0fff7")
    paths = write_box_label(box, tmp_path)
    assert paths["svg"].read_text().lstrip().startswith(("<?xml", "<svg"))
    width, height, pixels = load_png_reader()(paths["png"].read_bytes())
    found = zxingcpp.read_barcodes(memoryview(pixels).cast("B", (height, width)),
                                   formats=zxingcpp.BarcodeFormat.QRCode)
    assert len(found) == 1
    assert found[0].text == box.url and found[0].ec_level == "H"
    assert parse_box_label(found[0].text) == box


async def test_locked_device_is_reported_others_claimed(fleet):
    from zerotouch.services.rendezvous import MAX_FAILED_CLAIMS
    made = await _box(fleet, 3)
    box = made.label
    victim = box.devids()[1]
    for _ in range(MAX_FAILED_CLAIMS):
        await fleet.store.rendezvous.note_failed_claim(victim)
    result = await claim_box(fleet.rendezvous, box, *OWNER, fleet.owner_fp_hex)
    out = next(d for d in result.devices if d.devid == victim)
    assert (out.status, out.outcome) == (429, "locked")
    assert result.claimed == [d for d in box.devids() if d != victim]


async def test_wrong_box_master_spends_the_source_budget(fleet):
    if not hasattr(fleet.rendezvous, "limiter"):
        pytest.skip("rendezvous has no per-source limit")
    made = await _box(fleet, 2)
    forged = BoxLabel(made.label.rendezvous, bytes(16).hex(), made.label.first, made.label.last)
    for _ in range(fleet.rendezvous.cfg.source_failures):
        with pytest.raises(NotAuthorized):
            await claim_box(fleet.rendezvous, forged, *OWNER, fleet.owner_fp_hex, source="198.51.100.7")
    # the guesser's address is now limited, even with the right master; others are not
    with pytest.raises(Exception) as exc:
        await claim_box(fleet.rendezvous, made.label, *OWNER, fleet.owner_fp_hex, source="198.51.100.7")
    assert getattr(exc.value, "status", None) == 429
    # (the box's first device took every wrong guess and is locked, as with single claims)
    result = await claim_box(fleet.rendezvous, made.label, *OWNER, fleet.owner_fp_hex, source="192.0.2.1")
    first, second = made.label.devids()
    assert result.claimed == [second]
    assert [(d.devid, d.outcome) for d in result.devices if d.status != 200] == [(first, "locked")]
