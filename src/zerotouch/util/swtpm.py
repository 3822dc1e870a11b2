"""Software TPMs (swtpm) for tests and the demo: a TPM maker CA, and one swtpm process per
simulated device, each manufactured with an EK certificate from that CA (`swtpm_setup
--create-ek-cert`). The CA's state lives in a directory of our choosing, never in
/var/lib/swtpm-localca, so nothing depends on or touches machine state. Its root plays the
TPM manufacturer root an owner chooses to trust.

A resource manager in front of a swtpm (`start_session_bus` + `start_abrmd`): swtpm serves one
client connection at a time and, with no resource manager, has only 3 transient object slots,
which the tpm2 OpenSSL provider exhausts during a TLS handshake (TPM_RC_OBJECT_MEMORY). A real
device has the kernel's /dev/tpmrm0; here tpm2-abrmd plays that part: it owns the swtpm
connection, multiplexes any number of clients and swaps their objects in and out. Clients reach
it over a private D-Bus session bus that we start (no system services) with the TCTI
``tabrmd:bus_type=session,bus_name=NAME``, and need ``DBUS_SESSION_BUS_ADDRESS`` (the bus's
``env``) in their environment: the tabrmd TCTI has no option for the bus address, and GLib
reads the variable when a process first connects to its session bus, so one process talks to
one session bus (run every abrmd of a process on the same bus, under a unique name each).
"""
from __future__ import annotations

import ctypes.util
import itertools
import os
import random
import select
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "apt-get install swtpm swtpm-tools libtss2-dev; pip install 'tpm2-pytss>=2.3,<4'"
ABRMD_INSTALL_HINT = "apt-get install tpm2-abrmd libtss2-tcti-tabrmd0 dbus-daemon dbus-bin"


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
    """Two consecutive free ports (swtpm's server and control sockets). Drawn below Linux's
    ephemeral range: above it, bind(0) hands out even ports whose odd neighbours are what
    outgoing connections use, so under load (a demo fleet, TIME_WAIT) port + 1 is rarely free."""
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(20000, 32000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free TCP ports in 20000-32000")


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




# --- resource manager: a private D-Bus session bus + one tpm2-abrmd per swtpm ---------------

def abrmd_missing() -> list[str]:
    """What is missing to run tpm2-abrmd in front of a swtpm (empty when nothing is)."""
    missing = [t for t in ("dbus-daemon", "dbus-send", "tpm2-abrmd") if not shutil.which(t)]
    if ctypes.util.find_library("tss2-tcti-tabrmd") is None:
        missing.append("libtss2-tcti-tabrmd.so.0")
    return missing


def have_abrmd() -> bool:
    return not abrmd_missing()


def _require_abrmd() -> None:
    missing = abrmd_missing()
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: {ABRMD_INSTALL_HINT}")


@dataclass
class SessionBus:
    """A private dbus-daemon (session configuration), ours to stop."""
    address: str
    proc: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs in its environment to reach this bus."""
        return {"DBUS_SESSION_BUS_ADDRESS": self.address}


@dataclass
class ResourceManager:
    """A tpm2-abrmd serving one swtpm; `tcti` is what clients pass (tpm2-pytss, OpenSSL)."""
    tcti: str
    bus_name: str
    proc: subprocess.Popen
    bus: SessionBus
    log: object  # the temporary file with abrmd's output

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def start_session_bus(directory: Path | None = None, timeout: float = 10) -> SessionBus:
    """Start a dbus-daemon with the session configuration; its socket is in `directory`
    (default: the system temporary directory). Stop it with `stop_session_bus`."""
    _require_abrmd()
    cmd = ["dbus-daemon", "--session", "--nofork", "--nosyslog", "--print-address=1"]
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        cmd.append(f"--address=unix:dir={directory}")
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL)
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().decode().strip() if ready else ""
        proc.stdout.close()  # the address is all it prints there
        if not line.startswith("unix:"):
            stop(proc)
            err.seek(0)
            msg = err.read().decode(errors="replace").strip() or "no address printed"
            raise RuntimeError(f"dbus-daemon did not start: {msg}")
    return SessionBus(line, proc)


def stop_session_bus(bus: SessionBus) -> None:
    """Stop the bus, after its abrmds (and preferably after its clients closed their TPM
    contexts: GLib may end a process whose bus connection goes away; with the tabrmd TCTI
    3.0.0 an open context survived it in our tests)."""
    stop(bus.proc)


def _name_has_owner(bus: SessionBus, name: str) -> bool:
    r = subprocess.run(
        ["dbus-send", f"--bus={bus.address}", "--print-reply", "--reply-timeout=2000",
         "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
         "org.freedesktop.DBus.NameHasOwner", f"string:{name}"],
        capture_output=True, text=True, timeout=5)
    return r.returncode == 0 and "boolean true" in r.stdout


_names = itertools.count()


def start_abrmd(swtpm: SwTPM, bus: SessionBus, *, name: str | None = None,
                timeout: float = 10) -> ResourceManager:
    """Put a tpm2-abrmd in front of a started swtpm and wait until it owns its bus name.

    From then on abrmd holds swtpm's only connection: use `ResourceManager.tcti`, never the
    swtpm's own TCTI, and pass `bus.env` to client processes."""
    _require_abrmd()
    if not swtpm.tcti.startswith("swtpm:"):
        raise ValueError(f"not a swtpm TCTI: {swtpm.tcti!r}")
    name = name or f"org.zerotouch.Tabrmd.p{os.getpid()}.n{next(_names)}"
    cmd = ["tpm2-abrmd", "--session", f"--dbus-name={name}", f"--tcti={swtpm.tcti}",
           "--flush-all", "--logger=stdout"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")  # abrmd refuses root otherwise (containers, CI)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, **bus.env))
    rm = ResourceManager(f"tabrmd:bus_type=session,bus_name={name}", name, proc, bus, log)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if proc.poll() is not None:
            out = rm.output()
            log.close()
            raise RuntimeError(f"tpm2-abrmd exited with {proc.returncode}: {out.strip()}")
        if _name_has_owner(bus, name):
            return rm
        if time.monotonic() > deadline:
            stop_abrmd(rm)
            raise RuntimeError(f"tpm2-abrmd did not take {name} on {bus.address} within "
                               f"{timeout}s: {rm.output().strip()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def stop_abrmd(rm: ResourceManager) -> None:
    """Stop the resource manager (its clients' TPM connections end; the swtpm keeps running,
    and accepts a direct client again)."""
    stop(rm.proc)
    if not rm.log.closed:
        rm.log.close()

