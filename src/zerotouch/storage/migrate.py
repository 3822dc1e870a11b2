"""Run Alembic migrations programmatically on the store's own (async) engine.

Several server processes may start at once on one database; a lock (PostgreSQL advisory
lock, or a lock file beside a SQLite database) lets one migrate while the others wait.
"""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

HERE = Path(__file__).parent
_PG_LOCK_ID = 0x7A65726F  # "zero"


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE / "migrations"))
    return cfg


@contextlib.contextmanager
def _sqlite_lock(engine: AsyncEngine):
    db = engine.url.database
    if not db or db == ":memory:":
        yield
        return
    with open(f"{db}.migrate.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    def run(sync_conn):
        cfg = _config()
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, revision)

    is_pg = engine.url.get_backend_name() == "postgresql"
    with (contextlib.nullcontext() if is_pg else _sqlite_lock(engine)):
        async with engine.begin() as conn:
            if is_pg:
                await conn.execute(text(f"SELECT pg_advisory_xact_lock({_PG_LOCK_ID})"))
            await conn.run_sync(run)
