"""Claims, statuses, notice, photos and the phone page (issue 5 items 3-5)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "transport"))

from http_harness import start_servers  # noqa: E402


@pytest.fixture
async def sq_servers(tmp_path, sqlite_url):
    s = await start_servers(tmp_path, sqlite_url)
    yield s
    await s.close()
