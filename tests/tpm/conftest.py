"""A fresh software TPM (swtpm) per test, manufactured with an EK certificate from a local CA.

The local CA (swtpm_localca) is kept per test session in a temporary directory, not in
/var/lib/swtpm-localca, so tests never depend on or touch machine state. Its root certificate
plays the TPM manufacturer root the owner chooses to trust.
"""
from __future__ import annotations

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
