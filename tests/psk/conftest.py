"""PSK-profile tests use the in-memory fleet of tests/fleet.py and the CoAP harness."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for extra in (_HERE, _HERE.parent / "coap", _HERE.parent / "transport"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from psk_support import PskFleet  # noqa: E402


@pytest.fixture
async def pskf(fleet):
    return PskFleet(fleet)
