"""`atomic_write`: a file holds the old or the new content whatever moment the process dies,
and a secret is owner-only from its first byte."""
from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zerotouch.util import files
from zerotouch.util.files import atomic_write, atomic_write_json, read_json

SIZE = 2_000_000  # characters of payload per version: big enough to be killed mid-write

# The child writes complete versions 0, 1, 2, ... of one file for ever, announcing the first.
WRITER = r"""
import sys
from pathlib import Path
from zerotouch.util.files import atomic_write

target, start, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def version(i):
    return ('{"v": %d, "blob": "%s"}\n' % (i, ("%08x" % i) * (size // 8))).encode()

i = start
while True:
    atomic_write(target, version(i))
    if i == start:
        print("ready", flush=True)
    i += 1
"""


def version(i: int) -> bytes:
    return ('{"v": %d, "blob": "%s"}\n' % (i, ("%08x" % i) * (SIZE // 8))).encode()


def assert_complete_version(target: Path, at_least: int) -> int:
    data = target.read_bytes()
    v = json.loads(data)["v"]           # never a broken JSON
    assert data == version(v)           # and exactly one whole version, not a mix
    assert v >= at_least
    return v


def test_killed_writer_leaves_old_or_new_content(tmp_path):
    target = tmp_path / "big.json"
    rnd = random.Random(0x5EED)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    last = -1
    for round_ in range(6):
        start = round_ * 100_000
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(start), str(SIZE)],
                                 stdout=subprocess.PIPE, env=env)
        try:
            assert child.stdout.readline() == b"ready\n"
            time.sleep(rnd.uniform(0.0, 0.12))
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(timeout=10) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
        v = assert_complete_version(target, at_least=start)
        assert v > last
        last = v
        # only hidden temp files may be left beside it (the writer had no chance to clean up)
        others = [p.name for p in tmp_path.iterdir() if p != target]
        assert all(n.startswith(".big.json.") and n.endswith(".tmp") for n in others), others
    # a later write still replaces the file cleanly
    atomic_write(target, version(7))
    assert assert_complete_version(target, 0) == 7


# --- permissions ------------------------------------------------------------------------------
class _Spy:
    """Wraps os.fdopen to look at the temp file before and while bytes are written."""

    def __init__(self, monkeypatch):
        self.seen: list[tuple[str, int, int]] = []   # (when, mode, size)
        real = os.fdopen
        spy = self

        class Watched:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()
                return False

            def write(self, data):
                st = os.fstat(self.fh.fileno())
                spy.seen.append(("write", stat.S_IMODE(st.st_mode), st.st_size))
                return self.fh.write(data)

            def __getattr__(self, name):
                return getattr(self.fh, name)

        def fdopen(fd, *a, **kw):
            st = os.fstat(fd)
            spy.seen.append(("open", stat.S_IMODE(st.st_mode), st.st_size))
            return Watched(real(fd, *a, **kw))

        monkeypatch.setattr(files.os, "fdopen", fdopen)


def test_secret_is_owner_only_from_the_first_byte(tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    old_umask = os.umask(0)            # even a careless umask must not widen a secret
    try:
        atomic_write(tmp_path / "channel.secret", b"ab" * 32, mode=0o600)
    finally:
        os.umask(old_umask)
    assert spy.seen == [("open", 0o600, 0), ("write", 0o600, 0)]
    assert stat.S_IMODE(os.stat(tmp_path / "channel.secret").st_mode) == 0o600


def test_secret_replacing_a_world_readable_file_becomes_owner_only(tmp_path, monkeypatch):
    path = tmp_path / "n_device.secret"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    spy = _Spy(monkeypatch)
    atomic_write(path, b"new", mode=0o600)
    assert all(mode == 0o600 for _, mode, _ in spy.seen)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes() == b"new"


def test_public_file_gets_the_requested_mode(tmp_path):
    atomic_write_json(tmp_path / "state.json", {"phase": "factory"})
    assert stat.S_IMODE(os.stat(tmp_path / "state.json").st_mode) == 0o644
    assert read_json(tmp_path / "state.json") == {"phase": "factory"}


def test_failed_write_keeps_old_content_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"phase": "factory"})

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_json(path, {"phase": "onboarded"})
    monkeypatch.undo()
    assert read_json(path) == {"phase": "factory"}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
