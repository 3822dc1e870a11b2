"""Software TPMs (swtpm) for tests and the demo: a TPM maker CA, and one swtpm process per
simulated device, each manufactured with an EK certificate from that CA (`swtpm_setup
--create-ek-cert`). The CA's state lives in a directory of our choosing, never in
/var/lib/swtpm-localca, so nothing depends on or touches machine state. Its root plays the
TPM manufacturer root an owner chooses to trust.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "apt-get install swtpm swtpm-tools libtss2-dev; pip install 'tpm2-pytss>=2.3,<4'"


def have_swtpm() -> bool:
    return all(shutil.which(t) for t in ("swtpm", "swtpm_setup", "swtpm_localca"))


@dataclass
class LocalCA:
    dir: Path
    setup_conf: Path

    @property
    def root_pem(self) -> bytes:
        return (self.dir / "swtpm-localca-rootca-cert.pem").read_bytes()

    @property
    def intermediate_pem(self) -> bytes:
        return (self.dir / "issuercert.pem").read_bytes()


@dataclass
class SwTPM:
    tcti: str
    state: Path
    ca: LocalCA
    proc: subprocess.Popen


def make_local_ca(base: Path) -> LocalCA:
    """A swtpm_localca configuration whose state (root CA, intermediate, serial) lives in base."""
    base.mkdir(parents=True, exist_ok=True)
    conf = base / "swtpm-localca.conf"
    conf.write_text(
        f"statedir = {base}\n"
        f"signingkey = {base}/signkey.pem\n"
        f"issuercert = {base}/issuercert.pem\n"
        f"certserial = {base}/certserial\n")
    options = base / "swtpm-localca.options"
    options.write_text("--platform-manufacturer zerotouch\n--platform-version 2.1\n"
                       "--platform-model test\n")
    setup = base / "swtpm_setup.conf"
    setup.write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {conf}\n"
        f"create_certs_tool_options = {options}\n"
        "active_pcr_banks = sha256\n")
    return LocalCA(base, setup)


def _free_port_pair() -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free TCP ports")


def manufacture(state: Path, ca: LocalCA) -> None:
    state.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--create-ek-cert",
         "--create-platform-cert", "--overwrite", "--config", str(ca.setup_conf)],
        capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"swtpm_setup failed:\n{r.stdout}\n{r.stderr}")


def start(state: Path, ca: LocalCA) -> SwTPM:
    for _attempt in range(5):
        port = _free_port_pair()
        proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2",
             "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
             "--tpmstate", f"dir={state}", "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return SwTPM(f"swtpm:host=127.0.0.1,port={port}", state, ca, proc)
            except OSError:
                time.sleep(0.02)
        stop(proc)  # port race or slow start: try other ports
    raise RuntimeError("swtpm did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


