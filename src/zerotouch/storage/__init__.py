"""Storage: open a store by URL (sqlite:///file.db or postgresql://host/db?schema=s)."""
from __future__ import annotations

from .base import Store
from .migrate import upgrade
from .sql import SqlStore, make_engine


async def open_store(url: str, *, migrate: bool = True) -> SqlStore:
    engine = make_engine(url)
    if migrate:
        await upgrade(engine)
    return SqlStore(engine)


__all__ = ["Store", "SqlStore", "open_store"]
