"""Terminus (owner's mosquitto) against real clients: identity by client cert, per-device ACL."""
from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from zerotouch.agent.telemetry import (PUBACK_NOT_AUTHORIZED, TelemetryError, publish_telemetry,
                                       telemetry_payload)
from zerotouch.pki.ca import CertificateAuthority, make_root
from zerotouch.pki.keys import generate_p256, save_cert, save_private_key
from zerotouch.services.terminus import (TelemetryObserver, Terminus, TerminusError,
                                         TerminusFiles, client_tls_context, find_mosquitto,
                                         write_terminus_config)


def _require_mosquitto() -> None:
    if find_mosquitto() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mosquitto is required in CI")
        pytest.skip("install mosquitto: apt-get install mosquitto")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ca(name: str) -> CertificateAuthority:
    key = generate_p256()
    return CertificateAuthority(key, make_root(key, name))


@dataclass
class Device:
    serial: str
    cert: Path | None
    key: Path | None


def _device(ca: CertificateAuthority, directory: Path, serial: str) -> Device:
    key = generate_p256()
    d = Device(serial, directory / f"{serial}.pem", directory / f"{serial}.key")
    save_private_key(d.key, key)
    save_cert(d.cert, ca.issue_device(key.public_key(), serial=serial,
                                      urn=f"urn:dev:zerotouch:{serial}"))
    return d


@dataclass
class Env:
    ca: CertificateAuthority
    files: TerminusFiles
    observer: TelemetryObserver
    dir: Path

    async def publish(self, dev: Device, topic: str, payloads: list[bytes],
                      ca_file: Path | None = None, timeout: float = 5.0) -> list[int]:
        return await publish_telemetry(host=self.files.host, port=self.files.port,
                                       ca_file=ca_file or self.files.ca, cert_file=dev.cert,
                                       key_file=dev.key, topic=topic, payloads=payloads,
                                       timeout=timeout)


async def _log_contains(env: Env, text: str, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while text not in env.files.log.read_text():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.fixture
async def env(tmp_path: Path):
    _require_mosquitto()
    ca = _ca("owner CA")
    files = write_terminus_config(tmp_path / "terminus", ca=ca, port=_free_port())
    async with Terminus(files):
        async with TelemetryObserver.for_terminus(files) as observer:
            yield Env(ca, files, observer, tmp_path)


async def test_device_telemetry_reaches_observer(env: Env):
    dev = _device(env.ca, env.dir, "SN-A")
    payloads = [telemetry_payload("SN-A", i, time.time()) for i in range(3)]
    codes = await env.publish(dev, "devices/SN-A/telemetry", payloads)
    assert codes == [0, 0, 0]
    assert await env.observer.wait_for({"SN-A"}, timeout=5)
    # QoS 1 can deliver twice in principle; on a clean local link it must be exactly these
    for _ in range(50):
        if env.observer.counts["SN-A"] >= 3:
            break
        await asyncio.sleep(0.02)
    assert env.observer.counts == {"SN-A": 3}
    assert [p for _, p in env.observer.messages] == payloads
    assert not await env.observer.wait_for({"SN-A", "SN-Z"}, timeout=0.2)  # SN-Z never spoke


async def test_device_cannot_publish_under_another_devices_topic(env: Env):
    a = _device(env.ca, env.dir, "SN-A")
    b = _device(env.ca, env.dir, "SN-B")
    forged = await env.publish(a, "devices/SN-B/telemetry", [b"forged by A"])
    assert forged == [PUBACK_NOT_AUTHORIZED]  # MQTT v5: 0x87 Not authorized
    # the broker handles one client's packets in order: once A's next (own) message arrives,
    # the forged one would already have been delivered if the ACL had let it through
    assert await env.publish(a, "devices/SN-A/telemetry", [b"sentinel"]) == [0]
    assert await env.observer.wait_for({"SN-A"}, timeout=5)
    assert "SN-B" not in env.observer.counts
    assert all(p != b"forged by A" for _, p in env.observer.messages)
    # control: B itself may publish there, and only B's message shows up
    assert await env.publish(b, "devices/SN-B/telemetry", [b"from B"]) == [0]
    assert await env.observer.wait_for({"SN-B"}, timeout=5)
    assert [p for t, p in env.observer.messages if t.startswith("devices/SN-B/")] == [b"from B"]


async def test_device_cannot_publish_outside_its_subtree(env: Env):
    a = _device(env.ca, env.dir, "SN-A")
    for topic in ("admin/config", "devices", "devices/SN-AB/telemetry", "devices/sn-a/x"):
        assert await env.publish(a, topic, [b"x"]) == [PUBACK_NOT_AUTHORIZED], topic


async def test_device_cannot_read_other_devices(env: Env):
    a = _device(env.ca, env.dir, "SN-A")
    b = _device(env.ca, env.dir, "SN-B")
    ctx = client_tls_context(env.files.ca, a.cert, a.key)
    async with aiomqtt.Client(env.files.host, env.files.port, protocol=aiomqtt.ProtocolVersion.V5,
                              tls_context=ctx, timeout=5) as client:
        # mosquitto 2.0.11 grants SUBACK 1 for "devices/#" here; the ACL bites per message, on
        # delivery (READ check), so what matters is what A actually receives
        await client.subscribe("devices/#", qos=1)
        assert await env.publish(b, "devices/SN-B/telemetry", [b"secret of B"]) == [0]
        # A's own message goes out on this same connection: a second connection with A's cert
        # would take over client id "SN-A" (use_username_as_clientid) and drop this one
        await client.publish("devices/SN-A/telemetry", b"own", qos=1)
        received = []
        async with asyncio.timeout(5):
            async for msg in client.messages:
                received.append((msg.topic.value, msg.payload))
                if msg.payload == b"own":
                    break
    assert received == [("devices/SN-A/telemetry", b"own")]
    assert await env.observer.wait_for({"SN-A", "SN-B"}, timeout=5)  # B's message did exist


async def test_client_cert_from_another_ca_cannot_connect(env: Env):
    rogue = _device(_ca("attacker CA"), env.dir, "SN-A")  # same serial, wrong issuer
    with pytest.raises(TelemetryError):
        await env.publish(rogue, "devices/SN-A/telemetry", [b"x"])
    assert await _log_contains(env, "certificate verify failed")  # refused for the right reason
    assert env.observer.counts == {}


async def test_client_without_cert_cannot_connect(env: Env):
    with pytest.raises(TelemetryError):
        await env.publish(Device("anon", None, None), "devices/anon/telemetry", [b"x"])
    assert await _log_contains(env, "peer did not return a certificate")
    assert env.observer.counts == {}


async def test_device_refuses_terminus_not_signed_by_its_owner(env: Env):
    dev = _device(env.ca, env.dir, "SN-A")
    other = env.dir / "other-ca.pem"
    save_cert(other, _ca("someone else").cert)
    with pytest.raises(TelemetryError, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
        await env.publish(dev, "devices/SN-A/telemetry", [b"x"], ca_file=other)


async def test_only_a_tls_listener(env: Env):
    conf = env.files.config.read_text().splitlines()
    directives = [line.split() for line in conf if line.strip() and not line.startswith("#")]
    listeners = [d for d in directives if d[0] == "listener"]
    assert listeners == [["listener", str(env.files.port), env.files.host]]
    assert not [d for d in directives if d[0] in ("port", "bind_address")]  # legacy default listener
    opts = {d[0]: d[1:] for d in directives}
    for key, value in [("require_certificate", ["true"]), ("use_identity_as_username", ["true"]),
                       ("allow_anonymous", ["false"]), ("persistence", ["false"]),
                       ("tls_version", ["tlsv1.2"])]:
        assert opts[key] == value, key
    for key in ("cafile", "certfile", "keyfile", "acl_file"):
        assert Path(opts[key][0]).is_file(), key
    for key in (env.files.server_key, env.files.observer_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    acl = env.files.acl.read_text()
    assert "pattern readwrite devices/%u/#" in acl and "topic read devices/#" in acl
    # and on the wire: a plaintext MQTT CONNECT gets no CONNACK
    reader, writer = await asyncio.open_connection(env.files.host, env.files.port)
    writer.write(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 0]))
    await writer.drain()
    try:
        reply = await asyncio.wait_for(reader.read(4), timeout=3)
    except ConnectionError:
        reply = b""
    writer.close()
    assert not reply.startswith(b"\x20")


async def test_start_failure_reports_log_tail(tmp_path: Path):
    _require_mosquitto()
    with socket.socket() as busy:  # port already taken: mosquitto must exit, not hang
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        files = write_terminus_config(tmp_path, ca=_ca("owner CA"), port=busy.getsockname()[1])
        terminus = Terminus(files, start_timeout=5)
        with pytest.raises(TerminusError, match="mosquitto exited") as info:
            await terminus.start()
    assert "mosquitto.log" in str(info.value)
    assert terminus.url == f"mqtts://127.0.0.1:{files.port}"


async def test_device_cannot_take_over_another_devices_session(env: Env):
    a = _device(env.ca, env.dir, "SN-A")
    b = _device(env.ca, env.dir, "SN-B")
    ctx_b = client_tls_context(env.files.ca, b.cert, b.key)
    async with aiomqtt.Client(env.files.host, env.files.port, identifier="SN-B",
                              protocol=aiomqtt.ProtocolVersion.V5, tls_context=ctx_b,
                              timeout=5) as client_b:
        ctx_a = client_tls_context(env.files.ca, a.cert, a.key)
        # A claims B's client id; the broker replaces it with A's CN, so B is not kicked off
        async with aiomqtt.Client(env.files.host, env.files.port, identifier="SN-B",
                                  protocol=aiomqtt.ProtocolVersion.V5, tls_context=ctx_a,
                                  timeout=5) as client_a:
            await client_a.publish("devices/SN-A/telemetry", b"from A", qos=1)
        await client_b.publish("devices/SN-B/telemetry", b"B still here", qos=1)
    assert await env.observer.wait_for({"SN-A", "SN-B"}, timeout=5)
    assert "Client SN-B already connected" not in env.files.log.read_text()
