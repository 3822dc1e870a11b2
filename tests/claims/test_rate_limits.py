"""Guessing OTPs is limited per source address and per device, both counted in fixed time
windows in the database (so every replica shares them): 429 + Retry-After while limited, and
the limit lifts when the window ends."""
from __future__ import annotations

import pytest

from zerotouch.protocol.errors import NotAuthorized, ProtocolError
from zerotouch.services.rendezvous import MAX_FAILED_CLAIMS

TTE = "/.well-known/tte"


class Clock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _wrong(otp: str) -> str:
    return format(int(otp, 16) ^ 1, "016x")


async def _claim(fleet, dev, *, otp=None, source=None):
    return await fleet.rendezvous.claim(otp_hex=otp or dev.label.otp, devid_hex=dev.label.devid,
                                        cip="127.0.0.1", cport=8444, cfingerprint=fleet.owner_fp_hex,
                                        source=source)


async def test_guessing_from_one_address_is_stopped_with_429_and_retry_after(fleet):
    """The attack: one host tries OTPs across many devices (so no single device locks)."""
    clock = Clock()
    fleet.rendezvous.cfg.clock = clock
    devs = [await fleet.make(claim=False, inventory=False) for _ in range(11)]
    for dev in devs[:10]:
        with pytest.raises(NotAuthorized):
            await _claim(fleet, dev, otp=_wrong(dev.label.otp), source="203.0.113.7")
    with pytest.raises(ProtocolError) as exc:
        await _claim(fleet, devs[10], otp=_wrong(devs[10].label.otp), source="203.0.113.7")
    assert exc.value.status == 429 and exc.value.code == "rate_limited"
    assert 1 <= exc.value.retry_after <= 600
    # Even the right OTP is not checked from that address now: no oracle while limited ...
    with pytest.raises(ProtocolError) as exc:
        await _claim(fleet, devs[10], source="203.0.113.7")
    assert exc.value.status == 429
    # ... and the refused guess was not counted against the device.
    assert (await fleet.store.rendezvous.get(devs[10].serial)).failed_claims == 0
    # A fresh source claims another device with its right OTP.
    result = await _claim(fleet, devs[10], source="198.51.100.9")
    assert result.status == "mapped"
    # Not before the window ends ...
    clock.t += exc.value.retry_after - 1
    with pytest.raises(ProtocolError) as exc:
        await _claim(fleet, devs[0], source="203.0.113.7")
    assert exc.value.status == 429
    # ... but after Retry-After seconds the address may try again.
    clock.t += exc.value.retry_after
    await fleet.rendezvous.status(otp_hex=devs[0].label.otp, devid_hex=devs[0].label.devid,
                                  source="203.0.113.7")


async def test_probing_unknown_devids_costs_tokens_too(fleet):
    fleet.rendezvous.cfg.clock = Clock()
    for i in range(10):
        with pytest.raises(ProtocolError) as exc:
            await fleet.rendezvous.status(otp_hex="00" * 8, devid_hex=f"ffff{i:04x}", source="192.0.2.1")
        assert exc.value.status == 404
    with pytest.raises(ProtocolError) as exc:
        await fleet.rendezvous.status(otp_hex="00" * 8, devid_hex="ffffff00", source="192.0.2.1")
    assert exc.value.status == 429


async def test_right_otps_never_spend_the_budget(fleet):
    """An installer claiming a whole pallet from one phone is never limited."""
    devs = [await fleet.make(claim=False, inventory=False) for _ in range(15)]
    for dev in devs:
        assert (await _claim(fleet, dev, source="192.0.2.50")).status == "mapped"


async def test_guessing_one_device_from_many_addresses_locks_that_device_only(fleet):
    """The attack: a botnet spreads guesses for one device over many addresses."""
    target = await fleet.make(claim=False, inventory=False)
    other = await fleet.make(claim=False, inventory=False)
    for i in range(MAX_FAILED_CLAIMS):
        with pytest.raises(NotAuthorized):
            await _claim(fleet, target, otp=_wrong(target.label.otp), source=f"10.0.{i}.1")
    with pytest.raises(ProtocolError) as exc:
        await _claim(fleet, target, source="10.9.9.9")          # even the right OTP
    assert exc.value.status == 429 and exc.value.code == "locked"
    assert (await fleet.store.rendezvous.get(target.serial)).status.value == "not_mapped"
    assert (await _claim(fleet, other, source="10.9.9.9")).status == "mapped"


async def test_http_adapter_limits_by_request_remote(sq_servers):
    s = sq_servers
    devs = [await s.fleet.make(claim=False, inventory=False) for _ in range(11)]
    body = {"cip": "127.0.0.1", "cport": s.gw_port, "cfingerprint": s.fleet.owner_fp_hex}
    for dev in devs[:10]:
        status, _h, _b = await s.request("POST", f"{s.rv_url}{TTE}",
                                         params={"otp": _wrong(dev.label.otp), "devid": dev.label.devid},
                                         json=body)
        assert status == 403
    status, headers, raw = await s.request("POST", f"{s.rv_url}{TTE}",
                                           params={"otp": devs[10].label.otp, "devid": devs[10].label.devid},
                                           json=body)
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert b"too many wrong OTPs" in raw
    assert (await s.store.rendezvous.source_failures("127.0.0.1"))[0] == 10
