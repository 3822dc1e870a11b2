"""`zerotouch demo`: every role on loopback, a fleet manufactured, claimed and onboarded.

Rendezvous and gateway replicas run as their own processes (behind a round-robin balancer,
on one database); Mosquitto is the terminus; the simulated devices run here, concurrently.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..agent.runtime import DEVICE_TRANSPORTS, Agent, AgentReport, device_transport
from ..introducer.claim import Owner, claim_device
from ..util.files import atomic_write_json, read_json
from ..util.net import RoundRobinBalancer, free_port, wait_for_port
from .admin import register_devices
from .manufacturer import Manufacturer, read_factory
from .roles import init_gateway, init_rendezvous, owner_ca
from .terminus import TelemetryObserver, Terminus, find_mosquitto, write_terminus_config

HOST = "127.0.0.1"


@dataclass
class DemoOptions:
    devices: int = 20
    db: str | None = None
    state_dir: Path | None = None
    concurrency: int = 4
    telemetry: int = 3
    gateways: int = 2
    json: bool = False
    serve: bool = False
    operational: bool = False
    transport: str = "http"
    coap_security: str = "edhoc"  # with transport coap: none | edhoc (transport/coap/security.py)
    identity: str = "software"   # tpm: one swtpm per device (services/demo_tpm.py); psk: the
                                 # PSK profile (CoAP with oscore-psk, TLS-PSK at the terminus)


@dataclass
class DemoResult:
    devices: int
    onboarded: int
    failed: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None
    wall_s: float
    onboarding_s: float
    throughput_per_s: float | None
    telemetry_devices: int
    telemetry_messages: int
    gateway_replicas: int
    gateway_connections: list[int]
    db: str
    terminus: str
    state_dir: str
    concurrency: int = 0
    operational_devices: int = 0
    transport: str = "http"
    mean_bytes_sent: float | None = None
    mean_bytes_received: float | None = None
    largest_device_message: int | None = None
    mean_wire_bytes_sent: float | None = None      # HTTPS: TCP payload (TLS + HTTP) per device
    mean_wire_bytes_received: float | None = None
    identity: str = "software"
    coap_security: str | None = None
    mean_wire_ms: float | None = None      # waiting for answers: network + servers
    mean_tpm_ms: float | None = None       # tpm identity: time in TPM commands
    mean_tpm_commands: float | None = None
    reports: list[AgentReport] = field(default_factory=list)

    def summary(self) -> dict:
        keys = ("devices", "onboarded", "failed", "p50_ms", "p95_ms", "max_ms", "wall_s",
                "onboarding_s", "throughput_per_s", "concurrency", "operational_devices",
                "telemetry_devices", "telemetry_messages", "gateway_replicas", "gateway_connections",
                "db", "terminus", "state_dir", "transport", "mean_bytes_sent",
                "mean_bytes_received", "mean_wire_bytes_sent", "mean_wire_bytes_received",
                "largest_device_message", "identity", "mean_wire_ms",
                "mean_tpm_ms", "mean_tpm_commands", "coap_security")
        return {k: getattr(self, k) for k in keys}


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


async def _pg_schema(db: str, create: bool, schema: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url
    u = make_url(db)
    conn = await asyncpg.connect(host=u.host or "127.0.0.1", port=u.port or 5432,
                                 user=u.username, password=u.password, database=u.database)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}" if create else f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


class Processes:
    """Server processes started by the demo; stopped together."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[tuple[str, asyncio.subprocess.Process]] = []

    async def start(self, name: str, *args: str) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "zerotouch.cli", *args,
                                                    stdout=log, stderr=log, env=env)
        self.procs.append((name, proc))

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.returncode is not None:
                tail = (self.log_dir / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    async def stop(self) -> None:
        for _name, proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def run_demo(opts: DemoOptions, console: Console) -> DemoResult:
    if opts.transport not in DEVICE_TRANSPORTS:
        raise ValueError(f"unknown transport {opts.transport!r}")
    psk = opts.identity == "psk"
    if psk and (opts.transport != "coap" or opts.coap_security != "oscore-psk"):
        raise ValueError("PSK devices onboard over CoAP with oscore-psk (--transport coap "
                         "--coap-security oscore-psk, the defaults with --identity psk)")
    if psk and opts.operational:
        raise ValueError("PSK devices have no certificates: no --operational")
    if not psk and opts.transport == "coap" and opts.coap_security not in ("none", "edhoc"):
        raise ValueError("only PSK devices (--identity psk) have PSKs: --coap-security none or edhoc")
    coap = opts.transport == "coap"
    temp = opts.state_dir is None
    root = Path(opts.state_dir or tempfile.mkdtemp(prefix="zerotouch-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    schema = None
    rv_db = gw_db = None
    if opts.db and opts.db.startswith(("postgresql", "postgres")):
        # Each run gets its own schema, so runs never see each other's devices.
        schema = "zt_demo_" + secrets.token_hex(4)
        await _pg_schema(opts.db, True, schema)
        sep = "&" if "?" in opts.db else "?"
        rv_db = gw_db = f"{opts.db}{sep}schema={schema}"
    elif opts.db:
        rv_db = gw_db = opts.db
    procs = Processes(root / "logs")
    terminus = observer = balancer = None
    psk_follower = None
    started = time.monotonic()
    try:
        rv_port, gw_port, term_port = free_port(), free_port(), free_port()
        term_psk_port = free_port() if psk else None
        replica_ports = [free_port() for _ in range(max(1, opts.gateways))]
        factory = Manufacturer(root / "factory", name="Acme Devices")
        ca_file = str(root / "factory" / "manufacturer-ca.pem")
        info = init_rendezvous(root / "rendezvous", host=HOST, port=rv_port, manufacturer_cas=[ca_file], db=rv_db)
        gw_cfg = init_gateway(root / "gateway", host=HOST, port=gw_port, manufacturer_cas=[ca_file],
                              terminus_host=HOST, terminus_port=term_port,
                              rendezvous_info=str(root / "rendezvous" / "public.json"), db=gw_db,
                              bundle_settings={"est_operational": True} if opts.operational else None,
                              terminus_psk_port=term_psk_port)

        console.print(f"[bold]state[/bold] {root}")
        terminus_desc = "none"
        if find_mosquitto():
            files = write_terminus_config(root / "terminus", ca=owner_ca(root / "gateway"), host=HOST,
                                          port=term_port, psk_port=term_psk_port)
            terminus = Terminus(files)
            await terminus.start()
            observer = TelemetryObserver.for_terminus(files)
            await observer.start()
            terminus_desc = terminus.url
            if psk:   # the TLS-PSK listener follows the vault, as `terminus serve` does
                from .demo_psk import PskTerminusFollower
                psk_follower = PskTerminusFollower(root / "gateway", files, terminus)
                await psk_follower.start()
                terminus_desc += f" + TLS-PSK port {term_psk_port}"
        else:
            console.print("[yellow]Mosquitto is not installed (apt-get install mosquitto): devices "
                          "onboard but no terminus runs, so no telemetry is measured.[/yellow]")

        tpms = None
        if opts.identity == "tpm":
            # one swtpm per device; the owner trusts their maker and pins a known-good device's
            # PCRs, before the gateways start (they read trust and policies at start)
            from .demo_tpm import SwtpmFleet
            tpms = SwtpmFleet(root)
            _TPM_FLEETS.append(tpms)
            await tpms.start(opts.devices)
            model = tpms.configure_gateway(root / "gateway")
            console.print(f"{opts.devices} software TPMs running; PCR policy {model!r} captured")

        # With CoAP, each server also listens on UDP on the same port number as its HTTPS.
        # Every simulated device sends from 127.0.0.1, so the per-source CoAP rate limits are off here.
        coap_flag = (["--coap", "--coap-security", opts.coap_security, "--coap-rate", "0",
                      "--coap-handshake-rate", "0"] if coap else [])
        # PSK devices: the rendezvous leg is plain CoAP (the MACs protect it end to end)
        rv_flag = (["--coap", "--coap-security", "none", "--coap-rate", "0",
                    "--coap-handshake-rate", "0"] if psk else coap_flag)
        await procs.start("rendezvous", "rendezvous", "serve", "--dir", str(root / "rendezvous"), *rv_flag)
        for i, port in enumerate(replica_ports):
            await procs.start(f"gateway-{i + 1}", "gateway", "serve", "--dir", str(root / "gateway"),
                              "--port", str(port), *coap_flag)
        balancer = RoundRobinBalancer(HOST, gw_port, [(HOST, p) for p in replica_ports])
        await balancer.start()
        for port in [rv_port, *replica_ports]:
            try:
                await wait_for_port(HOST, port, timeout=30)
            except TimeoutError:
                procs.check()
                raise

        # Factory: identities, IDevIDs, labels, registration at the rendezvous.
        if tpms:
            made = [factory.make_device(root / "factory", info, identity="tpm", tcti=t.tcti,
                                        model=model) for t in tpms.tpms]
        elif psk:   # no key pair, no IDevID: N_device and a 32-byte PSK each
            made = [factory.make_device(root / "factory", info, identity="psk")
                    for _ in range(opts.devices)]
        else:
            made = [factory.make_device(root / "factory", info) for _ in range(opts.devices)]
        regs = await register_devices(info, [d.registration for d in made])
        bad = [s for s, _ in regs if s != 201]
        if bad:
            raise RuntimeError(f"rendezvous refused {len(bad)} registrations (HTTP {bad[0]})")
        console.print(f"manufactured and registered {len(made)} devices")

        # Introducer: claim each label for the owner and add it to the owner's inventory.
        owner = Owner(address=HOST, port=gw_port, fingerprint=gw_cfg["owner_fingerprint"],
                      gateway_url=gw_cfg["url"], admin_token=(root / "gateway" / "admin.token").read_text().strip(),
                      gateway_ca_pem=(root / "gateway" / "vault" / "owner-ca.pem").read_text(),
                      edhoc_fingerprint=gw_cfg.get("edhoc_fingerprint"))
        sem = asyncio.Semaphore(8)
        # The balancer is TCP only: over CoAP each device is claimed straight to one gateway
        # replica's port (alternating), which its redirect then names.
        claim_counts = [0] * len(replica_ports)

        async def introduce(i, dev):
            who = owner
            if coap:
                n = i % len(replica_ports)
                claim_counts[n] += 1
                who = dataclasses.replace(owner, port=replica_ports[n])
            async with sem:
                # a PSK device: the introducer has its PSK and sends only K_rv (cpsk)
                await claim_device(dev.label.url, who, rendezvous_ca_pem=info.tls_ca_pem,
                                   description=f"demo device {dev.serial}",
                                   device_psk=_device_psk(dev.device_dir) if psk else None)
        await asyncio.gather(*(introduce(i, d) for i, d in enumerate(made)))
        if psk:   # what `introducer claim --device-psk --gateway-dir` does: the owner gets the PSKs
            from ..transport.coap.security import add_device_psks
            add_device_psks(root / "gateway", {d.serial: _device_psk(d.device_dir) for d in made})
        console.print(f"claimed {len(made)} devices for owner {gw_cfg['owner_fingerprint'][:16]}…")

        # Power on.
        reports: list[AgentReport] = []
        largest: list[int] = []
        run_sem = asyncio.Semaphore(max(1, opts.concurrency))
        telemetry = opts.telemetry if terminus else 0
        progress = Progress(TextColumn("onboarding"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=False)
        power_on_at = time.monotonic()
        with progress:
            task = progress.add_task("devices", total=len(made))

            async def power_on(dev):
                async with run_sem:
                    transport = device_transport(opts.transport, read_factory(dev.device_dir),
                                                 **({"security": opts.coap_security,
                                                     "device_dir": dev.device_dir} if coap else {}))
                    if tpms:   # each device's agent is its own process, as on real hardware
                        from .demo_tpm import run_agent_process
                        report = await run_agent_process(dev.device_dir, telemetry=telemetry,
                                                         log_dir=root / "logs")
                    else:
                        agent = Agent(dev.device_dir, transport=transport, max_attempts=5, deadline_s=60)
                        report = await agent.run(telemetry=telemetry)
                reports.append(report)
                if getattr(transport, "largest_sent", None) is not None:
                    largest.append(transport.largest_sent)
                progress.advance(task)
            await asyncio.gather(*(power_on(d) for d in made))

        onboarding_s = time.monotonic() - power_on_at
        onboarded_serials = {r.serial for r in reports if r.onboarded}
        if observer is not None and telemetry:
            await observer.wait_for(onboarded_serials, timeout=10)
            # every QoS 1 publish was acknowledged; give the observer's copies a moment to arrive
            expected = telemetry * len(onboarded_serials)
            for _ in range(50):
                if sum(observer.counts.get(s, 0) for s in onboarded_serials) >= expected:
                    break
                await asyncio.sleep(0.1)
        procs.check()
        times = sorted(r.onboarding_ms for r in reports if r.onboarded and r.onboarding_ms is not None)
        failed = [r for r in reports if not r.onboarded or r.error]
        counts = dict(observer.counts) if observer else {}
        result = DemoResult(
            devices=len(made), onboarded=len(made) - len(failed), failed=len(failed),
            p50_ms=_round(percentile(times, 50)), p95_ms=_round(percentile(times, 95)),
            max_ms=_round(times[-1] if times else None), wall_s=round(time.monotonic() - started, 2),
            onboarding_s=round(onboarding_s, 2),
            throughput_per_s=round(len(times) / onboarding_s, 1) if onboarding_s > 0 else None,
            concurrency=opts.concurrency,
            operational_devices=sum(1 for r in reports if r.operational == "promoted"),
            telemetry_devices=sum(1 for s in onboarded_serials if counts.get(s)),
            telemetry_messages=sum(counts.get(s, 0) for s in onboarded_serials),
            gateway_replicas=len(replica_ports),
            gateway_connections=claim_counts if coap else list(balancer.connections.values()),
            db=_safe_db(rv_db or "sqlite (one file per role)"), terminus=terminus_desc,
            state_dir=str(root), reports=sorted(reports, key=lambda r: r.serial),
            transport=opts.transport, coap_security=opts.coap_security if coap else None,
            mean_bytes_sent=_mean([r.bytes_sent for r in reports if r.onboarded]),
            mean_bytes_received=_mean([r.bytes_received for r in reports if r.onboarded]),
            mean_wire_bytes_sent=_mean([r.wire_bytes_sent for r in reports
                                        if r.onboarded and r.wire_bytes_sent is not None]),
            mean_wire_bytes_received=_mean([r.wire_bytes_received for r in reports
                                            if r.onboarded and r.wire_bytes_received is not None]),
            largest_device_message=max(largest) if largest else None, identity=opts.identity,
            mean_wire_ms=_round(_mean([r.wire_ms for r in reports if r.onboarded and r.wire_ms is not None])),
            mean_tpm_ms=_round(_mean([r.tpm_ms for r in reports if r.onboarded and r.tpm_ms is not None])),
            mean_tpm_commands=_round(_mean([r.tpm_commands for r in reports
                                            if r.onboarded and r.tpm_commands is not None])))
        for r in result.reports:
            r.telemetry_sent = counts.get(r.serial, 0) if observer else 0
        if opts.serve:
            endpoints = {"rendezvous": info.url, "gateway": gw_cfg["url"],
                         "gateway_replicas": [f"https://{HOST}:{p}" for p in replica_ports],
                         "terminus": terminus_desc, "db": _safe_db(rv_db or "sqlite"),
                         "devices_dir": str(root / "factory" / "devices"),
                         "labels_dir": str(root / "factory" / "labels"),
                         "gateway_dir": str(root / "gateway"), "rendezvous_dir": str(root / "rendezvous")}
            atomic_write_json(root / "endpoints.json", endpoints)
        return result
    finally:
        if psk_follower is not None and not opts.serve:
            await psk_follower.stop()
        if not opts.serve:
            await _shutdown(procs, balancer, observer, terminus)
            while _TPM_FLEETS:
                _TPM_FLEETS.pop().stop()
            if schema:
                await _pg_schema(opts.db, False, schema)
            if temp:
                shutil.rmtree(root, ignore_errors=True)
        else:
            _SERVING.extend([procs, balancer, observer, terminus])
            if psk_follower is not None:
                _PSK_FOLLOWERS.append(psk_follower)


_SERVING: list = []
_PSK_FOLLOWERS: list = []   # demo --serve --identity psk: stopped with the rest


def _device_psk(device_dir: Path) -> bytes:
    from ..transport.coap.security import DEVICE_PSK_FILE
    return bytes.fromhex((Path(device_dir) / DEVICE_PSK_FILE).read_text().strip())
_TPM_FLEETS: list = []   # swtpm processes to stop with the demo


async def _shutdown(procs, balancer, observer, terminus) -> None:
    if observer:
        await observer.stop()
    if balancer:
        await balancer.stop()
    await procs.stop()
    if terminus:
        await terminus.stop()


def _mean(values: list[int]) -> float | None:
    return round(statistics.fmean(values), 1) if values else None


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def _safe_db(url: str) -> str:
    """Never print a database password."""
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def print_summary(result: DemoResult, console: Console) -> None:
    table = Table(title="devices")
    for col in ("serial", "reached", "onboarding ms", "attempts", "telemetry", "error"):
        table.add_column(col)
    for r in result.reports:
        reached = "terminus" if r.telemetry_sent else ("onboarded" if r.onboarded else "failed")
        table.add_row(r.serial, reached, f"{r.onboarding_ms:.0f}" if r.onboarding_ms else "-",
                      str(r.attempts), str(r.telemetry_sent), (r.error or "")[:60])
    console.print(table)
    s = Table(title="summary", show_header=False)
    s.add_column("what")
    s.add_column("value")
    rows = [("devices", result.devices), ("onboarded", result.onboarded), ("failed", result.failed),
            ("onboarding p50 / p95 / max (ms)", f"{result.p50_ms} / {result.p95_ms} / {result.max_ms}"),
            ("devices at once / onboarded per second", f"{result.concurrency} / {result.throughput_per_s}"),
            ("telemetry: devices heard / messages", f"{result.telemetry_devices} / {result.telemetry_messages}"),
            ("devices on an operational certificate (EST)", result.operational_devices),
            ("device transport", result.transport),
            ("bytes per device sent / received (mean)",
             f"{result.mean_bytes_sent} / {result.mean_bytes_received}"),
            ("on the wire per device sent / received (mean; TLS + HTTP)",
             f"{result.mean_wire_bytes_sent} / {result.mean_wire_bytes_received}"
             if result.mean_wire_bytes_sent is not None else "-"),
            ("largest device message (bytes)", result.largest_device_message or "-"),
            ("device identity", result.identity),
            ("per device: waiting for answers / in the TPM (ms, mean)",
             f"{result.mean_wire_ms} / {result.mean_tpm_ms if result.identity == 'tpm' else '-'}"
             + (f" ({result.mean_tpm_commands} TPM commands)" if result.identity == "tpm" else "")),
            ("gateway replicas (connections each)" if result.transport == "http"
             else "gateway replicas (devices claimed to each)",
             f"{result.gateway_replicas} ({result.gateway_connections})"),
            ("database", result.db), ("terminus", result.terminus), ("wall time (s)", result.wall_s)]
    for k, v in rows:
        s.add_row(k, str(v))
    console.print(s)


def run_demo_cli(args) -> int:
    identity = getattr(args, "identity", "software")
    psk = identity == "psk"
    # --identity psk: CoAP with oscore-psk unless told otherwise (and then refused)
    from ..cli.main import DemoDefault
    transport = getattr(args, "transport", None) or "http"
    coap_security = getattr(args, "coap_security", None) or "edhoc"
    if psk and isinstance(transport, DemoDefault):
        transport = "coap"
    if psk and isinstance(coap_security, DemoDefault):
        coap_security = "oscore-psk"
    transport, coap_security = str(transport), str(coap_security)
    opts = DemoOptions(devices=args.devices, db=args.db, state_dir=args.state_dir,
                       concurrency=args.concurrency, telemetry=args.telemetry, gateways=args.gateways,
                       json=args.json, serve=args.serve, operational=args.operational,
                       transport=transport, coap_security=coap_security, identity=identity)
    if opts.devices < 1:
        print("--devices must be at least 1", file=sys.stderr)
        return 2
    if psk and (transport != "coap" or coap_security != "oscore-psk" or opts.operational):
        print("--identity psk: the devices onboard over CoAP with oscore-psk and have no "
              "certificates (no --transport http, other --coap-security or --operational)",
              file=sys.stderr)
        return 2
    if not psk and coap_security == "oscore-psk":
        print("--coap-security oscore-psk needs devices with PSKs: --identity psk", file=sys.stderr)
        return 2
    if opts.serve and opts.state_dir is None:
        opts.state_dir = Path("demo-state")
    console = Console(stderr=opts.json)  # with --json, stdout carries only the JSON line

    async def main() -> int:
        result = await run_demo(opts, console)
        print_summary(result, console)
        if opts.json:
            print(json.dumps(result.summary()), flush=True)
        if opts.serve:
            console.print(f"every role keeps running; endpoints in {Path(result.state_dir) / 'endpoints.json'}. "
                          "Ctrl-C stops them.")
            try:
                await asyncio.Event().wait()
            finally:
                procs, balancer, observer, terminus = _SERVING
                while _PSK_FOLLOWERS:
                    await _PSK_FOLLOWERS.pop().stop()
                await _shutdown(procs, balancer, observer, terminus)
        return 0 if result.failed == 0 else 1

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130


__all__ = ["run_demo", "DemoOptions", "DemoResult", "read_json"]
