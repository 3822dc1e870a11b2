"""The README walkthrough: each role as its own process on loopback, driven only by the CLI."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from zerotouch.util.net import free_port

from cli_support import serve, zt




def test_each_role_as_its_own_process(tmp_path, mosquitto):
    rv_port, gw_port, term_port = free_port(), free_port(), free_port()
    procs = []
    try:
        zt("manufacture", "--dir", "factory", "--init", cwd=tmp_path)
        zt("rendezvous", "init", "--dir", "rv", "--port", str(rv_port),
           "--manufacturer-ca", "factory/manufacturer-ca.pem", cwd=tmp_path)
        procs.append(serve("rendezvous", "serve", "--dir", "rv", cwd=tmp_path, ready="listening"))
        out = zt("gateway", "init", "--dir", "gw", "--port", str(gw_port), "--terminus-port", str(term_port),
                 "--manufacturer-ca", "factory/manufacturer-ca.pem", "--rendezvous-info", "rv/public.json",
                 cwd=tmp_path).stdout
        assert "owner key fingerprint" in out
        procs.append(serve("gateway", "serve", "--dir", "gw", cwd=tmp_path, ready="listening"))
        procs.append(serve("terminus", "serve", "--gateway-dir", "gw", cwd=tmp_path, ready="listening"))

        made = zt("manufacture", "--dir", "factory", "--rendezvous-info", "rv/public.json", "--count", "2",
                  cwd=tmp_path).stdout.split("\n")
        serials = [line.split()[0] for line in made if line.strip()]
        assert len(serials) == 2
        label = (tmp_path / "factory" / "labels" / f"{serials[0]}.txt").read_text().strip()
        assert label.startswith(f"https://127.0.0.1:{rv_port}/.well-known/tte?otp=")

        # Powered on before anyone claimed it: the device waits (Retry-After) and gives up here.
        early = zt("agent", "run", "--device-dir", f"factory/devices/{serials[0]}", "--max-attempts", "1",
                   cwd=tmp_path, check=False)
        assert early.returncode == 1 and "not claimed" in early.stdout

        claim = zt("introducer", "claim", label, "--gateway-dir", "gw", "--rendezvous-ca", "rv/tls-ca.pem",
                   "--description", "BLD30/2/361 - Thermostat", cwd=tmp_path)
        body = json.loads(claim.stdout)
        assert body["claim"]["status"] == "mapped" and body["claim"]["urn"].endswith(serials[0])
        again = zt("introducer", "claim", label, "--gateway-dir", "gw", "--rendezvous-ca", "rv/tls-ca.pem",
                   cwd=tmp_path, check=False)
        assert again.returncode == 1 and "already used" in again.stderr

        run = zt("agent", "run", "--device-dir", f"factory/devices/{serials[0]}", "--telemetry", "2",
                 cwd=tmp_path)
        report = json.loads(run.stdout)
        assert report["onboarded"] and not report["straight_to_terminus"], report
        assert report["telemetry_sent"] == 2, json.dumps(report)

        # A restarted agent goes straight to the terminus.
        rerun = json.loads(zt("agent", "run", "--device-dir", f"factory/devices/{serials[0]}",
                              "--telemetry", "1", cwd=tmp_path).stdout)
        assert rerun["straight_to_terminus"] and rerun["telemetry_sent"] == 1

        inventory = json.loads(zt("gateway", "inventory", "--dir", "gw", "--json", cwd=tmp_path).stdout)
        assert {d["serial"]: d["state"] for d in inventory} == {serials[0]: "onboarded"}
        assert inventory[0]["description"] == "BLD30/2/361 - Thermostat"
        # The report to the rendezvous is sent in the background; give it a moment.
        for _ in range(50):
            status = json.loads(zt("rendezvous", "status", "--dir", "rv", serials[0], cwd=tmp_path).stdout)
            if status["status"] == "registered":
                break
            time.sleep(0.1)
        assert status["status"] == "registered"
        other = json.loads(zt("rendezvous", "status", "--dir", "rv", serials[1], cwd=tmp_path).stdout)
        assert other["status"] == "not_mapped"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def mosquitto():
    from zerotouch.services.terminus import find_mosquitto
    from support import need
    if find_mosquitto() is None:
        need("Mosquitto", "apt-get install mosquitto")
