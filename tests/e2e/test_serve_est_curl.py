"""README: with `zerotouch demo --serve`, EST works with curl and openssl against the running gateway."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import need

ROOT = Path(__file__).resolve().parents[2]


def test_readme_curl_commands_against_demo_serve(tmp_path, mosquitto):
    for tool in ("curl", "openssl", "base64"):
        if shutil.which(tool) is None:
            need(tool, f"apt-get install {tool}")
    state = tmp_path / "state"
    demo = subprocess.Popen([sys.executable, "-m", "zerotouch.cli", "demo", "--devices", "2", "--serve",
                             "--state-dir", str(state)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not (state / "endpoints.json").exists():
            assert demo.poll() is None, demo.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "demo --serve did not write endpoints.json"
            time.sleep(0.2)
        endpoints = json.loads((state / "endpoints.json").read_text())
        assert endpoints["gateway"].startswith("https://")
        out = subprocess.run(["bash", str(ROOT / "examples" / "est-with-curl.sh"), str(state)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert out.stdout.count(": OK") == 2          # openssl verify, twice
        assert "nextUpdate=" in out.stdout
        serial = sorted(p.name for p in (state / "factory" / "devices").iterdir())[0]
        assert f"serialNumber = {serial}" in out.stdout or f"serialNumber={serial}" in out.stdout
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            demo.kill()
