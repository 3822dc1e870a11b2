"""Helpers shared by tests: skip-or-fail for missing components, PostgreSQL schemas."""
from __future__ import annotations

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


async def sh(script: str, cwd) -> str:
    """Run a bash pipeline without blocking the event loop a server under test runs on."""
    import asyncio
    proc = await asyncio.create_subprocess_exec(
        "bash", "-euo", "pipefail", "-c", script, cwd=str(cwd),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"{script}\n--- stderr ---\n{err.decode()}\n{out.decode()}"
    return out.decode()
