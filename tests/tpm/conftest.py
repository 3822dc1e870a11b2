"""A fresh software TPM (swtpm) per test, manufactured with an EK certificate from a local CA.

The local CA (swtpm_localca) is kept per test session in a temporary directory, not in
/var/lib/swtpm-localca, so tests never depend on or touch machine state. Its root certificate
plays the TPM manufacturer root the owner chooses to trust.

`swtpm_rm` puts a resource manager (tpm2-abrmd, as /dev/tpmrm0 on a real device) in front of
the swtpm: one private D-Bus session bus per test session, one abrmd per swtpm.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Expected TPM errors (the attack tests) would otherwise be logged by the TSS C library.
os.environ.setdefault("TSS2_LOG", "all+none")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support import need  # noqa: E402
from zerotouch.util.swtpm import LocalCA, SwTPM, have_swtpm, make_local_ca, manufacture, start, stop  # noqa: E402,F401

from zerotouch.util.swtpm import INSTALL_HINT as INSTALL  # noqa: E402
from zerotouch.util.swtpm import (  # noqa: E402
    ABRMD_INSTALL_HINT, SessionBus, abrmd_missing, start_abrmd, start_session_bus, stop_abrmd,
    stop_session_bus)


def _have_tools() -> bool:
    if not have_swtpm():
        return False
    try:
        import tpm2_pytss  # noqa: F401
    except Exception:
        return False
    return True


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


@pytest.fixture(scope="session")
def dbus_session_bus(tmp_path_factory) -> SessionBus:
    """A private D-Bus session bus for the resource managers (started on first use)."""
    missing = abrmd_missing()
    if missing:
        need(", ".join(missing), ABRMD_INSTALL_HINT)
    bus = start_session_bus(tmp_path_factory.mktemp("dbus"))
    yield bus
    stop_session_bus(bus)


@pytest.fixture
def swtpm_rm(swtpm_factory, dbus_session_bus, monkeypatch) -> SwTPM:
    """A fresh swtpm behind its own tpm2-abrmd: `.tcti` is
    tabrmd:bus_type=session,bus_name=NAME. DBUS_SESSION_BUS_ADDRESS is set for the test (the
    tabrmd TCTI reads it, in this process and in the children it starts)."""
    if not _have_tools():
        need("swtpm", INSTALL)
    tpm = swtpm_factory()
    rm = start_abrmd(tpm, dbus_session_bus)
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", dbus_session_bus.address)
    yield dataclasses.replace(tpm, tcti=rm.tcti)
    stop_abrmd(rm)
