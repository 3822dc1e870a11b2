"""The PSK side of `zerotouch demo --identity psk`: the terminus' TLS-PSK listener follows the
vault as `terminus serve` does (services/terminus_crl.py), only more often, so a device that has
just onboarded finds its key at the terminus within a fraction of a second."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from .roles import build_gateway
from .terminus import Terminus, TerminusFiles, terminus_psk_keys, write_psk_file

log = logging.getLogger("zerotouch.demo")


class PskTerminusFollower:
    """Every `interval` seconds: the TLS-PSK keys of the onboarded PSK devices (from the
    gateway's database and vault, a vault read only for devices new since the last round) into
    the terminus' psk_file (0600), and Mosquitto reloaded when it changed."""

    def __init__(self, gateway_dir: Path, files: TerminusFiles, terminus: Terminus, *,
                 interval: float = 0.25):
        self.gateway_dir, self.files, self.terminus = Path(gateway_dir), files, terminus
        self.interval = interval
        self.reloads = 0
        self._cache: dict = {}
        self._gw = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._gw = await build_gateway(self.gateway_dir)
        if not hasattr(self._gw.service.vault, "channel_secret"):
            raise RuntimeError("the TLS-PSK listener needs the vault in this process")
        await self.refresh()
        self._task = asyncio.create_task(self._run())

    async def refresh(self) -> bool:
        keys = await terminus_psk_keys(self._gw.store, self._gw.service.vault, self._cache)
        if write_psk_file(self.files, keys):
            self.terminus.reload()
            self.reloads += 1
            return True
        return False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception as exc:   # keep the keys in use; say why (never a key)
                log.warning("terminus PSK keys not refreshed: %s", type(exc).__name__)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._gw is not None:
            await self._gw.close()
            self._gw = None
