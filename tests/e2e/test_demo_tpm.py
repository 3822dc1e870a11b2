"""`zerotouch demo --identity tpm`: every device has its own swtpm (behind tpm2-abrmd) and its
agent is its own process, publishing over TLS with its TPM-resident key; the gateways check EK chain, credential activation and a PCR quote before releasing
anything, and the summary has the same keys as the software demo plus the TPM figures."""
from __future__ import annotations

import json
import subprocess
import sys

from support import need
from zerotouch.util.swtpm import ABRMD_INSTALL_HINT, INSTALL_HINT, have_abrmd, have_swtpm


def _need_tpm():
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        need("tpm2-pytss", INSTALL_HINT)
    if not have_swtpm():
        need("swtpm", INSTALL_HINT)
    if not have_abrmd():
        need("tpm2-abrmd", ABRMD_INSTALL_HINT)


def test_tpm_demo_onboards_every_device_with_attestation(tmp_path, mosquitto):
    _need_tpm()
    state = tmp_path / "s"
    soft = subprocess.run([sys.executable, "-m", "zerotouch.cli", "demo", "--devices", "1",
                           "--telemetry", "0", "--json"], capture_output=True, text=True, timeout=180)
    proc = subprocess.run([sys.executable, "-m", "zerotouch.cli", "demo", "--identity", "tpm",
                           "--devices", "3", "--telemetry", "2", "--json", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["identity"] == "tpm"
    assert summary["devices"] == 3 and summary["onboarded"] == 3 and summary["failed"] == 0
    assert summary["mean_tpm_commands"] >= 15 and summary["mean_tpm_ms"] > 0
    # MQTT over TLS with the LDevID key in the TPM (OpenSSL's tpm2 provider): the broker heard all
    assert summary["telemetry_devices"] == 3 and summary["telemetry_messages"] == 6
    # the same keys as the software demo
    assert set(json.loads(soft.stdout.strip().splitlines()[-1])) == set(summary)
    # the gateway recorded how each device was attested, and no key file left the TPM
    inv = subprocess.run([sys.executable, "-m", "zerotouch.cli", "gateway", "inventory", "--dir",
                          str(state / "gateway"), "--json"], capture_output=True, text=True, timeout=60)
    records = json.loads(inv.stdout)
    assert len(records) == 3
    for rec in records:
        assert rec["state"] == "onboarded"
        assert rec["attestation"].startswith("TPM attested") and "zt-demo-gateway" in rec["attestation"]
    devices = list((state / "factory" / "devices").iterdir())
    for d in devices:
        assert (d / "ldevid.tss2.pem").read_text().startswith("-----BEGIN TSS2 PRIVATE KEY")
        assert not (d / "idevid.key").exists() and not (d / "ldevid.key").exists()
        assert not (d / "n_device.secret").exists()
