"""`terminus serve` with the TLS-PSK listener, driven only by the CLI, each role its own process:
PSK devices claimed with `introducer claim --device-psk`, onboarded over CoAP (oscore-psk), the
terminus' psk_file (0600) follows the vault so they publish; a revoked device's key leaves it."""
from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import time
from pathlib import Path

import pytest

from zerotouch.agent.psk import device_terminus_psk, find_mosquitto_pub, publish_telemetry_psk
from zerotouch.util.net import free_port
from support import need

pytest.importorskip("aiocoap.oscore_sitewrapper")
from cli_support import serve, zt as _zt


def zt(*args: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    return _zt(*args, cwd=cwd, timeout=timeout)


def _psk_identities(psk_file: Path) -> set[str]:
    return {line.split(":")[0] for line in psk_file.read_text().split()}


def test_terminus_serve_tls_psk_listener_follows_onboarding_and_revocation(tmp_path, mosquitto):
    if find_mosquitto_pub() is None:
        need("mosquitto_pub", "apt-get install mosquitto-clients")
    rv_port, gw_port, term_port, psk_port = free_port(), free_port(), free_port(), free_port()
    procs = []
    try:
        zt("manufacture", "--dir", "f", "--init", cwd=tmp_path)
        zt("rendezvous", "init", "--dir", "rv", "--port", str(rv_port),
           "--manufacturer-ca", "f/manufacturer-ca.pem", cwd=tmp_path)
        zt("gateway", "init", "--dir", "gw", "--port", str(gw_port), "--terminus-port", str(term_port),
           "--terminus-psk-port", str(psk_port), "--manufacturer-ca", "f/manufacturer-ca.pem",
           "--rendezvous-info", "rv/public.json", cwd=tmp_path)
        procs.append(serve("rendezvous", "serve", "--dir", "rv", "--coap", "--coap-security", "none",
                           cwd=tmp_path, ready="CoAP"))
        procs.append(serve("gateway", "serve", "--dir", "gw", "--coap", "--coap-security", "oscore-psk",
                           cwd=tmp_path, ready="CoAP"))
        term = serve("terminus", "serve", "--gateway-dir", "gw", cwd=tmp_path, ready="listening")
        procs.append(term)
        psk_file = tmp_path / "gw" / "terminus" / "psk_file"
        assert stat.S_IMODE(psk_file.stat().st_mode) == 0o600 and _psk_identities(psk_file) == set()

        out = zt("manufacture", "--dir", "f", "--rendezvous-info", "rv/public.json", "--count", "2",
                 "--identity", "psk", cwd=tmp_path).stdout
        serials = [line.split()[0] for line in out.splitlines() if line.strip()]
        assert len(serials) == 2
        devs = [tmp_path / "f" / "devices" / s for s in serials]
        for serial, dev in zip(serials, devs):
            label = (tmp_path / "f" / "labels" / f"{serial}.txt").read_text().strip()
            zt("introducer", "claim", label, "--gateway-dir", "gw", "--rendezvous-ca", "rv/tls-ca.pem",
               "--device-psk", str(dev / "psk.secret"), "--description", "PSK sensor", cwd=tmp_path)
        # each device onboards over CoAP and publishes over TLS-PSK: the terminus learns its
        # key from the vault within its 10 s round, the agent retries the refused handshake
        for dev in devs:
            report = json.loads(zt("agent", "run", "--device-dir", str(dev), "--transport", "coap",
                                   "--coap-security", "oscore-psk", "--telemetry", "2",
                                   cwd=tmp_path, timeout=120).stdout)
            assert report["onboarded"] and report["telemetry_sent"] == 2, report
        assert _psk_identities(psk_file) == set(serials)
        assert stat.S_IMODE(psk_file.stat().st_mode) == 0o600

        # revoke the second device: its key leaves psk_file at the next round; it is refused
        zt("gateway", "revoke", "--dir", "gw", "--device", serials[1], cwd=tmp_path)
        deadline = time.monotonic() + 25
        while serials[1] in _psk_identities(psk_file) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _psk_identities(psk_file) == {serials[0]}
        assert stat.S_IMODE(psk_file.stat().st_mode) == 0o600
        time.sleep(0.5)   # Mosquitto reloads on SIGHUP right after the rewrite
        with pytest.raises(OSError, match="refused"):
            asyncio.run(publish_telemetry_psk(
                host="127.0.0.1", port=psk_port, identity=serials[1],
                key=device_terminus_psk(devs[1], serials[1]),
                topic=f"devices/{serials[1]}/telemetry", payloads=[b"after revocation"], timeout=10))
        codes = asyncio.run(publish_telemetry_psk(
            host="127.0.0.1", port=psk_port, identity=serials[0],
            key=device_terminus_psk(devs[0], serials[0]),
            topic=f"devices/{serials[0]}/telemetry", payloads=[b"still here"], timeout=10))
        assert codes[0] < 0x80
        log = (tmp_path / "gw" / "terminus" / "mosquitto.log").read_text(errors="replace")
        for dev, serial in zip(devs, serials):
            assert device_terminus_psk(dev, serial).hex() not in log
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
