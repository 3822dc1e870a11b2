"""A fleet on each database for the revocation tests."""
from __future__ import annotations

import pytest

from fleet import make_fleet


@pytest.fixture
async def any_fleet(tmp_path, db_url):
    """A fleet on SQLite and on PostgreSQL (the revocation state lives in the database)."""
    fl = await make_fleet(tmp_path, db_url)
    try:
        yield fl
    finally:
        await fl.store.close()
