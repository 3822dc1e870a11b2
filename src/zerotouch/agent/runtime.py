"""The agent: the device side of every phase, over a pluggable transport.

On power-on: if state.json says onboarded, go straight to the terminus. Otherwise find the
owner (retrying with backoff until claimed), onboard, store everything, report done, and
then connect to the terminus.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from cryptography import x509

from ..identity import identity_factory
from ..pki.keys import load_public_key_pem
from ..protocol.device import DeviceOnboarding, der_to_pem
from ..protocol.errors import NotAuthorized, ProtocolError, TryLater
from ..services.manufacturer import SECRET_FILE, read_factory
from ..transport.http.client import HttpDeviceTransport
from .backoff import Backoff
from ..util.files import remove_stale_temp_files
from .state import AgentState, load_state, save_state, store_credentials

log = logging.getLogger("zerotouch.agent")
MAX_ERRORS = 20  # a device may wait days to be claimed: keep only the latest reasons


@dataclass
class AgentReport:
    serial: str
    onboarded: bool = False
    straight_to_terminus: bool = False
    onboarding_ms: float | None = None
    attempts: int = 0
    telemetry_sent: int = 0
    telemetry_refused: int = 0
    error: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    errors: list[str] = field(default_factory=list)


class Agent:
    def __init__(self, device_dir: Path, *, transport=None, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.time, rng: Callable[[int], bytes] = os.urandom,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 max_attempts: int | None = None, deadline_s: float | None = None):
        self.dir = Path(device_dir)
        self.factory = read_factory(self.dir)
        self.serial = self.factory["serial"]
        self.transport = transport or HttpDeviceTransport(
            rendezvous_ca_pem=self.factory.get("rendezvous_tls_ca_pem") or None)
        self.backoff = backoff or Backoff()
        self.clock, self.rng, self.sleep = clock, rng, sleep
        self.max_attempts = max_attempts
        self.deadline_s = deadline_s

    def _core(self) -> DeviceOnboarding:
        identity = self._identity = identity_factory(self.factory.get("identity", "software")).open(self.dir)
        return DeviceOnboarding(
            serial=self.serial, urn=self.factory["urn"],
            rendezvous_key=load_public_key_pem(self.factory["rendezvous_key_pem"].encode()),
            n_device=bytes.fromhex((self.dir / SECRET_FILE).read_text().strip()),
            identity=identity, clock=self.clock, rng=self.rng)

    async def _attempt(self, core: DeviceOnboarding) -> None:
        t = self.transport
        redirect = core.receive_redirect(
            await t.find_owner(self.factory["rendezvous_url"], core.find_owner_request()))
        gw = redirect.gateway_url
        core.receive_challenge(await t.gateway(gw, "hello", core.hello_request()))
        self._check_gateway_tls(core)
        # Key generation and durable writes run off the event loop: a device's flash is slow,
        # and in a simulated fleet one device's fsync must not stall the others.
        prove = await asyncio.to_thread(core.prove_request)
        result = core.receive_credentials(await t.gateway(gw, "prove", prove))
        await asyncio.to_thread(self._store, result)
        core.receive_done_ack(await t.gateway(gw, "done", core.done_request()))

    def _store(self, result) -> None:
        self._identity.commit_ldevid()
        store_credentials(self.dir, ldevid_pem=der_to_pem(result.ldevid_der),
                          owner_ca_pem=der_to_pem(result.owner_ca_der), bundle=result.bundle_raw,
                          channel_secret=result.channel_secret)

    def _check_gateway_tls(self, core: DeviceOnboarding) -> None:
        """Now that the owner is proven, the TLS peer must hold a certificate from the owner CA."""
        peer = getattr(self.transport, "gateway_peer_cert", None)
        if peer is None:
            return  # transport without TLS certificates (in-memory tests, OSCORE)
        owner_ca = x509.load_der_x509_certificate(core.owner_ca_der)
        try:
            x509.load_der_x509_certificate(peer).verify_directly_issued_by(owner_ca)
        except Exception:
            raise NotAuthorized("gateway TLS certificate is not issued by the proven owner") from None

    async def onboard(self, report: AgentReport) -> AgentState:
        started = self.clock()
        core = self._core()
        attempt = 0
        while True:
            report.attempts = attempt + 1
            try:
                await self._attempt(core)
                break
            except (ProtocolError, OSError, asyncio.TimeoutError, ValueError) as exc:
                retry_after = exc.retry_after if isinstance(exc, ProtocolError) else None
                msg = exc.message if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
                report.errors = (report.errors + [msg])[-MAX_ERRORS:]
                if not isinstance(exc, TryLater):
                    log.info("%s: onboarding attempt %d failed: %s", self.serial, attempt + 1, msg)
                attempt += 1
                out_of_time = self.deadline_s is not None and self.clock() - started > self.deadline_s
                if (self.max_attempts is not None and attempt >= self.max_attempts) or out_of_time:
                    raise
                core.reset()
                await self.sleep(self.backoff.delay(attempt - 1, retry_after))
        res = core.result
        assert res is not None
        state = AgentState(phase="onboarded", gateway_url=res.gateway_url, owner_fp=res.owner_fp.hex(),
                           terminus_host=res.bundle.terminus_host, terminus_port=res.bundle.terminus_port,
                           topic_prefix=res.bundle.topic_prefix, onboarded_at=self.clock(),
                           onboarding_ms=(self.clock() - started) * 1000)
        await asyncio.to_thread(save_state, self.dir, state)  # the commit point
        return state

    async def run(self, *, telemetry: int = 1) -> AgentReport:
        report = AgentReport(serial=self.serial)
        remove_stale_temp_files(self.dir)
        try:
            state = load_state(self.dir)
            if state.onboarded:
                report.straight_to_terminus = True
            else:
                state = await self.onboard(report)
                report.onboarding_ms = state.onboarding_ms
            report.onboarded = True
            if telemetry > 0:
                await self.publish(state, telemetry, report)
        except Exception as exc:
            report.error = exc.message if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
        finally:
            report.bytes_sent = getattr(self.transport, "bytes_sent", 0)
            report.bytes_received = getattr(self.transport, "bytes_received", 0)
            close = getattr(self.transport, "close", None)
            if close is not None:
                await close()
        return report

    async def publish(self, state: AgentState, count: int, report: AgentReport) -> None:
        from .telemetry import publish_telemetry, telemetry_payload

        identity = identity_factory(self.factory.get("identity", "software")).open(self.dir)
        codes = await publish_telemetry(
            host=state.terminus_host, port=state.terminus_port, ca_file=self.dir / "owner-ca.pem",
            cert_file=self.dir / "ldevid.pem", key_file=identity.ldevid_key_file(),
            topic=f"{state.topic_prefix}/telemetry",
            payloads=[telemetry_payload(self.serial, i, self.clock()) for i in range(count)])
        # MQTT v5: reason codes below 0x80 are success (16 = accepted, nobody subscribed yet).
        report.telemetry_sent = sum(1 for c in codes if c < 0x80)
        report.telemetry_refused = sum(1 for c in codes if c >= 0x80)
