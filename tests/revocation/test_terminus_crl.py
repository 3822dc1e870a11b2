"""A real Mosquitto 2.0 refuses a revoked device once the CRL is written and reloaded, while an
unrevoked device keeps publishing. Also pins down what SIGHUP does and does not do."""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from zerotouch.agent.telemetry import TelemetryError, publish_telemetry
from zerotouch.pki.ca import CertificateAuthority, make_crl, make_root
from zerotouch.pki.keys import generate_p256
from zerotouch.protocol.errors import MalformedMessage
from zerotouch.services.revocation import RevocationService
from zerotouch.services.terminus import (Terminus, TerminusError, TerminusFiles,
                                         client_tls_context, find_mosquitto, write_terminus_config)
from zerotouch.services.terminus_crl import CrlWatcher, run_terminus_with_crl, verify_crl
from zerotouch.util.files import atomic_write

from revocation_harness import Onboarded, free_port, onboard, owner_ca
from support import need


def _require_mosquitto() -> None:
    if find_mosquitto() is None:
        need("mosquitto", "apt-get install mosquitto")


async def publish(files: TerminusFiles, dev: Onboarded) -> bool:
    """True if the device connected and its QoS 1 message was accepted; False if refused."""
    try:
        codes = await publish_telemetry(host=files.host, port=files.port, ca_file=files.ca,
                                        cert_file=dev.cert_file, key_file=dev.key_file,
                                        topic=f"devices/{dev.serial}/telemetry", payloads=[b"t"],
                                        timeout=5)
    except TelemetryError:
        return False
    return all(c < 0x80 for c in codes)  # 0 accepted, 16 accepted with no subscriber


@contextlib.asynccontextmanager
async def connected(files: TerminusFiles, dev: Onboarded):
    ctx = client_tls_context(files.ca, dev.cert_file, dev.key_file)
    async with aiomqtt.Client(files.host, files.port, protocol=aiomqtt.ProtocolVersion.V5,
                              tls_context=ctx, timeout=5) as client:
        yield client


async def still_open(client: aiomqtt.Client, dev: Onboarded) -> bool:
    try:
        await client.publish(f"devices/{dev.serial}/telemetry", b"still here", qos=1, timeout=3)
        return True
    except aiomqtt.MqttError:
        return False


@dataclass
class Env:
    fleet: object
    a: Onboarded
    b: Onboarded
    service: RevocationService
    files: TerminusFiles
    terminus: Terminus
    clock: list


@pytest.fixture
async def env(fleet, tmp_path: Path):
    _require_mosquitto()
    a, b = await onboard(fleet), await onboard(fleet)
    clock = [time.time()]
    svc = RevocationService(fleet.store, fleet.vault, clock=lambda: clock[0], recheck_s=0)
    crlfile = tmp_path / "terminus" / "crl.pem"
    files = write_terminus_config(tmp_path / "terminus", ca=owner_ca(fleet), port=free_port(),
                                  crlfile=crlfile)
    await svc.write_crl_file(crlfile)  # Mosquitto will not start without its crlfile
    terminus = Terminus(files)
    async with terminus:
        yield Env(fleet, a, b, svc, files, terminus, clock)


def _watcher(env: Env, **kw) -> CrlWatcher:
    return CrlWatcher(env.files.directory / "crl.pem", env.service.current_crl,
                      ca_cert=owner_ca(env.fleet).cert, terminus=env.terminus, **kw)


async def test_revoked_device_is_refused_and_the_other_still_publishes(env: Env):
    watcher = _watcher(env)
    assert await publish(env.files, env.a) and await publish(env.files, env.b)
    async with connected(env.files, env.a) as a_conn:
        await env.service.revoke_device(env.a.serial, "keyCompromise")
        assert await watcher.check() == "restarted"  # a new revocation: restart the broker
        assert not await still_open(a_conn, env.a)  # A's open connection is gone with it
    assert not await publish(env.files, env.a)
    assert "certificate verify failed" in env.files.log.read_text()
    assert await publish(env.files, env.b)
    assert await watcher.check() == "unchanged"
    assert not await publish(env.files, env.a)  # and it stays refused


async def test_sighup_reloads_the_crl_for_new_connections_only(env: Env):
    """Measured Mosquitto 2.0.11 behaviour: why a new revocation restarts the broker."""
    watcher = _watcher(env, restart_on_revocation=False)
    async with connected(env.files, env.a) as a_conn, connected(env.files, env.b) as b_conn:
        await env.service.revoke_device(env.a.serial)
        assert await watcher.check() == "reloaded"
        assert "Reloading config." in env.files.log.read_text()
        assert not await publish(env.files, env.a)  # new handshakes see the new CRL ...
        assert await still_open(a_conn, env.a)  # ... but an open connection is never re-checked
        assert await still_open(b_conn, env.b)
    # (a second connection of B would take over B's client id, so B reconnects only now)
    assert await publish(env.files, env.b)


async def test_a_crl_that_only_got_newer_is_reloaded_without_dropping_anyone(env: Env):
    watcher = _watcher(env)
    await env.service.revoke_device(env.a.serial)
    assert await watcher.check() == "restarted"
    async with connected(env.files, env.b) as b_conn:
        env.clock[0] += env.service.crl_validity_s / 2  # time to re-sign; no new serial
        assert await watcher.check() == "reloaded"
        assert (watcher.restarts, watcher.reloads) == (1, 1)
        assert await still_open(b_conn, env.b)
    assert not await publish(env.files, env.a)


async def test_an_expired_crl_refuses_every_device(env: Env):
    """Fail closed: why the watcher verifies nextUpdate and keeps refreshing."""
    ca = owner_ca(env.fleet)
    expired = make_crl(ca, [], next_update_s=-60, number=1)
    from cryptography.hazmat.primitives.serialization import Encoding
    with pytest.raises(MalformedMessage, match="expired"):
        verify_crl(expired.public_bytes(Encoding.DER), ca.cert, time.time())
    atomic_write(env.files.directory / "crl.pem", expired.public_bytes(Encoding.PEM))
    env.terminus._proc.send_signal(1)  # SIGHUP, as the watcher would
    await asyncio.sleep(0.3)
    assert not await publish(env.files, env.b)


async def test_watcher_keeps_the_last_good_crl_when_the_source_fails_or_lies(fleet, tmp_path):
    ca = owner_ca(fleet)
    svc = RevocationService(fleet.store, fleet.vault)
    crlfile = tmp_path / "crl.pem"
    replies: list = []

    async def source() -> bytes:
        item = replies.pop(0)
        if isinstance(item, Exception):
            raise item
        return item
    watcher = CrlWatcher(crlfile, source, ca_cert=ca.cert)
    replies.append(ConnectionError("gateway down"))
    with pytest.raises(TerminusError, match="no valid CRL"):
        await watcher.prime()  # no file, no CRL: do not start a broker that refuses everyone
    good = await svc.current_crl()
    replies.append(good)
    await watcher.prime()
    before = crlfile.read_bytes()
    rogue_key = generate_p256()
    rogue = CertificateAuthority(rogue_key, make_root(rogue_key, ca.cert.subject.rfc4514_string()))
    from cryptography.hazmat.primitives.serialization import Encoding
    for bad in (ConnectionError("down"), b"garbage",
                make_crl(rogue, [], next_update_s=3600, number=2).public_bytes(Encoding.DER)):
        replies.append(bad)
        assert await watcher.check() == "failed"
        assert crlfile.read_bytes() == before
    # a restarted terminus with a valid file on disk starts even while the source is down
    again = CrlWatcher(crlfile, source, ca_cert=ca.cert)
    replies.append(ConnectionError("still down"))
    await again.prime()
    assert crlfile.read_bytes() == before


async def test_run_terminus_with_crl_follows_another_replicas_revocation(fleet, tmp_path):
    _require_mosquitto()
    a, b = await onboard(fleet), await onboard(fleet)
    ca = owner_ca(fleet)
    terminus_side = RevocationService(fleet.store, fleet.vault, recheck_s=0)
    gateway_side = RevocationService(fleet.store, fleet.vault)  # e.g. `gateway revoke`
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(run_terminus_with_crl(
        tmp_path / "terminus", ca=ca, host="127.0.0.1", port=free_port(),
        source=terminus_side.current_crl, interval=0.1, stop=stop,
        on_ready=lambda term: ready.set_result(term.files)))
    try:
        files = await asyncio.wait_for(asyncio.shield(ready), 10)
        assert "crlfile" in files.config.read_text()
        assert await publish(files, a) and await publish(files, b)
        await gateway_side.revoke_device(a.serial)
        deadline = time.monotonic() + 10
        # both at once: while the broker restarts, A and B are briefly refused alike
        while await publish(files, a) or not await publish(files, b):
            assert time.monotonic() < deadline, "terminus still accepts the revoked device"
            await asyncio.sleep(0.1)
        assert not await publish(files, a)
        assert "certificate verify failed" in files.log.read_text()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)  # returns cleanly and stops Mosquitto
    assert not await publish(files, b)  # the broker is gone
