"""A fresh software TPM (swtpm) per test, manufactured with an EK certificate from a local CA.

The local CA (swtpm_localca) is kept per test session in a temporary directory, not in
/var/lib/swtpm-localca, so tests never depend on or touch machine state. Its root certificate
plays the TPM manufacturer root the owner chooses to trust.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Expected TPM errors (the attack tests) would otherwise be logged by the TSS C library.
os.environ.setdefault("TSS2_LOG", "all+none")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support import need  # noqa: E402

INSTALL = "apt-get install swtpm swtpm-tools libtss2-dev; pip install 'tpm2-pytss>=2.3,<4'"


def _have_tools() -> bool:
    if not all(shutil.which(t) for t in ("swtpm", "swtpm_setup", "swtpm_localca")):
        return False
    try:
        import tpm2_pytss  # noqa: F401
    except Exception:
        return False
    return True


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


@pytest.fixture(scope="session")
def tpm_ca(tmp_path_factory) -> LocalCA:
    """The TPM manufacturer: swtpm's local CA, created on first use (one per test session)."""
    if not _have_tools():
        need("swtpm", INSTALL)
    return make_local_ca(tmp_path_factory.mktemp("swtpm-localca"))


@pytest.fixture(scope="session")
def other_tpm_ca(tmp_path_factory) -> LocalCA:
    """A second, untrusted TPM 'manufacturer'."""
    if not _have_tools():
        need("swtpm", INSTALL)
    return make_local_ca(tmp_path_factory.mktemp("swtpm-otherca"))


@pytest.fixture
def swtpm_factory(tmp_path, tpm_ca):
    """Make fresh swtpm processes; all are stopped after the test."""
    procs: list[subprocess.Popen] = []

    def make(ca: LocalCA | None = None) -> SwTPM:
        state = tmp_path / f"tpm{len(procs)}"
        manufacture(state, ca or tpm_ca)
        tpm = start(state, ca or tpm_ca)
        procs.append(tpm.proc)
        return tpm

    yield make
    for p in procs:
        stop(p)


@pytest.fixture
def swtpm(swtpm_factory) -> SwTPM:
    """One fresh swtpm; `swtpm.tcti` is the TCTI string (swtpm:host=127.0.0.1,port=P)."""
    return swtpm_factory()


@pytest.fixture
def tcti(swtpm) -> str:
    return swtpm.tcti
