"""Shared fixtures: stores on SQLite and (when reachable) PostgreSQL, and a whole fleet in memory."""
from __future__ import annotations

import pytest

from fleet import make_fleet
from support import PG_URL, drop_pg_schema, make_pg_schema, need, pg_reachable  # noqa: F401


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request, tmp_path):
    """A fresh database per test: a SQLite file, or its own PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/zt.db"
        return
    if not pg_reachable():
        need("PostgreSQL on 127.0.0.1:5432", "apt-get install postgresql and create database 'test'")
    schema = await make_pg_schema()
    try:
        yield f"{PG_URL}?schema={schema}"
    finally:
        await drop_pg_schema(schema)


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/zt.db"

@pytest.fixture
async def fleet(tmp_path, sqlite_url):
    fl = await make_fleet(tmp_path, sqlite_url)
    try:
        yield fl
    finally:
        await fl.store.close()
