"""`zerotouch demo --identity psk`: PSK-profile devices claimed one by one with their cpsk
(K_rv; the PSK goes only into the gateway's psk.json), onboarding over CoAP with oscore-psk
through two gateway replicas, publishing over the terminus' TLS-PSK listener."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from zerotouch.agent.psk import find_mosquitto_pub
from zerotouch.services.demo import DemoOptions, run_demo
from support import need

pytest.importorskip("aiocoap.oscore_sitewrapper")


@pytest.fixture
def mosquitto_pub(mosquitto):
    if find_mosquitto_pub() is None:
        need("mosquitto_pub", "apt-get install mosquitto-clients")


async def test_demo_psk_fleet_onboards_over_coap_and_publishes_with_tls_psk(tmp_path, mosquitto_pub):
    from rich.console import Console
    opts = DemoOptions(devices=3, state_dir=tmp_path / "demo", concurrency=3, telemetry=2, gateways=2,
                       identity="psk", transport="coap", coap_security="oscore-psk")
    result = await run_demo(opts, Console(file=open(os.devnull, "w")))
    assert result.failed == 0 and result.onboarded == 3, [r.error for r in result.reports]
    assert result.telemetry_devices == 3 and result.telemetry_messages == 6
    assert result.identity == "psk" and result.coap_security == "oscore-psk"
    assert result.p50_ms is not None and result.p95_ms >= result.p50_ms
    assert result.largest_device_message <= 1024 and result.mean_bytes_sent < 1024
    assert all(c > 0 for c in result.gateway_connections)        # both replicas took devices
    root = tmp_path / "demo"
    psks = {}
    for d in (root / "factory" / "devices").iterdir():
        assert not (d / "idevid.key").exists() and not (d / "ldevid.pem").exists()
        assert json.loads((d / "state.json").read_text())["phase"] == "onboarded"
        psks[d.name] = (d / "psk.secret").read_text().strip()
    # the owner got the PSKs; the rendezvous only K_rv (its database holds no PSK)
    assert json.loads((root / "gateway" / "psk.json").read_text())["devices"] == psks
    rv_db = b"".join(p.read_bytes() for p in (root / "rendezvous").rglob("*.db"))
    assert all(bytes.fromhex(k) not in rv_db and k.encode() not in rv_db for k in psks.values())
    psk_file = root / "terminus" / "psk_file"
    assert oct(psk_file.stat().st_mode & 0o777) == "0o600"
    assert sorted(line.split(":")[0] for line in psk_file.read_text().split()) == sorted(psks)
    logs = "".join(p.read_text(errors="replace") for p in (root / "logs").iterdir())
    logs += (root / "terminus" / "mosquitto.log").read_text(errors="replace")
    for key in [*psks.values(), *(line.split(":")[1] for line in psk_file.read_text().split())]:
        assert key not in logs


def test_demo_cli_identity_psk_json_summary(tmp_path, mosquitto_pub):
    proc = subprocess.run([sys.executable, "-m", "zerotouch.cli", "demo", "--identity", "psk",
                           "--devices", "3", "--json", "--state-dir", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("devices", "onboarded", "failed", "p50_ms", "p95_ms", "telemetry_devices",
                "mean_bytes_sent", "mean_bytes_received", "largest_device_message"):
        assert key in summary
    assert summary["onboarded"] == 3 and summary["telemetry_devices"] == 3
    assert summary["identity"] == "psk" and summary["transport"] == "coap"
    assert summary["coap_security"] == "oscore-psk"
    bad = subprocess.run([sys.executable, "-m", "zerotouch.cli", "demo", "--identity", "psk",
                          "--transport", "http"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "oscore-psk" in bad.stderr
