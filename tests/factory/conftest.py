"""Factory EST fixtures: the service on TLS, in the manufacturer directory the fleet also uses."""
from __future__ import annotations

import pytest

from factory_harness import start_factory_server


@pytest.fixture
async def factory(tmp_path):
    s = await start_factory_server(tmp_path / "manufacturer", tmp_path / "factory-est")
    yield s
    await s.close()
