"""Keep the terminus (Mosquitto) refusing revoked devices: write its `crlfile`, make it reload.

Measured on Mosquitto 2.0.11 (tests/revocation/test_terminus_crl.py shows each point):
- SIGHUP ("Reloading config.") re-reads `crlfile`: new TLS handshakes see the new CRL within
  about 10 ms. Connections already open are NOT re-checked and keep publishing.
- So a *new* revocation restarts the broker (stop + start, about 0.2 s; every device
  reconnects, the revoked one is refused). A CRL that only got newer (dates, number) is
  picked up with SIGHUP, which drops no one. `restart_on_revocation=False` always uses SIGHUP.
- An expired CRL makes OpenSSL refuse every client ("CRL has expired"), and a missing or
  unreadable one too; a garbage file on SIGHUP is logged and the broker keeps running. Hence:
  a CRL is verified against the owner CA and its nextUpdate before it is written, the file is
  written before the broker first starts, and a failed fetch keeps the last good file (its
  validity, an hour by default, is how long the terminus rides out a gateway outage).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Awaitable, Callable

from cryptography import x509

from ..pki.ca import CertificateAuthority
from ..protocol.errors import MalformedMessage
from ..util.files import atomic_write
from .revocation import CrlSnapshot, parse_crl, snapshot_of
from .terminus import Terminus, TerminusError, write_terminus_config

log = logging.getLogger("zerotouch.terminus")
CrlSource = Callable[[], Awaitable[bytes]]
MAX_CRL_BYTES = 16 * 1024 * 1024
RELOAD_MARK = b"Reloading config."


def url_source(url: str, ca_pem: str | bytes, *, timeout: float = 10.0) -> CrlSource:
    """Fetch `GET <gateway>/crl` over HTTPS, the gateway checked against the owner CA."""
    import aiohttp

    from ..transport.http.client import client_ssl_context
    ctx = client_ssl_context(ca_pem)

    async def fetch() -> bytes:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url, ssl=ctx) as resp:
                if resp.status != 200:
                    raise MalformedMessage(f"GET {url} answered {resp.status}")
                body = await resp.content.read(MAX_CRL_BYTES + 1)
        if len(body) > MAX_CRL_BYTES:
            raise MalformedMessage(f"CRL from {url} is larger than {MAX_CRL_BYTES} bytes")
        return body
    return fetch


def verify_crl(data: bytes, ca_cert: x509.Certificate, now: float) -> CrlSnapshot:
    """Only a CRL that Mosquitto would accept may reach its crlfile (see module doc)."""
    crl = parse_crl(data)
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):
        raise MalformedMessage("CRL is not signed by the owner CA")
    snap = snapshot_of(data)
    if snap.next_update <= now:
        raise MalformedMessage("CRL has expired (its nextUpdate has passed)")
    return snap


class CrlWatcher:
    """Polls a CRL source; on a change writes `crlfile` and reloads or restarts `terminus`."""

    def __init__(self, crlfile: Path, source: CrlSource, *, ca_cert: x509.Certificate,
                 terminus: Terminus | None = None, restart_on_revocation: bool = True,
                 clock: Callable[[], float] = time.time, reload_timeout: float = 5.0):
        self.crlfile, self.source, self.ca_cert = Path(crlfile), source, ca_cert
        self.terminus, self.restart_on_revocation = terminus, restart_on_revocation
        self.clock, self.reload_timeout = clock, reload_timeout
        self.current: CrlSnapshot | None = self._read_existing()
        self.reloads = self.restarts = 0

    def _read_existing(self) -> CrlSnapshot | None:
        try:
            return verify_crl(self.crlfile.read_bytes(), self.ca_cert, self.clock())
        except (FileNotFoundError, MalformedMessage):
            return None

    async def prime(self) -> None:
        """Before the broker starts: a valid crlfile must exist, or every device is refused."""
        try:
            await self._fetch_and_write()
        except Exception as exc:
            if self.current is None:
                raise TerminusError(f"no valid CRL for the terminus: {exc}") from exc
            log.warning("CRL fetch failed (%s); starting with the CRL on disk", exc)

    async def _fetch_and_write(self) -> tuple[CrlSnapshot, CrlSnapshot | None] | None:
        snap = verify_crl(await self.source(), self.ca_cert, self.clock())
        old = self.current
        if old is not None and snap.pem == old.pem:
            return None
        atomic_write(self.crlfile, snap.pem)
        self.current = snap
        return snap, old

    async def check(self) -> str:
        """One poll: 'unchanged', 'written' (no broker running), 'reloaded', 'restarted' or
        'failed' (the last good CRL stays in place)."""
        try:
            change = await self._fetch_and_write()
        except Exception as exc:
            left = (self.current.next_update - self.clock()) if self.current else 0
            log.warning("CRL fetch failed (%s); current CRL expires in %.0f s, after which the "
                        "terminus refuses every device", exc, left)
            return "failed"
        if change is None:
            return "unchanged"
        snap, old = change
        proc = getattr(self.terminus, "_proc", None)  # Terminus exposes no reload of its own
        if proc is None or proc.returncode is not None:
            return "written"
        newly = snap.serials - (old.serials if old else frozenset())
        if newly and self.restart_on_revocation:
            # SIGHUP would leave a revoked device's open connection alone: drop them all
            log.info("CRL revokes %d more certificate(s): restarting the terminus", len(newly))
            await self.terminus.stop()
            await self.terminus.start()
            self.restarts += 1
            return "restarted"
        await self._sighup(proc)
        self.reloads += 1
        return "reloaded"

    async def _sighup(self, proc) -> None:
        # Wait for Mosquitto to log the reload, so "reloaded" means new handshakes use the CRL.
        logfile = self.terminus.files.log
        start = logfile.stat().st_size if logfile.exists() else 0
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + self.reload_timeout
        while time.monotonic() < deadline:
            with open(logfile, "rb") as fh:
                fh.seek(start)
                if RELOAD_MARK in fh.read():
                    return
            await asyncio.sleep(0.01)
        log.warning("mosquitto did not log a reload within %.1f s", self.reload_timeout)

    async def run(self, interval: float, stop: asyncio.Event | None = None) -> None:
        """Poll every `interval` seconds until `stop` is set (or forever)."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            except asyncio.TimeoutError:
                pass
            proc = getattr(self.terminus, "_proc", None)
            if self.terminus is not None and (proc is None or proc.returncode is not None):
                raise TerminusError("mosquitto is no longer running:\n"
                                    + self.terminus._diagnostics())
            await self.check()


async def run_terminus_with_crl(directory: Path, *, ca: CertificateAuthority, host: str, port: int,
                                source: CrlSource, interval: float = 10.0,
                                topic_root: str = "devices", restart_on_revocation: bool = True,
                                on_ready: Callable[[Terminus], None] | None = None,
                                stop: asyncio.Event | None = None,
                                mosquitto: str | None = None, psk_port: int | None = None,
                                psk_source=None) -> None:
    """Write the terminus config with `DIR/crl.pem` as crlfile, start Mosquitto, keep the CRL
    current every `interval` seconds until `stop` is set. With `psk_port` and `psk_source`
    (async () -> {serial: key}) also a TLS-PSK listener whose psk_file follows the source."""
    crlfile = Path(directory).resolve() / "crl.pem"
    files = write_terminus_config(directory, ca=ca, host=host, port=port, topic_root=topic_root,
                                  crlfile=crlfile, psk_port=psk_port)
    if psk_port is not None and psk_source is not None:
        from .terminus import write_psk_file
        write_psk_file(files, await psk_source())

        async def follow_psks(terminus: Terminus) -> None:
            while stop is None or not stop.is_set():
                await asyncio.sleep(interval)
                try:
                    if write_psk_file(files, await psk_source()):
                        terminus.reload()   # new PSK devices (and revoked ones gone) on reload
                except Exception as exc:    # keep the keys in use; say why (never a key)
                    log.warning("terminus PSK keys not refreshed: %s", type(exc).__name__)
    terminus = Terminus(files, mosquitto=mosquitto)
    watcher = CrlWatcher(crlfile, source, ca_cert=ca.cert, terminus=terminus,
                         restart_on_revocation=restart_on_revocation)
    await watcher.prime()
    follower = None
    try:
        await terminus.start()
        if psk_port is not None and psk_source is not None:
            follower = asyncio.create_task(follow_psks(terminus))
        if on_ready is not None:
            on_ready(terminus)
        await watcher.run(interval, stop)
    finally:
        if follower is not None:
            follower.cancel()
        await terminus.stop()


__all__ = ["CrlWatcher", "CrlSource", "url_source", "verify_crl", "run_terminus_with_crl"]
