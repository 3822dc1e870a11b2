"""OTP guessing limits held in the database (migration 0005), each test named by the attack it
stops: a per-device lock that lifts after its window (10 wrong OTPs no longer brick a device
for good), a per-source budget shared by every replica on one database (spreading guesses over
replicas gains nothing), IPv6 sources limited by /64, nothing secret stored, and a right OTP
costs one indexed read."""
from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import event

from zerotouch.protocol.errors import NotAuthorized, ProtocolError
from zerotouch.services.rendezvous import (MAX_FAILED_CLAIMS, RendezvousService, source_key)
from zerotouch.storage import open_store
from fleet import make_fleet

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _wrong(otp: str) -> str:
    return format(int(otp, 16) ^ 1, "016x")


async def _claim(rv, fleet, dev, *, otp=None, source=None):
    return await rv.claim(otp_hex=otp or dev.label.otp, devid_hex=dev.label.devid, cip="127.0.0.1",
                          cport=8444, cfingerprint=fleet.owner_fp_hex, source=source)


async def test_device_lock_lifts_after_its_window_with_retry_after(fleet):
    """The attack: 10 wrong OTPs used to lock a device for ever (denial of service on its
    owner). Now the lock holds for the window, says when it ends, and then lifts."""
    clock = Clock()
    fleet.rendezvous.cfg.clock = clock
    window = fleet.rendezvous.cfg.device_window
    dev = await fleet.make(claim=False, inventory=False)
    for i in range(MAX_FAILED_CLAIMS):
        clock.t = T0 + i
        with pytest.raises(NotAuthorized):
            await _claim(fleet.rendezvous, fleet, dev, otp=_wrong(dev.label.otp), source=f"10.1.{i}.1")
    clock.t = T0 + 100
    with pytest.raises(ProtocolError) as exc:                 # even the right OTP, while locked
        await _claim(fleet.rendezvous, fleet, dev, source="10.9.9.9")
    assert (exc.value.status, exc.value.code) == (429, "locked")
    assert exc.value.retry_after == int(window) - 100
    with pytest.raises(ProtocolError) as exc:                 # status answers nothing either
        await fleet.rendezvous.status(otp_hex=dev.label.otp, devid_hex=dev.label.devid)
    assert exc.value.status == 429
    clock.t = T0 + window - 1
    with pytest.raises(ProtocolError):
        await _claim(fleet.rendezvous, fleet, dev, source="10.9.9.9")
    clock.t = T0 + window                                    # the window is over: unlocked
    assert (await _claim(fleet.rendezvous, fleet, dev, source="10.9.9.9")).status == "mapped"


async def test_guessing_keeps_counting_in_the_next_window(fleet):
    """A guesser gets at most `device_failures` tries per window, window after window."""
    clock = Clock()
    fleet.rendezvous.cfg.clock = clock
    window = fleet.rendezvous.cfg.device_window
    dev = await fleet.make(claim=False, inventory=False)
    for w in range(2):
        clock.t = T0 + w * window
        for i in range(MAX_FAILED_CLAIMS):
            with pytest.raises(NotAuthorized):
                await _claim(fleet.rendezvous, fleet, dev, otp=_wrong(dev.label.otp),
                             source=f"10.{w}.{i}.1")
        with pytest.raises(ProtocolError) as exc:
            await _claim(fleet.rendezvous, fleet, dev, otp=_wrong(dev.label.otp), source="10.8.8.8")
        assert exc.value.code == "locked"
        rec = await fleet.store.rendezvous.get(dev.serial)
        assert (rec.failed_claims, rec.failed_since) == (MAX_FAILED_CLAIMS, T0 + w * window)


async def test_a_lock_from_before_the_migration_is_not_permanent(fleet):
    """A count written before migration 0005 has no window start: its window ended long ago."""
    dev = await fleet.make(claim=False, inventory=False)
    from sqlalchemy import update
    from zerotouch.storage.schema import rv_devices
    async with fleet.store.engine.begin() as c:
        await c.execute(update(rv_devices).where(rv_devices.c.serial == dev.serial)
                        .values(failed_claims=MAX_FAILED_CLAIMS, failed_since=None))
    assert (await _claim(fleet.rendezvous, fleet, dev)).status == "mapped"


async def test_two_replicas_on_one_database_share_the_source_budget(tmp_path, db_url):
    """The attack: a guesser spreads its guesses over every rendezvous replica behind the load
    balancer. With the count in the database, 10 misses anywhere limit it everywhere."""
    fleet = await make_fleet(tmp_path, db_url)
    other_store = await open_store(db_url)
    try:
        clock = Clock()
        fleet.rendezvous.cfg.clock = clock
        cfg_b = dataclasses.replace(fleet.rendezvous.cfg)
        replicas = [fleet.rendezvous,
                    RendezvousService(other_store.rendezvous, fleet.rendezvous.signer, cfg_b)]
        devs = [await fleet.make(claim=False, inventory=False) for _ in range(11)]
        for i, dev in enumerate(devs[:10]):                  # alternate replicas
            with pytest.raises(NotAuthorized):
                await _claim(replicas[i % 2], fleet, dev, otp=_wrong(dev.label.otp),
                             source="203.0.113.7")
        for rv in replicas:
            with pytest.raises(ProtocolError) as exc:
                await _claim(rv, fleet, devs[10], source="203.0.113.7")
            assert exc.value.status == 429 and exc.value.code == "rate_limited"
            assert exc.value.retry_after == 600
        # the per-device count is shared too: replica B sees the misses taken on replica A
        target = devs[10]
        for i in range(MAX_FAILED_CLAIMS):
            with pytest.raises(NotAuthorized):
                await _claim(replicas[i % 2], fleet, target, otp=_wrong(target.label.otp),
                             source=f"198.51.100.{i}")
        for rv in replicas:
            with pytest.raises(ProtocolError) as exc:
                await _claim(rv, fleet, target, source="192.0.2.77")
            assert exc.value.code == "locked"
        # after the source window, the address may try again on either replica
        clock.t += 600
        cfg_b.clock = clock
        assert (await _claim(replicas[1], fleet, devs[9], source="203.0.113.7")).status == "mapped"
    finally:
        await other_store.close()
        await fleet.store.close()


async def test_rotating_ipv6_addresses_inside_one_64_gains_nothing(fleet):
    """The attack: one IPv6 subscriber has 2^64 addresses; each new one would get a fresh budget."""
    fleet.rendezvous.cfg.clock = Clock()
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    devs = [await fleet.make(claim=False, inventory=False) for _ in range(11)]
    for i, dev in enumerate(devs[:10]):
        with pytest.raises(NotAuthorized):
            await _claim(fleet.rendezvous, fleet, dev, otp=_wrong(dev.label.otp),
                         source=f"2001:db8:1:2::{i + 1:x}")
    with pytest.raises(ProtocolError) as exc:
        await _claim(fleet.rendezvous, fleet, devs[10], source="2001:db8:1:2:abcd::1")
    assert exc.value.status == 429
    # the neighbouring /64 is another subscriber
    assert (await _claim(fleet.rendezvous, fleet, devs[10], source="2001:db8:1:3::1")).status == "mapped"


async def test_the_database_keeps_counts_only_never_a_guessed_otp(fleet, tmp_path):
    """The attack: someone reads the database (a backup, a replica) to learn OTPs. The limits
    store counts keyed by source address and device serial; no guessed OTP goes anywhere."""
    dev = await fleet.make(claim=False, inventory=False)
    guesses = [format(int(dev.label.otp, 16) ^ (1 << k), "016x") for k in range(5)]
    for g in guesses:
        with pytest.raises(NotAuthorized):
            await _claim(fleet.rendezvous, fleet, dev, otp=g, source="203.0.113.50")
    from sqlalchemy import select
    from zerotouch.storage.schema import rv_source_failures
    async with fleet.store.engine.connect() as c:
        rows = [tuple(r) for r in await c.execute(select(rv_source_failures))]
    assert [r[:2] for r in rows] == [("203.0.113.50", 5)]
    assert set(rv_source_failures.c.keys()) == {"source", "failures", "window_start"}
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("zt.db*"))
    for g in guesses + [dev.label.otp]:
        assert g.encode() not in raw and bytes.fromhex(g) not in raw


async def test_a_right_otp_costs_one_indexed_read_of_the_limits(fleet):
    """An installer is not slowed: a right claim reads the source's count once (primary key)
    and writes no count."""
    dev = await fleet.make(claim=False, inventory=False)
    statements: list[str] = []

    def seen(_conn, _cursor, statement, *_args):
        statements.append(" ".join(statement.split()).lower())

    event.listen(fleet.store.engine.sync_engine, "before_cursor_execute", seen)
    try:
        assert (await _claim(fleet.rendezvous, fleet, dev, source="192.0.2.60")).status == "mapped"
    finally:
        event.remove(fleet.store.engine.sync_engine, "before_cursor_execute", seen)
    limits = [s for s in statements if "rv_source_failures" in s]
    assert len(limits) == 1 and limits[0].startswith("select")
    assert "where rv_source_failures.source = ?" in limits[0]
    assert not any("failed_claims" in s and s.startswith("update") for s in statements)
