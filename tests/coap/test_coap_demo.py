"""`zerotouch demo --transport coap`: servers run with --coap, devices onboard over CoAP/UDP
(claimed straight to a gateway replica's port) and then reach the terminus over MQTT."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from zerotouch.agent.runtime import DEVICE_TRANSPORTS, device_transport
from zerotouch.services.terminus import find_mosquitto
from zerotouch.transport.coap.client import CoapDeviceTransport
from zerotouch.transport.http.client import HttpDeviceTransport
from support import need


def test_device_transports_by_name():
    assert set(DEVICE_TRANSPORTS) >= {"http", "coap"}
    assert isinstance(device_transport("coap", {"rendezvous_tls_ca_pem": ""}), CoapDeviceTransport)
    assert isinstance(device_transport("http", {}), HttpDeviceTransport)
    with pytest.raises(ValueError, match="unknown transport"):
        device_transport("carrier-pigeon", {})


def test_agent_run_accepts_transport():
    from zerotouch.cli.main import build_parser
    args = build_parser().parse_args(["agent", "run", "--device-dir", "d", "--transport", "coap"])
    assert args.transport == "coap"
    assert build_parser().parse_args(["agent", "run", "--device-dir", "d"]).transport == "http"
    assert build_parser().parse_args(["gateway", "serve", "--dir", "g", "--coap"]).coap
    assert build_parser().parse_args(["rendezvous", "serve", "--dir", "r", "--coap"]).coap


def test_demo_over_coap_onboards_every_device_to_the_terminus(tmp_path):
    if find_mosquitto() is None:
        need("Mosquitto", "apt-get install mosquitto")
    proc = subprocess.run([sys.executable, "-m", "zerotouch.cli", "demo", "--transport", "coap",
                           "--devices", "3", "--json", "--state-dir", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["transport"] == "coap"
    assert summary["devices"] == summary["onboarded"] == 3 and summary["failed"] == 0
    assert summary["telemetry_devices"] == 3          # the terminus heard every device
    assert summary["gateway_connections"] == [2, 1]   # claimed to alternating replicas
    # CoAP payload bytes, as the CoAP slice measured them (~3 KB each way, no message > MAX)
    assert 1000 < summary["mean_bytes_sent"] < 6000 and 1000 < summary["mean_bytes_received"] < 8000
    assert 0 < summary["largest_device_message"] <= 2048
    # The servers really served CoAP, and stopped cleanly on SIGTERM (no traceback in the logs).
    logs = tmp_path / "s" / "logs"
    for name in ("rendezvous", "gateway-1", "gateway-2"):
        text = (logs / f"{name}.log").read_text()
        assert "listening on" in text and "Traceback" not in text, text[-2000:]
