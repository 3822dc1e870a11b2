"""One contract for the repositories of `storage/base.py`, run on every implementation.

`db_url` (tests/conftest.py) gives a fresh SQLite file or a fresh PostgreSQL schema. The
concurrency tests use `asyncio.gather` on one store: the requests share the engine's pool and
really do run at the same time on PostgreSQL (and queue on SQLite's write lock).
"""
from __future__ import annotations

import asyncio
import os

import pytest

from zerotouch.protocol.errors import Conflict
from zerotouch.protocol.states import InventoryState, RendezvousStatus, SessionState
from zerotouch.storage import open_store
from zerotouch.storage.base import InventoryRecord, RvDeviceRecord, SessionRecord

NOW = 1_750_000_000.0


@pytest.fixture
async def store(db_url):
    st = await open_store(db_url)
    try:
        yield st
    finally:
        await st.close()


def rv_record(serial: str = "0a1b2c3d", **kw) -> RvDeviceRecord:
    return RvDeviceRecord(serial=serial, urn=f"urn:dev:zerotouch:{serial}",
                          idevid_der=b"\x30\x82" + os.urandom(40), otp_salt=os.urandom(16),
                          otp_hash=os.urandom(32), created_at=NOW, **kw)


def session_record(serial: str = "0a1b2c3d", *, expires: float = NOW + 120,
                   state: SessionState = SessionState.CHALLENGED) -> SessionRecord:
    return SessionRecord(id=os.urandom(16), serial=serial, nonce=os.urandom(16),
                         challenge=os.urandom(16), idevid_fp=os.urandom(32), state=state,
                         expires=expires)


# --- rendezvous ------------------------------------------------------------------------------
async def test_rendezvous_add_get_round_trip(store):
    rec = rv_record()
    await store.rendezvous.add(rec)
    got = await store.rendezvous.get(rec.serial)
    assert got == rec
    assert got.status is RendezvousStatus.NOT_MAPPED and got.failed_claims == 0
    assert isinstance(got.idevid_der, bytes)
    assert await store.rendezvous.get("ffffffff") is None


async def test_rendezvous_duplicate_add_is_a_conflict_and_keeps_the_original(store):
    first = rv_record()
    await store.rendezvous.add(first)
    with pytest.raises(Conflict) as err:
        await store.rendezvous.add(rv_record(first.serial))
    assert err.value.status == 409
    assert await store.rendezvous.get(first.serial) == first


async def test_rendezvous_claim_maps_once(store):
    await store.rendezvous.add(rv_record())
    fp = os.urandom(32)
    assert await store.rendezvous.claim("0a1b2c3d", "https://gw.example:8444", fp, NOW + 1)
    assert not await store.rendezvous.claim("0a1b2c3d", "https://evil.example", os.urandom(32), NOW + 2)
    got = await store.rendezvous.get("0a1b2c3d")
    assert got.status is RendezvousStatus.MAPPED
    assert (got.gateway_url, got.owner_fp, got.claimed_at) == ("https://gw.example:8444", fp, NOW + 1)
    assert not await store.rendezvous.claim("ffffffff", "https://gw.example", fp, NOW)


async def test_rendezvous_concurrent_claims_have_exactly_one_winner(store):
    await store.rendezvous.add(rv_record())
    owners = [(f"https://owner{i}.example:8444", os.urandom(32)) for i in range(10)]
    results = await asyncio.gather(*[store.rendezvous.claim("0a1b2c3d", url, fp, NOW + i)
                                     for i, (url, fp) in enumerate(owners)])
    assert results.count(True) == 1
    winner = owners[results.index(True)]
    got = await store.rendezvous.get("0a1b2c3d")
    assert (got.gateway_url, got.owner_fp) == winner      # the mapping is the winner's, whole
    assert got.status is RendezvousStatus.MAPPED


async def test_rendezvous_claim_does_not_touch_other_statuses(store):
    await store.rendezvous.add(rv_record(status=RendezvousStatus.REVOKED))
    assert not await store.rendezvous.claim("0a1b2c3d", "https://gw.example", os.urandom(32), NOW)
    got = await store.rendezvous.get("0a1b2c3d")
    assert got.status is RendezvousStatus.REVOKED and got.gateway_url is None


async def test_rendezvous_set_status_is_compare_and_set(store):
    await store.rendezvous.add(rv_record())
    # wrong expected old status: nothing changes
    assert not await store.rendezvous.set_status("0a1b2c3d", RendezvousStatus.MAPPED,
                                                 RendezvousStatus.REGISTERED, NOW)
    got = await store.rendezvous.get("0a1b2c3d")
    assert got.status is RendezvousStatus.NOT_MAPPED and got.registered_at is None
    await store.rendezvous.claim("0a1b2c3d", "https://gw.example", os.urandom(32), NOW)
    assert await store.rendezvous.set_status("0a1b2c3d", RendezvousStatus.MAPPED,
                                             RendezvousStatus.REGISTERED, NOW + 5)
    got = await store.rendezvous.get("0a1b2c3d")
    assert got.status is RendezvousStatus.REGISTERED and got.registered_at == NOW + 5
    assert not await store.rendezvous.set_status("ffffffff", RendezvousStatus.MAPPED,
                                                 RendezvousStatus.REGISTERED, NOW)


async def test_rendezvous_concurrent_set_status_has_exactly_one_winner(store):
    await store.rendezvous.add(rv_record(status=RendezvousStatus.MAPPED))
    results = await asyncio.gather(*[store.rendezvous.set_status(
        "0a1b2c3d", RendezvousStatus.MAPPED, RendezvousStatus.REVOKED, NOW) for _ in range(10)])
    assert results.count(True) == 1
    assert (await store.rendezvous.get("0a1b2c3d")).status is RendezvousStatus.REVOKED


async def test_rendezvous_failed_claims_count_without_lost_updates(store):
    await store.rendezvous.add(rv_record())
    await store.rendezvous.add(rv_record("ffffffff"))
    await asyncio.gather(*[store.rendezvous.note_failed_claim("0a1b2c3d") for _ in range(10)])
    assert (await store.rendezvous.get("0a1b2c3d")).failed_claims == 10
    assert (await store.rendezvous.get("ffffffff")).failed_claims == 0
    await store.rendezvous.note_failed_claim("00000000")        # unknown: no error, no row
    assert await store.rendezvous.get("00000000") is None


async def test_rendezvous_failed_claims_window_restarts_after_it_ends(store):
    await store.rendezvous.add(rv_record())
    for i in range(3):
        await store.rendezvous.note_failed_claim("0a1b2c3d", NOW + i, 600.0)
    got = await store.rendezvous.get("0a1b2c3d")
    assert (got.failed_claims, got.failed_since) == (3, NOW)
    await asyncio.gather(*[store.rendezvous.note_failed_claim("0a1b2c3d", NOW + 599, 600.0)
                           for _ in range(10)])            # inside the window: no lost updates
    assert (await store.rendezvous.get("0a1b2c3d")).failed_claims == 13
    await store.rendezvous.note_failed_claim("0a1b2c3d", NOW + 600, 600.0)   # window over
    got = await store.rendezvous.get("0a1b2c3d")
    assert (got.failed_claims, got.failed_since) == (1, NOW + 600)


async def test_rendezvous_source_failures_are_shared_counts_in_a_window(store):
    assert await store.rendezvous.source_failures("203.0.113.7") is None
    counts = await asyncio.gather(*[store.rendezvous.note_source_failure("203.0.113.7", NOW, 600.0)
                                    for _ in range(10)])
    assert sorted(counts) == list(range(1, 11))          # atomic: every caller saw its own count
    assert await store.rendezvous.source_failures("203.0.113.7") == (10, NOW)
    assert await store.rendezvous.note_source_failure("2001:db8::/64", NOW + 1, 600.0) == 1
    # the window restarts once it is over
    assert await store.rendezvous.note_source_failure("203.0.113.7", NOW + 600, 600.0) == 1
    assert await store.rendezvous.source_failures("203.0.113.7") == (1, NOW + 600)
    # pruning forgets windows that began before the cut-off, keeps the others
    assert await store.rendezvous.prune_source_failures(NOW + 300) == 1
    assert await store.rendezvous.source_failures("2001:db8::/64") is None
    assert await store.rendezvous.source_failures("203.0.113.7") == (1, NOW + 600)


async def test_rendezvous_count_by_status(store):
    assert await store.rendezvous.count_by_status() == {}
    for i, status in enumerate([RendezvousStatus.NOT_MAPPED, RendezvousStatus.NOT_MAPPED,
                                RendezvousStatus.MAPPED, RendezvousStatus.REVOKED]):
        await store.rendezvous.add(rv_record(f"0000000{i}", status=status))
    assert await store.rendezvous.count_by_status() == {"not_mapped": 2, "mapped": 1, "revoked": 1}


# --- inventory -------------------------------------------------------------------------------
async def test_inventory_add_get_and_duplicate_leaves_the_original(store):
    rec = InventoryRecord(serial="0a1b2c3d", description="rack 4", created_at=NOW)
    assert await store.inventory.add(rec) is True
    assert await store.inventory.get("0a1b2c3d") == rec
    assert await store.inventory.add(InventoryRecord(serial="0a1b2c3d", description="forged",
                                                     state=InventoryState.ONBOARDED,
                                                     created_at=NOW + 9)) is False
    assert await store.inventory.get("0a1b2c3d") == rec
    assert await store.inventory.get("ffffffff") is None


async def test_inventory_concurrent_adds_have_exactly_one_winner(store):
    recs = [InventoryRecord(serial="0a1b2c3d", description=f"copy {i}", created_at=NOW)
            for i in range(10)]
    results = await asyncio.gather(*[store.inventory.add(r) for r in recs])
    assert results.count(True) == 1
    assert (await store.inventory.get("0a1b2c3d")).description == recs[results.index(True)].description


async def test_inventory_update_and_list(store):
    for serial in ("0000000c", "0000000a", "0000000b"):
        await store.inventory.add(InventoryRecord(serial=serial, created_at=NOW))
    fp = os.urandom(32)
    await store.inventory.update("0000000a", state=InventoryState.ONBOARDED, idevid_fp=fp,
                                 ldevid_serial="abc", onboarded_at=NOW + 1, last_error=None)
    got = await store.inventory.get("0000000a")
    assert got.state is InventoryState.ONBOARDED and got.idevid_fp == fp
    assert (got.ldevid_serial, got.onboarded_at) == ("abc", NOW + 1)
    await store.inventory.update("0000000a", state="revoked")       # a plain value is accepted
    assert (await store.inventory.get("0000000a")).state is InventoryState.REVOKED
    with pytest.raises(ValueError):
        await store.inventory.update("0000000a", state="bogus")
    assert (await store.inventory.get("0000000a")).state is InventoryState.REVOKED
    await store.inventory.update("ffffffff", state=InventoryState.ONBOARDED)   # unknown: no row
    assert await store.inventory.get("ffffffff") is None
    listed = await store.inventory.list()
    assert [r.serial for r in listed] == ["0000000a", "0000000b", "0000000c"]
    assert [r.serial for r in await store.inventory.list(limit=2)] == ["0000000a", "0000000b"]
    assert (await store.inventory.get("0000000b")).state is InventoryState.EXPECTED


# --- sessions ----------------------------------------------------------------------------------
async def test_session_create_get_round_trip(store):
    rec = session_record()
    await store.sessions.create(rec)
    assert await store.sessions.get(rec.id) == rec
    assert await store.sessions.get(os.urandom(16)) is None


async def test_session_advance_is_compare_and_set(store):
    rec = session_record()
    await store.sessions.create(rec)
    assert not await store.sessions.advance(rec.id, SessionState.CREDENTIALED, SessionState.DONE)
    assert (await store.sessions.get(rec.id)).state is SessionState.CHALLENGED
    assert await store.sessions.advance(rec.id, SessionState.CHALLENGED, SessionState.CREDENTIALED,
                                        ldevid_der=b"cert")
    got = await store.sessions.get(rec.id)
    assert got.state is SessionState.CREDENTIALED and got.ldevid_der == b"cert"
    assert not await store.sessions.advance(rec.id, SessionState.CHALLENGED, SessionState.CREDENTIALED,
                                            ldevid_der=b"other")
    assert (await store.sessions.get(rec.id)).ldevid_der == b"cert"   # the loser wrote nothing
    assert not await store.sessions.advance(os.urandom(16), SessionState.CHALLENGED,
                                            SessionState.CREDENTIALED)


async def test_session_concurrent_advance_has_exactly_one_winner(store):
    rec = session_record()
    other = session_record()
    await store.sessions.create(rec)
    await store.sessions.create(other)
    results = await asyncio.gather(*[store.sessions.advance(
        rec.id, SessionState.CHALLENGED, SessionState.CREDENTIALED, ldevid_der=bytes([i]))
        for i in range(10)])
    assert results.count(True) == 1
    got = await store.sessions.get(rec.id)
    assert got.state is SessionState.CREDENTIALED
    assert got.ldevid_der == bytes([results.index(True)])
    assert (await store.sessions.get(other.id)).state is SessionState.CHALLENGED


async def test_session_delete_expired(store):
    expired = [session_record(expires=NOW - 1), session_record(expires=NOW - 500)]
    alive = [session_record(expires=NOW + 1), session_record(expires=NOW)]   # `expires < now`
    for rec in expired + alive:
        await store.sessions.create(rec)
    assert await store.sessions.delete_expired(NOW) == 2
    for rec in expired:
        assert await store.sessions.get(rec.id) is None
    for rec in alive:
        assert await store.sessions.get(rec.id) == rec
    assert await store.sessions.delete_expired(NOW) == 0


async def test_session_start_creates_it_and_marks_the_device_onboarding(store):
    await store.inventory.add(InventoryRecord(serial="0a1b2c3d", created_at=NOW, last_error="old"))
    await store.inventory.add(InventoryRecord(serial="ffffffff", created_at=NOW))
    rec = session_record("0a1b2c3d")
    await store.sessions.start(rec)
    assert await store.sessions.get(rec.id) == rec
    inv = await store.inventory.get("0a1b2c3d")
    assert inv.state is InventoryState.ONBOARDING
    assert inv.idevid_fp == rec.idevid_fp and inv.last_error is None
    assert (await store.inventory.get("ffffffff")).state is InventoryState.EXPECTED


async def test_session_start_with_a_duplicate_id_changes_nothing(store):
    await store.inventory.add(InventoryRecord(serial="0a1b2c3d", created_at=NOW))
    first = session_record("0a1b2c3d")
    await store.sessions.create(first)
    clash = session_record("0a1b2c3d")
    clash.id = first.id
    with pytest.raises(Exception):
        await store.sessions.start(clash)
    assert await store.sessions.get(first.id) == first
    inv = await store.inventory.get("0a1b2c3d")
    assert inv.state is InventoryState.EXPECTED and inv.idevid_fp is None     # one transaction


async def test_session_store_ldevid_and_concurrent_finish(store):
    await store.inventory.add(InventoryRecord(serial="0a1b2c3d", created_at=NOW))
    rec = session_record("0a1b2c3d", state=SessionState.CREDENTIALED)
    await store.sessions.start(rec)
    await store.sessions.store_ldevid(rec.id, "0a1b2c3d", b"ldevid-der", "1f2e")
    assert (await store.sessions.get(rec.id)).ldevid_der == b"ldevid-der"
    assert (await store.inventory.get("0a1b2c3d")).ldevid_serial == "1f2e"
    results = await asyncio.gather(*[store.sessions.finish(rec.id, "0a1b2c3d", NOW + i)
                                     for i in range(10)])
    assert results.count(True) == 1
    assert (await store.sessions.get(rec.id)).state is SessionState.DONE
    inv = await store.inventory.get("0a1b2c3d")
    assert inv.state is InventoryState.ONBOARDED
    assert inv.onboarded_at == NOW + results.index(True)
    assert not await store.sessions.finish(rec.id, "0a1b2c3d", NOW + 99)
    assert (await store.inventory.get("0a1b2c3d")).onboarded_at == NOW + results.index(True)


async def test_session_finish_needs_a_credentialed_session(store):
    await store.inventory.add(InventoryRecord(serial="0a1b2c3d", created_at=NOW))
    rec = session_record("0a1b2c3d")                                   # still CHALLENGED
    await store.sessions.start(rec)
    assert not await store.sessions.finish(rec.id, "0a1b2c3d", NOW)
    assert not await store.sessions.finish(os.urandom(16), "0a1b2c3d", NOW)
    assert (await store.sessions.get(rec.id)).state is SessionState.CHALLENGED
    assert (await store.inventory.get("0a1b2c3d")).state is InventoryState.ONBOARDING


# --- secrets and certificates ------------------------------------------------------------------
async def test_secrets_put_get_overwrite(store):
    assert await store.secrets.get("n_device", "0a1b2c3d") is None
    await store.secrets.put("n_device", "0a1b2c3d", b"first")
    await store.secrets.put("channel", "0a1b2c3d", b"other kind")
    await store.secrets.put("n_device", "ffffffff", b"other name")
    assert await store.secrets.get("n_device", "0a1b2c3d") == b"first"
    await store.secrets.put("n_device", "0a1b2c3d", b"second")
    assert await store.secrets.get("n_device", "0a1b2c3d") == b"second"
    assert await store.secrets.get("channel", "0a1b2c3d") == b"other kind"
    assert await store.secrets.get("n_device", "ffffffff") == b"other name"
    blob = bytes(range(256)) * 4
    await store.secrets.put("channel", "0a1b2c3d", blob)                # binary-safe
    assert await store.secrets.get("channel", "0a1b2c3d") == blob


async def test_secrets_concurrent_put_of_a_new_name_is_an_upsert(store, db_url, request):
    await asyncio.gather(*[store.secrets.get("warm", "up") for _ in range(20)])   # fill the pool
    for rnd in range(5):
        values = [bytes([rnd, i]) for i in range(20)]
        results = await asyncio.gather(*[store.secrets.put("channel", f"dev{rnd}", v)
                                         for v in values], return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"round {rnd}: {len(errors)} puts failed: {errors[0]!r}"
        assert await store.secrets.get("channel", f"dev{rnd}") in values


async def test_certs_add_and_for_device(store):
    assert await store.certs.for_device("0a1b2c3d") == []
    await store.certs.add("1f", "0a1b2c3d", b"cert-1", NOW + 30 * 86400)
    await store.certs.add("2f", "0a1b2c3d", b"cert-2", NOW + 60 * 86400)
    await store.certs.add("3f", "ffffffff", b"cert-3", NOW)
    assert sorted(await store.certs.for_device("0a1b2c3d")) == [b"cert-1", b"cert-2"]
    assert await store.certs.for_device("ffffffff") == [b"cert-3"]


# --- migrations ----------------------------------------------------------------------------------
async def test_migrations_are_idempotent_and_keep_data(db_url):
    first = await open_store(db_url)
    try:
        await first.rendezvous.add(rv_record())
        await first.secrets.put("n_device", "0a1b2c3d", b"kept")
    finally:
        await first.close()
    for _ in range(2):                                    # migrate again, twice
        again = await open_store(db_url)
        try:
            assert (await again.rendezvous.get("0a1b2c3d")).urn == "urn:dev:zerotouch:0a1b2c3d"
            assert await again.secrets.get("n_device", "0a1b2c3d") == b"kept"
            assert await again.inventory.list() == []
        finally:
            await again.close()
    plain = await open_store(db_url, migrate=False)       # an already migrated database opens as is
    try:
        assert await plain.secrets.get("n_device", "0a1b2c3d") == b"kept"
    finally:
        await plain.close()
