from __future__ import annotations

import pytest

from zerotouch.services.terminus import find_mosquitto
from support import need


@pytest.fixture
def mosquitto():
    path = find_mosquitto()
    if path is None:
        need("Mosquitto", "apt-get install mosquitto")
    return path
