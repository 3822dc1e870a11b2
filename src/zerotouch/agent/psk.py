"""The agent's side of the PSK profile after onboarding: its files and telemetry over TLS-PSK.

Python 3.11's `ssl` has no TLS-PSK client (set_psk_client_callback arrived in 3.13), so the
agent publishes with Mosquitto's own client, `mosquitto_pub` (Debian `mosquitto-clients`), one
MQTT v5 connection per batch (`-l`: a message per line, QoS 1), and reads the broker's PUBACK
reason codes from its debug output. The key is not on the command line (where other local
users could read it in /proc): mosquitto_pub reads `--psk`/`--psk-identity` from its options
file `$XDG_CONFIG_HOME/mosquitto_pub`, written 0600 into a private (0700) temporary directory
for the run. A real PSK device does the same with its firmware's TLS-PSK stack.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..protocol.psk import terminus_psk
from ..util.files import atomic_write, fsync_dir

BUNDLE_FILE = "bundle.cose"
SECRET_FILE = "channel.secret"
# retries of a refused TLS-PSK connection (the terminus learns a new device's key from the vault)
PSK_PUBLISH_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0)
_PUBACK = re.compile(r"received PUBACK \(Mid: (\d+), RC:(\d+)\)")


def store_psk_credentials(device_dir: Path, *, bundle: bytes, channel_secret: bytes) -> None:
    """A PSK device keeps the MAC'd bundle and its channel secret (0600); state.json, saved
    after this, commits them."""
    d = Path(device_dir)
    atomic_write(d / BUNDLE_FILE, bundle, sync_dir=False)
    atomic_write(d / SECRET_FILE, channel_secret.hex().encode(), mode=0o600, sync_dir=False)
    fsync_dir(d)


def device_terminus_psk(device_dir: Path, serial: str) -> bytes:
    secret = bytes.fromhex((Path(device_dir) / SECRET_FILE).read_text().strip())
    return terminus_psk(secret, serial)


class _Refused(Exception):
    pass


def find_mosquitto_pub() -> str | None:
    return shutil.which("mosquitto_pub")


async def publish_telemetry_psk(*, host: str, port: int, identity: str, key: bytes, topic: str,
                                payloads: list[bytes], timeout: float = 20.0) -> list[int]:
    """Publish `payloads` (one line each) with TLS-PSK; return the PUBACK reason code of each
    (MQTT v5: < 0x80 success, 135 = not authorized). A message without a PUBACK counts 0x80."""
    exe = find_mosquitto_pub()
    if exe is None:
        raise OSError("mosquitto_pub is not installed (apt-get install mosquitto-clients): "
                      "Python 3.11 has no TLS-PSK client")
    if any(b"\n" in p for p in payloads):
        raise ValueError("telemetry payloads must be single lines")
    with tempfile.TemporaryDirectory(prefix="zt-psk-") as tmp:
        os.chmod(tmp, 0o700)
        atomic_write(Path(tmp) / "mosquitto_pub",
                     f"--psk {key.hex()}\n--psk-identity {identity}\n".encode(), mode=0o600)
        env = {**os.environ, "XDG_CONFIG_HOME": tmp}
        # line-buffered output (stdbuf), so a refused handshake is seen at once: in -l mode
        # mosquitto_pub does not exit after one, it waits, and only a timeout would end it
        stdbuf = shutil.which("stdbuf")
        proc = await asyncio.create_subprocess_exec(
            *([stdbuf, "-oL"] if stdbuf else []),
            exe, "-h", host, "-p", str(port), "-t", topic, "-q", "1", "-V", "mqttv5", "-d", "-l",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env)
        lines: list[str] = []

        async def feed() -> None:
            with contextlib.suppress(OSError):   # it may have exited already: its output says why
                proc.stdin.write(b"".join(p + b"\n" for p in payloads))
                await proc.stdin.drain()
                proc.stdin.close()

        async def read_out() -> None:
            connected = False
            while line := await proc.stdout.readline():
                text = line.decode(errors="replace")
                lines.append(text)
                if "received CONNACK" in text:
                    connected = True
                elif not connected and ("OpenSSL Error" in text or text.startswith("Error")):
                    raise _Refused(text.strip()[:200])

        try:
            _fed, _out, err, _rc = await asyncio.wait_for(
                asyncio.gather(feed(), read_out(), proc.stderr.read(), proc.wait()), timeout)
        except (asyncio.TimeoutError, _Refused) as exc:
            with contextlib.suppress(ProcessLookupError):   # it may have exited on its own
                proc.kill()
            await proc.wait()
            if isinstance(exc, _Refused):
                raise OSError(f"the terminus refused the TLS-PSK connection: {exc}") from None
            raise OSError("mosquitto_pub timed out") from None
    out = "".join(lines).encode()
    codes = {int(m): int(rc) for m, rc in _PUBACK.findall(out.decode(errors="replace"))}
    if proc.returncode != 0 and not codes:
        raise OSError(f"mosquitto_pub failed ({proc.returncode}): "
                      f"{err.decode(errors='replace').strip()[:200]}")
    return [codes.get(i + 1, 0x80) for i in range(len(payloads))]
