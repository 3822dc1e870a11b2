"""SQLAlchemy (async) implementation of the repositories, for SQLite and PostgreSQL."""
from __future__ import annotations

import dataclasses
import time

from sqlalchemy import case, delete, event, func, insert, or_, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..protocol.errors import Conflict
from ..protocol.states import InventoryState, RendezvousStatus, SessionState
from .base import CertRecord, EnrollRequest, InventoryRecord, RvDeviceRecord, SessionRecord
from .schema import (est_requests, gw_certificates, gw_inventory, gw_sessions, rv_devices,
                     rv_source_failures, vault_secrets)


def engine_url(url: str) -> tuple[URL, dict]:
    """Accept plain `sqlite:///x.db` / `postgresql://host/db[?schema=s]`; pick async drivers."""
    u = make_url(url)
    connect_args: dict = {}
    backend = u.get_backend_name()
    if backend == "sqlite":
        u = u.set(drivername="sqlite+pysqlite")
        connect_args["timeout"] = 30
    elif backend == "postgresql":
        u = u.set(drivername="postgresql+asyncpg")
        schema = u.query.get("schema")
        if schema:
            if isinstance(schema, tuple) or not schema.replace("_", "").isalnum():
                raise ValueError("schema name must be letters, digits and underscores")
            connect_args["server_settings"] = {"search_path": schema}
            u = u.difference_update_query(["schema"])
    else:
        raise ValueError(f"unsupported database URL {u.drivername!r} (use sqlite or postgresql)")
    return u, connect_args


class _SyncConnection:
    """Async face over a synchronous SQLAlchemy connection (see SyncSqliteEngine)."""

    def __init__(self, conn):
        self._c = conn

    async def execute(self, *args, **kwargs):
        return self._c.execute(*args, **kwargs)

    async def run_sync(self, fn, *args, **kwargs):
        return fn(self._c, *args, **kwargs)


class _SyncContext:
    def __init__(self, cm):
        self._cm = cm

    async def __aenter__(self):
        return _SyncConnection(self._cm.__enter__())

    async def __aexit__(self, *exc):
        return self._cm.__exit__(*exc)


class SyncSqliteEngine:
    """SQLite, run in the event loop thread.

    A SQLite statement takes microseconds; handing each one to a worker thread (aiosqlite)
    costs far more than the statement (~130 thread hops per onboarding, measured). One
    connection per process, so this process never waits on its own lock.
    """

    def __init__(self, url: URL, connect_args: dict):
        from sqlalchemy import create_engine
        from sqlalchemy.pool import QueuePool
        self.sync_engine = create_engine(url.set(drivername="sqlite+pysqlite"),
                                         connect_args=connect_args, poolclass=QueuePool,
                                         pool_size=1, max_overflow=0, pool_timeout=60)
        self.url = self.sync_engine.url

    def begin(self):
        return _SyncContext(self.sync_engine.begin())

    def connect(self):
        return _SyncContext(self.sync_engine.connect())

    def execution_options(self, **_options) -> "SyncSqliteEngine":
        return self  # SQLite reads are already cheap; one connection serves both

    async def dispose(self) -> None:
        self.sync_engine.dispose()


def make_engine(url: str):
    real, connect_args = engine_url(url)
    if real.get_backend_name() == "sqlite":
        engine = SyncSqliteEngine(real, connect_args)
    else:
        # No pre-ping (a round trip per checkout); recycle instead so stale connections go.
        engine = create_async_engine(real, connect_args=connect_args, pool_size=10,
                                     max_overflow=10, pool_recycle=1800)
    if real.get_backend_name() == "sqlite":
        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn, _record):  # pragma: no cover - exercised by every sqlite test
            cur = dbapi_conn.cursor()
            # WAL lets several server processes read while one writes; busy_timeout waits for locks.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    return engine


def _upsert(engine):
    """The dialect's INSERT with ON CONFLICT (SQLite and PostgreSQL spell it alike)."""
    if engine.url.get_backend_name() == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert
    return upsert


def _row(cls, row, **conv):
    data = dict(row._mapping)
    for k, fn in conv.items():
        data[k] = fn(data[k])
    return cls(**data)


class _Repo:
    def __init__(self, engine: AsyncEngine):
        self.e = engine
        # Reads and single-statement writes need no explicit transaction (one statement is atomic);
        # on PostgreSQL that saves the BEGIN and COMMIT/ROLLBACK round trips.
        self.r = engine.execution_options(isolation_level="AUTOCOMMIT")


class SqlRendezvousRepo(_Repo):
    async def add(self, rec: RvDeviceRecord) -> None:
        values = dataclasses.asdict(rec)
        values["status"] = rec.status.value
        try:
            async with self.r.begin() as c:
                await c.execute(insert(rv_devices).values(**values))
        except IntegrityError:
            raise Conflict(f"device {rec.serial} is already registered") from None

    async def get(self, serial: str) -> RvDeviceRecord | None:
        async with self.r.connect() as c:
            row = (await c.execute(select(rv_devices).where(rv_devices.c.serial == serial))).first()
        return _row(RvDeviceRecord, row, status=RendezvousStatus) if row else None

    async def claim(self, serial: str, gateway_url: str, owner_fp: bytes, now: float,
                    gateway_edhoc_fp: bytes | None = None) -> bool:
        async with self.r.begin() as c:
            res = await c.execute(
                update(rv_devices)
                .where(rv_devices.c.serial == serial,
                       rv_devices.c.status == RendezvousStatus.NOT_MAPPED.value)
                .values(status=RendezvousStatus.MAPPED.value, gateway_url=gateway_url,
                        owner_fp=owner_fp, claimed_at=now, gateway_edhoc_fp=gateway_edhoc_fp))
        return res.rowcount == 1

    async def set_status(self, serial, old, new, now) -> bool:
        values = {"status": new.value}
        if new is RendezvousStatus.REGISTERED:
            values["registered_at"] = now
        async with self.r.begin() as c:
            res = await c.execute(update(rv_devices).where(
                rv_devices.c.serial == serial, rv_devices.c.status == old.value).values(**values))
        return res.rowcount == 1

    async def note_failed_claim(self, serial: str, now: float | None = None,
                                window: float | None = None) -> None:
        now = time.time() if now is None else now
        d = rv_devices.c
        if window is None:
            values = {"failed_claims": d.failed_claims + 1,
                      "failed_since": func.coalesce(d.failed_since, now)}
        else:  # one statement: every SET sees the old row, so this is atomic on both databases
            expired = or_(d.failed_since.is_(None), d.failed_since <= now - window)
            values = {"failed_claims": case((expired, 1), else_=d.failed_claims + 1),
                      "failed_since": case((expired, now), else_=d.failed_since)}
        async with self.r.begin() as c:
            await c.execute(update(rv_devices).where(d.serial == serial).values(**values))

    async def source_failures(self, source: str) -> tuple[int, float] | None:
        t = rv_source_failures.c
        async with self.r.connect() as c:
            row = (await c.execute(select(t.failures, t.window_start)
                                   .where(t.source == source))).first()
        return (row[0], row[1]) if row else None

    async def note_source_failure(self, source: str, now: float, window: float) -> int:
        upsert = _upsert(self.e)
        stmt = upsert(rv_source_failures).values(source=source, failures=1, window_start=now)
        t = rv_source_failures.c
        expired = t.window_start <= now - window
        stmt = stmt.on_conflict_do_update(index_elements=["source"], set_={
            "failures": case((expired, 1), else_=t.failures + 1),
            "window_start": case((expired, now), else_=t.window_start)}).returning(t.failures)
        async with self.r.begin() as c:
            return (await c.execute(stmt)).scalar_one()

    async def prune_source_failures(self, before: float) -> int:
        async with self.r.begin() as c:
            res = await c.execute(delete(rv_source_failures)
                                  .where(rv_source_failures.c.window_start < before))
        return res.rowcount

    async def count_by_status(self) -> dict[str, int]:
        async with self.r.connect() as c:
            rows = await c.execute(select(rv_devices.c.status, func.count()).group_by(rv_devices.c.status))
        return {s: n for s, n in rows}


class SqlInventoryRepo(_Repo):
    async def add(self, rec: InventoryRecord) -> bool:
        values = dataclasses.asdict(rec)
        values["state"] = rec.state.value
        try:
            async with self.r.begin() as c:
                await c.execute(insert(gw_inventory).values(**values))
        except IntegrityError:
            return False
        return True

    async def get(self, serial: str) -> InventoryRecord | None:
        async with self.r.connect() as c:
            row = (await c.execute(select(gw_inventory).where(gw_inventory.c.serial == serial))).first()
        return _row(InventoryRecord, row, state=InventoryState) if row else None

    async def list(self, limit: int = 1000) -> list[InventoryRecord]:
        async with self.r.connect() as c:
            rows = await c.execute(select(gw_inventory).order_by(gw_inventory.c.serial).limit(limit))
        return [_row(InventoryRecord, r, state=InventoryState) for r in rows]

    async def remove(self, serial: str) -> None:
        async with self.r.begin() as c:
            await c.execute(delete(gw_inventory).where(gw_inventory.c.serial == serial))

    async def update(self, serial: str, **fields) -> None:
        if "state" in fields:
            fields["state"] = InventoryState(fields["state"]).value
        async with self.r.begin() as c:
            await c.execute(update(gw_inventory).where(gw_inventory.c.serial == serial).values(**fields))


class SqlSessionRepo(_Repo):
    async def create(self, rec: SessionRecord) -> None:
        values = dataclasses.asdict(rec)
        values["state"] = rec.state.value
        async with self.r.begin() as c:
            await c.execute(insert(gw_sessions).values(**values))

    async def start(self, rec: SessionRecord) -> None:
        values = dataclasses.asdict(rec)
        values["state"] = rec.state.value
        try:
            async with self.e.begin() as c:
                await c.execute(insert(gw_sessions).values(**values))
                await c.execute(update(gw_inventory).where(gw_inventory.c.serial == rec.serial).values(
                    state=InventoryState.ONBOARDING.value, idevid_fp=rec.idevid_fp, last_error=None,
                    attestation=None))
        except IntegrityError:
            raise Conflict("this hello was already answered (replayed nonce)") from None

    async def store_ldevid(self, session_id, serial, ldevid_der, ldevid_serial) -> None:
        async with self.e.begin() as c:
            await c.execute(update(gw_sessions).where(gw_sessions.c.id == session_id)
                            .values(ldevid_der=ldevid_der))
            await c.execute(update(gw_inventory).where(gw_inventory.c.serial == serial)
                            .values(ldevid_serial=ldevid_serial))

    async def finish(self, session_id, serial, now) -> bool:
        async with self.e.begin() as c:
            res = await c.execute(update(gw_sessions).where(
                gw_sessions.c.id == session_id, gw_sessions.c.state == SessionState.CREDENTIALED.value)
                .values(state=SessionState.DONE.value))
            if res.rowcount != 1:
                return False
            # A device revoked while it was onboarding stays revoked.
            await c.execute(update(gw_inventory).where(
                gw_inventory.c.serial == serial, gw_inventory.c.state != InventoryState.REVOKED.value)
                .values(state=InventoryState.ONBOARDED.value, onboarded_at=now, last_error=None))
        return True

    async def get(self, session_id: bytes) -> SessionRecord | None:
        async with self.r.connect() as c:
            row = (await c.execute(select(gw_sessions).where(gw_sessions.c.id == session_id))).first()
        return _row(SessionRecord, row, state=SessionState) if row else None

    async def advance(self, session_id, old, new, **fields) -> bool:
        async with self.r.begin() as c:
            res = await c.execute(update(gw_sessions).where(
                gw_sessions.c.id == session_id, gw_sessions.c.state == old.value)
                .values(state=new.value, **fields))
        return res.rowcount == 1

    async def delete_expired(self, now: float) -> int:
        async with self.r.begin() as c:
            res = await c.execute(delete(gw_sessions).where(gw_sessions.c.expires < now))
        return res.rowcount


class SqlSecretRepo(_Repo):
    async def put(self, kind: str, name: str, ciphertext: bytes) -> None:
        if self.e.url.get_backend_name() == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert
        stmt = upsert(vault_secrets).values(kind=kind, name=name, ciphertext=ciphertext)
        stmt = stmt.on_conflict_do_update(index_elements=["kind", "name"],
                                          set_={"ciphertext": stmt.excluded.ciphertext})
        async with self.r.begin() as c:
            await c.execute(stmt)

    async def get(self, kind: str, name: str) -> bytes | None:
        async with self.r.connect() as c:
            row = (await c.execute(select(vault_secrets.c.ciphertext).where(
                vault_secrets.c.kind == kind, vault_secrets.c.name == name))).first()
        return row[0] if row else None


class SqlCertRepo(_Repo):
    async def add(self, serial_number, device_serial, der, not_after, *, kind="ldevid",
                  issued_at=0.0) -> None:
        async with self.r.begin() as c:
            await c.execute(insert(gw_certificates).values(
                serial_number=serial_number, device_serial=device_serial, der=der, not_after=not_after,
                kind=kind, issued_at=issued_at))

    async def for_device(self, device_serial: str) -> list[bytes]:
        return [r.der for r in await self.records_for_device(device_serial)]

    async def get(self, serial_number: str) -> CertRecord | None:
        async with self.r.connect() as c:
            row = (await c.execute(select(gw_certificates).where(
                gw_certificates.c.serial_number == serial_number))).first()
        return _row(CertRecord, row) if row else None

    async def records_for_device(self, device_serial: str) -> list[CertRecord]:
        async with self.r.connect() as c:
            rows = await c.execute(select(gw_certificates).where(
                gw_certificates.c.device_serial == device_serial).order_by(gw_certificates.c.issued_at))
        return [_row(CertRecord, r) for r in rows]

    async def revoke(self, serial_number: str, now: float, reason: str) -> bool:
        async with self.r.begin() as c:
            res = await c.execute(update(gw_certificates).where(
                gw_certificates.c.serial_number == serial_number, gw_certificates.c.revoked_at.is_(None))
                .values(revoked_at=now, reason=reason))
        return res.rowcount == 1

    async def revoked(self) -> list[CertRecord]:
        import time
        async with self.r.connect() as c:
            rows = await c.execute(select(gw_certificates).where(
                gw_certificates.c.revoked_at.is_not(None), gw_certificates.c.not_after > time.time())
                .order_by(gw_certificates.c.revoked_at))
        return [_row(CertRecord, r) for r in rows]


class SqlEnrollRequestRepo(_Repo):
    async def add(self, req: EnrollRequest) -> bool:
        try:
            async with self.r.begin() as c:
                await c.execute(insert(est_requests).values(**dataclasses.asdict(req)))
        except IntegrityError:
            return False
        return True

    async def get(self, request_id: str) -> EnrollRequest | None:
        async with self.r.connect() as c:
            row = (await c.execute(select(est_requests).where(est_requests.c.id == request_id))).first()
        return _row(EnrollRequest, row) if row else None

    async def list(self, state: str | None = None, limit: int = 1000) -> list[EnrollRequest]:
        q = select(est_requests).order_by(est_requests.c.created_at).limit(limit)
        if state is not None:
            q = q.where(est_requests.c.state == state)
        async with self.r.connect() as c:
            rows = await c.execute(q)
        return [_row(EnrollRequest, r) for r in rows]

    async def decide(self, request_id, old, new, now, cert_serial=None) -> bool:
        values = {"state": new, "decided_at": now}
        if cert_serial is not None:
            values["cert_serial"] = cert_serial
        async with self.r.begin() as c:
            res = await c.execute(update(est_requests).where(
                est_requests.c.id == request_id, est_requests.c.state == old).values(**values))
        return res.rowcount == 1


class SqlStore:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.rendezvous = SqlRendezvousRepo(engine)
        self.inventory = SqlInventoryRepo(engine)
        self.sessions = SqlSessionRepo(engine)
        self.secrets = SqlSecretRepo(engine)
        self.certs = SqlCertRepo(engine)
        self.enroll_requests = SqlEnrollRequestRepo(engine)

    async def close(self) -> None:
        await self.engine.dispose()
