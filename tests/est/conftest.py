"""EST fixtures: the service over the in-memory fleet, and the gateway app serving it on TLS."""
from __future__ import annotations

import pytest

from est_harness import make_env, start_est_server


@pytest.fixture
def env(fleet):
    return make_env(fleet)


@pytest.fixture
async def server(env, tmp_path):
    s = await start_est_server(env, tmp_path / "est-server")
    yield s
    await s.close()
