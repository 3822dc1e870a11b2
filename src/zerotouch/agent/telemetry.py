"""Device side of operation: publish telemetry to the owner's terminus over MQTT v5 + TLS.

The device authenticates with its owner-issued LDevID as the TLS client certificate and
verifies the terminus against the owner CA (hostname check on).

Why paho directly and not aiomqtt: aiomqtt 2.x `Client.publish()` waits for the PUBACK but drops
its reason code (its `_on_publish` ignores `reason_code`). The agent needs that code: under MQTT v5
mosquitto 2.0 answers an ACL-denied QoS 1 publish with PUBACK 135 (Not authorized) instead of
silently discarding it, which is the only signal a device gets that its topic is wrong. paho's
public VERSION2 `on_publish(client, userdata, mid, reason_code, properties)` callback carries it.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

PUBACK_ACCEPTED = 0
PUBACK_NOT_AUTHORIZED = 135


class TelemetryError(Exception):
    """The terminus could not be reached, refused the TLS handshake or the MQTT CONNECT."""


def telemetry_payload(serial: str, seq: int, now: float | dt.datetime) -> bytes:
    """A small JSON telemetry record."""
    ts = now.timestamp() if isinstance(now, dt.datetime) else float(now)
    return json.dumps({"serial": serial, "seq": seq, "ts": round(ts, 3)},
                      separators=(",", ":"), sort_keys=True).encode()


def _tls_context(ca_file: Path, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True  # explicit: the terminus must be the host the owner named
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


def _code(rc) -> int:
    return int(getattr(rc, "value", rc))


async def publish_telemetry(*, host: str, port: int, ca_file: Path, cert_file: Path | None,
                            key_file: Path | None, topic: str, payloads: list[bytes],
                            timeout: float = 10.0) -> list[int]:
    """Publish each payload at QoS 1 and return the PUBACK reason codes (0 = accepted).

    Raises TelemetryError if the connection, TLS handshake or CONNECT fails, or on timeout.
    """
    loop = asyncio.get_running_loop()
    connected: asyncio.Future[int] = loop.create_future()
    acks: dict[int, asyncio.Future[int]] = {}

    def _resolve(fut: asyncio.Future, value=None, exc: BaseException | None = None) -> None:
        if fut.done():
            return
        fut.set_exception(exc) if exc else fut.set_result(value)

    # paho calls these on its network thread; hand results to the event loop thread-safely.
    def on_connect(_c, _u, _flags, reason_code, _props) -> None:
        loop.call_soon_threadsafe(_resolve, connected, _code(reason_code))

    def on_publish(_c, _u, mid, reason_code, _props) -> None:
        # runs on the loop after publish() returned, so the future for `mid` exists by then
        loop.call_soon_threadsafe(lambda: _resolve(acks[mid], _code(reason_code))
                                  if mid in acks else None)

    def on_disconnect(_c, _u, _flags, reason_code, _props) -> None:
        def fail_all() -> None:
            # With TLS 1.3 the client finishes its handshake before the broker checks the client
            # certificate, so a rejected certificate shows up here, as a close before CONNACK.
            stage = "after CONNECT" if connected.done() else \
                "before CONNACK (client certificate rejected?)"
            err = TelemetryError(f"terminus closed the connection {stage}: {reason_code}")
            _resolve(connected, exc=err)
            for fut in acks.values():
                _resolve(fut, exc=err)
        loop.call_soon_threadsafe(fail_all)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                         reconnect_on_failure=False)
    client.on_connect, client.on_publish = on_connect, on_publish
    client.on_disconnect = on_disconnect
    client.tls_set_context(_tls_context(ca_file, cert_file, key_file))

    try:
        # connect() does TCP + TLS handshake synchronously: keep it off the event loop
        await asyncio.wait_for(loop.run_in_executor(None, client.connect, host, port, 30),
                               timeout)
    except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
        raise TelemetryError(f"cannot connect to mqtts://{host}:{port}: {exc!r}") from exc
    client.loop_start()
    try:
        async with asyncio.timeout(timeout):
            rc = await connected
            if rc != 0:
                raise TelemetryError(f"terminus refused CONNECT: reason code {rc}")
            for payload in payloads:
                info = client.publish(topic, payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise TelemetryError(f"publish failed locally: {mqtt.error_string(info.rc)}")
                acks[info.mid] = loop.create_future()
            return [await acks[mid] for mid in list(acks)]
    except TimeoutError as exc:
        raise TelemetryError(f"terminus did not answer within {timeout}s") from exc
    finally:
        client.on_disconnect = None  # our own disconnect is not an error
        client.disconnect()
        await loop.run_in_executor(None, client.loop_stop)


async def publish_telemetry_with_tpm_key(*, tcti: str, workdir: Path, **kwargs) -> list[int]:
    """publish_telemetry in a child process whose OpenSSL has the tpm2 provider, so the TLS
    client key can be a TSS2 PRIVATE KEY in the TPM at `tcti` (identity/tpm/openssl_env.py
    says why it must be another process). Same arguments and result."""
    import os
    import sys
    from ..identity.tpm.openssl_env import tpm_tls_environment
    env = dict(os.environ, **tpm_tls_environment(tcti, workdir))
    job = {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items() if k != "payloads"}
    job["payloads"] = [p.decode() for p in kwargs["payloads"]]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zerotouch.agent.telemetry", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await proc.communicate(json.dumps(job).encode())
    try:
        result = json.loads(out)
    except ValueError:
        raise TelemetryError(f"TPM TLS publisher failed: {err.decode(errors='replace')[-300:]}") from None
    if "error" in result:
        raise TelemetryError(result["error"])
    return result["codes"]


def _child_main() -> int:
    """The child side: one job as JSON on stdin, {"codes": [...]} or {"error": "..."} on stdout."""
    import sys
    job = json.load(sys.stdin)
    for k in ("ca_file", "cert_file", "key_file"):
        job[k] = Path(job[k]) if job.get(k) else None
    job["payloads"] = [p.encode() for p in job["payloads"]]
    try:
        codes = asyncio.run(publish_telemetry(**job))
    except (TelemetryError, OSError, ssl.SSLError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps({"codes": codes}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main())
