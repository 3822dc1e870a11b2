"""Running the `zerotouch` CLI as its own process in end-to-end tests."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "zerotouch.cli"]


def zt(*args: str, cwd: Path, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run one command; with `check`, a failure raises with the tail of its output."""
    proc = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"zerotouch {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    return proc


def serve(*args: str, cwd: Path, ready: str) -> subprocess.Popen:
    """Start a server command and wait until it prints `ready`."""
    proc = subprocess.Popen([*CLI, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if ready in line:
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"{args} exited: {proc.stdout.read()[-1500:]}")
    proc.kill()
    raise AssertionError(f"{args} did not become ready")
