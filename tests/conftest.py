"""Shared fixtures: stores on SQLite and (when reachable) PostgreSQL, and a whole fleet in memory."""
from __future__ import annotations

import asyncio
import os
import secrets
import socket

import pytest

PG_URL = os.environ.get("ZT_TEST_PG", "postgresql://127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"


def need(component: str, install: str) -> None:
    """Skip outside CI with a message naming what to install; fail in CI."""
    msg = f"{component} is not available: {install}"
    if IN_CI:
        pytest.fail(msg + " (CI must install it in .ci/run)")
    pytest.skip(msg)


def pg_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


async def make_pg_schema() -> str:
    import asyncpg
    name = "zt_test_" + secrets.token_hex(6)
    conn = await asyncpg.connect("postgresql://127.0.0.1:5432/test")
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    return name


async def drop_pg_schema(name: str) -> None:
    import asyncpg
    conn = await asyncpg.connect("postgresql://127.0.0.1:5432/test")
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


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
