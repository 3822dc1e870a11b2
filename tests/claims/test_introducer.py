"""The introducer: claim from a URL or a photo, tell the gateway (notice), warn on a used OTP,
and show a label's status."""
from __future__ import annotations

import pytest

from zerotouch.introducer.claim import ClaimRefused, Owner, claim_device, label_status, resolve_label
from zerotouch.protocol.errors import MalformedMessage

from http_harness import ADMIN_TOKEN
from images import png_grey, qr_pixels, transform


def _owner(s, fp=None) -> Owner:
    return Owner(address="127.0.0.1", port=s.gw_port, fingerprint=fp or s.fleet.owner_fp_hex,
                 gateway_url=s.gw_url, admin_token=ADMIN_TOKEN, gateway_ca_pem=s.gw_ca_pem)


async def test_claim_from_a_photo_sends_the_notice(sq_servers, tmp_path):
    s = sq_servers
    dev = await s.fleet.make(claim=False, inventory=False)
    url = dev.label.url.replace("https://127.0.0.1:8443", s.rv_url)
    photo = tmp_path / "label.png"
    photo.write_bytes(png_grey(transform(qr_pixels(url, scale=5)[2], angle_deg=-20, noise=25)))
    result = await claim_device(str(photo), _owner(s), rendezvous_ca_pem=s.rv_ca_pem,
                                description="BLD30/2/361 - Thermostat")
    assert result["claim"]["status"] == "mapped"
    inv = await s.store.inventory.get(dev.serial)
    assert inv.description == "BLD30/2/361 - Thermostat" and inv.idevid_fp.hex() == result["claim"]["fingerprint"]
    assert (await label_status(url, rendezvous_ca_pem=s.rv_ca_pem))["status"] == "mapped"


async def test_used_otp_warnings_tell_our_claim_from_a_stolen_one(sq_servers):
    s = sq_servers
    dev = await s.fleet.make(claim=False, inventory=False)
    url = dev.label.url.replace("https://127.0.0.1:8443", s.rv_url)
    await claim_device(url, _owner(s), rendezvous_ca_pem=s.rv_ca_pem)
    with pytest.raises(ClaimRefused) as exc:
        await claim_device(url, _owner(s), rendezvous_ca_pem=s.rv_ca_pem)
    assert exc.value.code == "already_claimed_by_you" and "already used" in exc.value.message
    # a stolen label claimed by a thief first: the real installer is told loudly
    stolen = await s.fleet.make(claim=False, inventory=False)
    surl = stolen.label.url.replace("https://127.0.0.1:8443", s.rv_url)
    await claim_device(surl, Owner(address="198.51.100.66", port=1, fingerprint="ab" * 32),
                       rendezvous_ca_pem=s.rv_ca_pem)
    with pytest.raises(ClaimRefused) as exc:
        await claim_device(surl, _owner(s), rendezvous_ca_pem=s.rv_ca_pem)
    assert exc.value.code == "already_claimed" and "ANOTHER owner" in exc.value.message
    assert "stolen OTP" in exc.value.message and "198.51.100.66" in exc.value.message
    assert await s.store.inventory.get(stolen.serial) is None


def test_resolve_label_refuses_what_is_neither(tmp_path):
    with pytest.raises(MalformedMessage):
        resolve_label(str(tmp_path / "nothing.png"))
    assert resolve_label("https://h/.well-known/tte?otp=0011223344556677&devid=A1B2C3D4").endswith("devid=a1b2c3d4")
