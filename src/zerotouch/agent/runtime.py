"""The agent: the device side of every phase, over a pluggable transport.

On power-on: if state.json says onboarded, go straight to the terminus. Otherwise find the
owner (retrying with backoff until claimed), onboard, store everything, report done, and
then connect to the terminus.

With operational certificates on (bundle setting `est_operational`, or `operational=True`),
the agent enrolls a short-lived certificate over EST with its LDevID once onboarded, uses it
for the terminus, and `maintain()` renews it when due (see renewal.py). Off, nothing changes.
A TPM device does the same with every key in its TPM: the operational key is made under the
SRK and signs its CSR there (identity/tpm/opkeys.py), and each TLS connection that uses a TPM
key (EST, the terminus check, telemetry) runs in a child process with OpenSSL's tpm2 provider
(est_tpm.py, telemetry.py).
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from cryptography import x509

from ..identity import identity_factory
from ..pki.keys import load_public_key_pem
from ..protocol.device import DeviceOnboarding, der_to_pem
from ..protocol.errors import NotAuthorized, ProtocolError, TryLater
from ..services.manufacturer import read_factory
from ..transport.http.client import HttpDeviceTransport
from .backoff import Backoff
from ..util.files import remove_stale_temp_files
from .est_client import EstClient
from .renewal import Check, OperationalFiles, RenewalResult, expired, is_due, renew_at, swap, validity
from .state import AgentState, load_state, save_state, store_credentials

log = logging.getLogger("zerotouch.agent")
MAX_ERRORS = 20  # a device may wait days to be claimed: keep only the latest reasons
EST_LABEL = "operational"
MAX_SLEEP = 3600.0  # re-check at least hourly: a device clock may jump (NTP after boot)


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
    bytes_sent: int = 0              # message bodies (onboarding and EST)
    bytes_received: int = 0
    wire_bytes_sent: int | None = None      # onboarding transport's sockets (HTTPS: TCP payload,
    wire_bytes_received: int | None = None  # TLS handshakes included); None if not measured
    errors: list[str] = field(default_factory=list)
    operational: str | None = None   # outcome of the operational-certificate step, when on
    wire_ms: float | None = None     # onboarding time spent waiting for answers (network + servers)
    tpm_commands: int | None = None  # TPM identity: commands sent to the TPM while onboarding
    tpm_ms: float | None = None      # ... and the time spent in them


def _http_transport(factory: dict, **_options):
    return HttpDeviceTransport(rendezvous_ca_pem=factory.get("rendezvous_tls_ca_pem") or None)


def _coap_transport(factory: dict, *, security: str = "none", device_dir=None):
    from ..transport.coap.security import device_coap_transport  # aiocoap only when asked for
    return device_coap_transport(factory, security=security, device_dir=device_dir)


#: Device transports by name: each builds one from the device's factory.json.
DEVICE_TRANSPORTS: dict[str, Callable[[dict], object]] = {
    "http": _http_transport,
    "coap": _coap_transport,
}


def device_transport(name: str, factory: dict, **options):
    """The named device transport for a device (factory.json contents; options such as the
    CoAP `security` mode and the `device_dir`)."""
    try:
        make = DEVICE_TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r} (one of {', '.join(DEVICE_TRANSPORTS)})") from None
    return make(factory, **options)


class Agent:
    def __init__(self, device_dir: Path, *, transport=None, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.time, rng: Callable[[int], bytes] = os.urandom,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 max_attempts: int | None = None, deadline_s: float | None = None,
                 operational: bool | None = None, terminus_check: Check | None = None,
                 est_factory: Callable[..., EstClient] | None = None,
                 renewal_rand: random.Random | None = None,
                 renewal_backoff: Backoff | None = None):
        self.dir = Path(device_dir)
        self.factory = read_factory(self.dir)
        self.serial = self.factory["serial"]
        self.transport = transport or device_transport("http", self.factory)
        self.backoff = backoff or Backoff()
        self.clock, self.rng, self.sleep = clock, rng, sleep
        self.max_attempts = max_attempts
        self.deadline_s = deadline_s
        # None: follow the owner's bundle; True/False: force operational certificates on/off.
        self.operational = operational
        self.terminus_check = terminus_check or self._terminus_check
        self.est_factory = est_factory or self._default_est_factory()
        self.renewal_rand = renewal_rand or random.Random()
        self.renewal_backoff = renewal_backoff or Backoff(base=5.0, cap=900.0, rand=self.renewal_rand)
        self.est_bytes_sent = self.est_bytes_received = 0
        self.renewals: collections.deque[RenewalResult] = collections.deque(maxlen=MAX_ERRORS)
        self._renew_lock = asyncio.Lock()

    def open_identity(self):
        """The device's key holder (software files or its TPM, named in factory.json)."""
        options = {"tcti": self.factory["tcti"]} if self.factory.get("tcti") else {}
        return identity_factory(self.factory.get("identity", "software"), **options).open(self.dir)

    def _core(self) -> DeviceOnboarding:
        identity = self._identity = self.open_identity()
        if identity.kind == "psk":   # no public-key crypto: the PSK profile (protocol/psk.py)
            from ..protocol.psk_device import PskDeviceOnboarding
            return PskDeviceOnboarding(serial=self.serial, n_device=identity.n_device(),
                                       psk_key=identity.psk(), clock=self.clock, rng=self.rng)
        return DeviceOnboarding(
            serial=self.serial, urn=self.factory["urn"],
            rendezvous_key=load_public_key_pem(self.factory["rendezvous_key_pem"].encode()),
            n_device=identity.n_device(), identity=identity, clock=self.clock, rng=self.rng)

    async def _wire(self, request):
        """Await a request, adding its time to the report's wire_ms."""
        t0 = time.perf_counter()
        try:
            return await request
        finally:
            self._wire_s += time.perf_counter() - t0

    async def _device(self, step, *args):
        """A step of the device core. TPM commands block on the TPM: off the event loop, so a
        simulated fleet's devices do not wait for each other's TPMs."""
        if self._identity.kind in ("software", "psk"):
            return step(*args)
        return await asyncio.to_thread(step, *args)

    async def _attempt(self, core: DeviceOnboarding) -> None:
        t = self.transport
        d, w = self._device, self._wire
        redirect = core.receive_redirect(
            await w(t.find_owner(self.factory["rendezvous_url"], await d(core.find_owner_request))))
        gw = redirect.gateway_url
        if hasattr(t, "pin_gateway"):  # EDHOC: the gateway's key as the signed redirect names it
            t.pin_gateway(gw, redirect.gateway_edhoc_fp)
        core.receive_challenge(await w(t.gateway(gw, "hello", await d(core.hello_request))))
        self._check_gateway_tls(core)
        # Key generation and durable writes run off the event loop: a device's flash is slow,
        # and in a simulated fleet one device's fsync must not stall the others.
        prove = await asyncio.to_thread(core.prove_request)
        result = await d(core.receive_credentials, await w(t.gateway(gw, "prove", prove)))
        await asyncio.to_thread(self._store, result)
        core.receive_done_ack(await w(t.gateway(gw, "done", await d(core.done_request))))

    def _store(self, result) -> None:
        if self._psk:
            from .psk import store_psk_credentials
            store_psk_credentials(self.dir, bundle=result.bundle_raw,
                                  channel_secret=result.channel_secret)
            return
        self._identity.commit_ldevid()
        store_credentials(self.dir, ldevid_pem=der_to_pem(result.ldevid_der),
                          owner_ca_pem=der_to_pem(result.owner_ca_der), bundle=result.bundle_raw,
                          channel_secret=result.channel_secret)

    def _check_gateway_tls(self, core: DeviceOnboarding) -> None:
        """Now that the owner is proven, the TLS peer must hold a certificate from the owner CA."""
        peer = getattr(self.transport, "gateway_peer_cert", None)
        if peer is None or not core.owner_ca_der:   # (a PSK device has no owner CA: MACs only)
            return  # transport without TLS certificates (in-memory tests, OSCORE)
        owner_ca = x509.load_der_x509_certificate(core.owner_ca_der)
        try:
            x509.load_der_x509_certificate(peer).verify_directly_issued_by(owner_ca)
        except Exception:
            raise NotAuthorized("gateway TLS certificate is not issued by the proven owner") from None

    async def onboard(self, report: AgentReport) -> AgentState:
        started = self.clock()
        self._wire_s = 0.0
        core = self._core()
        try:
            return await self._onboard(core, report, started)
        finally:
            await self._device(self._identity.close)   # TPM: flush what was loaded, disconnect
            report.wire_ms = round(self._wire_s * 1000, 1)
            if hasattr(self._identity, "tpm_usage"):
                commands, seconds = self._identity.tpm_usage()
                report.tpm_commands, report.tpm_ms = commands, round(seconds * 1000, 1)

    async def _onboard(self, core: DeviceOnboarding, report: AgentReport, started: float) -> AgentState:
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
                           onboarding_ms=(self.clock() - started) * 1000,
                           operational=self.operational if self.operational is not None
                           else res.bundle.settings.get("est_operational") is True)
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
            if self._operational_on(state):
                await self._operational_step(report)
            if telemetry > 0:
                await self.publish(state, telemetry, report)
        except Exception as exc:
            report.error = exc.message if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
        finally:
            report.bytes_sent = getattr(self.transport, "bytes_sent", 0) + self.est_bytes_sent
            report.bytes_received = getattr(self.transport, "bytes_received", 0) + self.est_bytes_received
            close = getattr(self.transport, "close", None)
            if close is not None:
                await close()
            if getattr(self.transport, "wire_bytes_sent", None) is not None:
                report.wire_bytes_sent = self.transport.wire_bytes_sent
                report.wire_bytes_received = self.transport.wire_bytes_received
        return report

    async def publish(self, state: AgentState, count: int, report: AgentReport) -> None:
        from .telemetry import publish_telemetry, publish_telemetry_with_tpm_key, telemetry_payload

        if self._psk:   # TLS-PSK: identity = serial, key from the channel secret
            from .psk import PSK_PUBLISH_DELAYS, device_terminus_psk, publish_telemetry_psk
            # Right after onboarding the terminus may not know this device's key yet (it
            # follows the vault: `terminus serve` every 10 s), so a refused handshake is
            # retried with growing delays (~16 s in all) before it counts as a failure.
            for delay in (*PSK_PUBLISH_DELAYS, None):
                try:
                    codes = await publish_telemetry_psk(
                        host=state.terminus_host, port=state.terminus_port, identity=self.serial,
                        key=device_terminus_psk(self.dir, self.serial),
                        topic=f"{state.topic_prefix}/telemetry",
                        payloads=[telemetry_payload(self.serial, i, self.clock()) for i in range(count)])
                    break
                except OSError:
                    if delay is None:
                        raise
                    await self.sleep(delay)
            report.telemetry_sent = sum(1 for c in codes if c < 0x80)
            report.telemetry_refused = sum(1 for c in codes if c >= 0x80)
            return
        cert_file, key_file = self.terminus_credentials(state)
        publish = publish_telemetry
        if self._tpm:   # the TLS key is in the TPM
            publish = functools.partial(publish_telemetry_with_tpm_key, tcti=self.factory["tcti"],
                                        workdir=self._tls_workdir())
        codes = await publish(
            host=state.terminus_host, port=state.terminus_port, ca_file=self.dir / "owner-ca.pem",
            cert_file=cert_file, key_file=key_file,
            topic=f"{state.topic_prefix}/telemetry",
            payloads=[telemetry_payload(self.serial, i, self.clock()) for i in range(count)])
        # MQTT v5: reason codes below 0x80 are success (16 = accepted, nobody subscribed yet).
        report.telemetry_sent = sum(1 for c in codes if c < 0x80)
        report.telemetry_refused = sum(1 for c in codes if c >= 0x80)

    # --- operational certificates -----------------------------------------------------------
    async def _operational_step(self, report: AgentReport) -> None:
        # Not fatal: without a new operational pair the device goes on with the pair it has.
        try:
            result = await self.renew_if_due()
        except (OSError, ValueError) as exc:
            result = RenewalResult("failed", error=f"{type(exc).__name__}: {exc}")
        report.operational = result.outcome if result else None
        if result is not None and result.error:
            report.errors = (report.errors + [result.error])[-MAX_ERRORS:]

    @property
    def _psk(self) -> bool:
        return self.factory.get("identity") == "psk"

    @property
    def _tpm(self) -> bool:
        return self.factory.get("identity") == "tpm"

    def _tls_workdir(self) -> Path:
        return self.dir / "tpm-tls"     # the OpenSSL config of the TLS children

    def _default_est_factory(self) -> Callable[..., EstClient]:
        if not self._tpm:
            return EstClient
        from .est_tpm import TpmEstClient   # the TLS key is in the TPM: EST from a child process
        return functools.partial(TpmEstClient, tcti=self.factory["tcti"],
                                 workdir=self._tls_workdir())

    def operational_files(self) -> OperationalFiles:
        """The operational pair's files; a TPM device keeps TSS2 key files (operational.tss2.pem)."""
        if not self._tpm:
            return OperationalFiles(self.dir)
        from ..identity.tpm.opkeys import TpmKeyStore
        return OperationalFiles(self.dir, keys=TpmKeyStore(self.factory["tcti"]))

    def _operational_on(self, state: AgentState) -> bool:
        if self._psk:
            return False   # no key pair: no certificates, operational or other
        return state.onboarded and (self.operational if self.operational is not None
                                    else state.operational)

    def _ldevid_files(self) -> tuple[Path, Path]:
        return self.dir / "ldevid.pem", self.open_identity().ldevid_key_file()

    def terminus_credentials(self, state: AgentState) -> tuple[Path, Path]:
        """The operational pair when on and valid, else the LDevID (a fallback, not a downgrade:
        the owner issued both)."""
        if self._operational_on(state):
            files = self.operational_files()
            cert = files.current()
            if cert is not None and not expired(cert, self.clock()):
                return files.cert_file, files.key_file
        return self._ldevid_files()

    async def _terminus_check(self, cert_file: Path, key_file: Path) -> None:
        """Does the terminus take this pair? TLS with it, then MQTT CONNECT; nothing published."""
        from .telemetry import publish_telemetry, publish_telemetry_with_tpm_key
        state = load_state(self.dir)
        publish = publish_telemetry
        if self._tpm:   # the pair to test has its key in the TPM (before promotion too)
            publish = functools.partial(publish_telemetry_with_tpm_key, tcti=self.factory["tcti"],
                                        workdir=self._tls_workdir())
        await publish(host=state.terminus_host, port=state.terminus_port,
                      ca_file=self.dir / "owner-ca.pem", cert_file=cert_file,
                      key_file=key_file, topic=f"{state.topic_prefix}/telemetry", payloads=[])

    def _plan(self, state: AgentState, cert, now: float) -> None:
        """Record when to renew `cert` (jittered once per certificate, then kept)."""
        nb, na = validity(cert)
        state.operational_not_after = na
        state.renew_at = renew_at(nb, na, self.renewal_rand.random, now=now)

    async def renew_if_due(self, *, force: bool = False) -> RenewalResult | None:
        """Enroll (LDevID) or re-enroll (current pair) when due; None when operational is off."""
        async with self._renew_lock:  # run() and maintain() may overlap; the files may not
            return await self._renew_if_due(force)

    async def _renew_if_due(self, force: bool) -> RenewalResult | None:
        state = await asyncio.to_thread(load_state, self.dir)
        if not self._operational_on(state):
            return None
        files = self.operational_files()
        await asyncio.to_thread(files.recover)
        current = await asyncio.to_thread(files.current)
        now = self.clock()
        if current is not None and abs((state.operational_not_after or 0) - validity(current)[1]) > 1:
            self._plan(state, current, now)  # state.json lagged behind the files (crash, upgrade)
            await asyncio.to_thread(save_state, self.dir, state)
        if not force and not is_due(current, now, state.renew_at):
            return RenewalResult("not_due", cert=current, next_at=state.renew_at)
        # An expired pair cannot authenticate simplereenroll: start again from the LDevID.
        reenroll = current is not None and not expired(current, now)
        cert_file, key_file = (files.cert_file, files.key_file) if reenroll else self._ldevid_files()
        try:
            owner_ca = x509.load_pem_x509_certificate((self.dir / "owner-ca.pem").read_bytes())
            template = x509.load_pem_x509_certificate(cert_file.read_bytes())
            client = self.est_factory(state.gateway_url, ca_pem=(self.dir / "owner-ca.pem").read_text(),
                                      client_cert_file=cert_file, client_key_file=key_file)
        except (OSError, ValueError) as exc:
            return RenewalResult("failed", error=f"cannot set up EST: {type(exc).__name__}: {exc}")
        op = client.simplereenroll if reenroll else client.simpleenroll
        try:
            result = await swap(files, enroll=lambda csr: op(csr, label=EST_LABEL),
                                check=self.terminus_check, owner_ca=owner_ca, serial=self.serial,
                                urn=self.factory["urn"], now=now, template=template)
        finally:
            self.est_bytes_sent += getattr(client, "bytes_sent", 0)
            self.est_bytes_received += getattr(client, "bytes_received", 0)
            await client.close()
        if result.outcome == "promoted":
            self._plan(state, result.cert, now)
            state.operational_renewed_at = now
            await asyncio.to_thread(save_state, self.dir, state)
            result.next_at = state.renew_at
        else:
            log.info("%s: operational certificate %s: %s", self.serial, result.outcome, result.error)
        self.renewals.append(result)
        return result

    async def maintain(self, *, rounds: int | None = None) -> list[RenewalResult]:
        """Keep the operational certificate fresh until cancelled (or for `rounds` checks):
        sleep until due, renew, retry failures with backoff honouring Retry-After."""
        failures, done = 0, 0
        while rounds is None or done < rounds:
            done += 1
            try:
                result = await self.renew_if_due()
            except (OSError, ValueError) as exc:  # storage trouble: retry, do not stop maintaining
                result = RenewalResult("failed", error=f"{type(exc).__name__}: {exc}")
            if result is None:
                break  # operational certificates are off
            if result.next_at is not None and result.outcome in ("promoted", "not_due"):
                failures, delay = 0, result.next_at - self.clock()
            else:
                delay = self.renewal_backoff.delay(failures, result.retry_after)
                failures += 1
            await self.sleep(min(max(delay, 0.0), MAX_SLEEP))
        return list(self.renewals)
