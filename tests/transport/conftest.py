"""Real rendezvous and gateway apps on TLS sockets, on both databases or SQLite only."""
from __future__ import annotations

import pytest

from http_harness import start_servers


@pytest.fixture
async def servers(tmp_path, db_url):
    s = await start_servers(tmp_path, db_url)
    yield s
    await s.close()


@pytest.fixture
async def sq_servers(tmp_path, sqlite_url):
    s = await start_servers(tmp_path, sqlite_url)
    yield s
    await s.close()
