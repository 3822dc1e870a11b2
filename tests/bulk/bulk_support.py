"""Helpers of the bulk box tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent


def load_png_reader():
    """`decode_png_gray` from tests/services/test_manufacturer.py (PNG without Pillow)."""
    spec = importlib.util.spec_from_file_location("_bulk_png_reader",
                                                  _TESTS / "services" / "test_manufacturer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.decode_png_gray
