"""Bulk box tests reuse the HTTP harness in tests/transport."""
from __future__ import annotations

import sys
from pathlib import Path

_TRANSPORT = Path(__file__).resolve().parent.parent / "transport"
if str(_TRANSPORT) not in sys.path:
    sys.path.insert(0, str(_TRANSPORT))
