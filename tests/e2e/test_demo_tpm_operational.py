"""`zerotouch demo --identity tpm --operational`: each TPM device (its own swtpm behind
tpm2-abrmd, its agent its own process) onboards with attestation, enrolls an operational
certificate over EST at the gateway replicas with its TPM-resident LDevID as TLS client key,
tests it at Mosquitto with the new key in the TPM, and publishes on it."""
from __future__ import annotations

import json
import subprocess
import sys

from cryptography import x509

from test_demo_tpm import _need_tpm
from zerotouch.pki.keys import public_key_der


def test_tpm_demo_devices_run_on_operational_certificates_in_their_tpm(tmp_path, mosquitto):
    _need_tpm()
    from zerotouch.identity.tpm.keys import parse_tss2_private_key_pem
    state = tmp_path / "s"
    proc = subprocess.run([sys.executable, "-m", "zerotouch.cli", "demo", "--identity", "tpm",
                           "--operational", "--devices", "3", "--telemetry", "2", "--json",
                           "--state-dir", str(state)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["onboarded"] == 3 and summary["failed"] == 0
    assert summary["operational_devices"] == 3
    assert summary["telemetry_devices"] == 3 and summary["telemetry_messages"] == 6
    for d in (state / "factory" / "devices").iterdir():
        op = x509.load_pem_x509_certificate((d / "operational.pem").read_bytes())
        ld = x509.load_pem_x509_certificate((d / "ldevid.pem").read_bytes())
        assert op.subject == ld.subject and op.serial_number != ld.serial_number
        blob, _ = parse_tss2_private_key_pem((d / "operational.tss2.pem").read_bytes())
        assert public_key_der(blob.public_key()) == public_key_der(op.public_key())
        assert not list(d.glob("*.key")) and not list(d.glob("operational.new.*"))
