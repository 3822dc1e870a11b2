"""The demo end to end on real sockets: every role, TLS, Mosquitto, SQLite or PostgreSQL."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from rich.console import Console

from zerotouch.services.demo import DemoOptions, run_demo
from support import need, pg_reachable


async def _run(tmp_path, db=None, devices=6):
    opts = DemoOptions(devices=devices, db=db, state_dir=tmp_path / "demo", concurrency=3,
                       telemetry=2, gateways=2)
    return await run_demo(opts, Console(file=open(os.devnull, "w")))


async def test_demo_onboards_every_device_to_the_terminus(tmp_path, mosquitto):
    result = await _run(tmp_path)
    assert result.failed == 0 and result.onboarded == 6
    assert result.telemetry_devices == 6          # the broker heard every device
    assert result.telemetry_messages == 12
    assert result.p50_ms is not None and result.p95_ms >= result.p50_ms
    # both gateway replicas served devices: the load balancer spread them
    assert len(result.gateway_connections) == 2 and all(c > 0 for c in result.gateway_connections)
    for report in result.reports:
        assert report.onboarded and report.error is None and report.attempts == 1


async def test_demo_on_postgresql(tmp_path, mosquitto):
    if not pg_reachable():
        need("PostgreSQL on 127.0.0.1:5432", "apt-get install postgresql")
    result = await _run(tmp_path, db="postgresql://127.0.0.1:5432/test", devices=4)
    assert result.failed == 0 and result.telemetry_devices == 4
    assert "postgresql" in result.db


def test_demo_cli_json_summary_is_the_last_line(tmp_path, mosquitto):
    proc = subprocess.run([sys.executable, "-m", "zerotouch.cli", "demo", "--devices", "3", "--json",
                           "--state-dir", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("devices", "onboarded", "failed", "p50_ms", "p95_ms", "telemetry_devices"):
        assert key in summary
    assert summary["devices"] == 3 and summary["onboarded"] == 3 and summary["failed"] == 0
    assert summary["telemetry_devices"] == 3
    # each device's data directory holds its LDevID, key and the owner CA in PEM
    devices = tmp_path / "s" / "factory" / "devices"
    for d in devices.iterdir():
        assert (d / "ldevid.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
        assert "PRIVATE KEY" in (d / "ldevid.key").read_text()
        assert (d / "owner-ca.pem").exists()


async def test_demo_with_operational_certificates_over_est(tmp_path, mosquitto):
    """Devices enroll a short-lived operational certificate over EST (authenticated by their
    LDevID) through the gateway replicas, and the terminus hears them on it."""
    opts = DemoOptions(devices=3, state_dir=tmp_path / "demo", concurrency=3, telemetry=1,
                       gateways=2, operational=True)
    result = await run_demo(opts, Console(file=open(os.devnull, "w")))
    assert result.failed == 0 and result.operational_devices == 3
    assert result.telemetry_devices == 3
    from cryptography import x509
    for d in (tmp_path / "demo" / "factory" / "devices").iterdir():
        op = x509.load_pem_x509_certificate((d / "operational.pem").read_bytes())
        ld = x509.load_pem_x509_certificate((d / "ldevid.pem").read_bytes())
        assert op.serial_number != ld.serial_number and op.subject == ld.subject
        hours = (op.not_valid_after_utc - op.not_valid_before_utc).total_seconds() / 3600
        assert hours <= 24.5   # short-lived (24 h + the 5 min back-dating)
