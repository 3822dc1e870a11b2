"""A PSK-profile box device onboards over CoAP (plain CoAP to the rendezvous, OSCORE-PSK to
the gateway; MACs end to end) with `agent run`'s code path, then publishes over TLS-PSK to
Mosquitto: only under its own topic."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import socket

import pytest

pytest.importorskip("aiocoap.oscore_sitewrapper")

from zerotouch.agent.psk import device_terminus_psk, find_mosquitto_pub, publish_telemetry_psk
from zerotouch.services.bulk import box_psks, claim_box, make_box
from zerotouch.services.terminus import (TelemetryObserver, Terminus, find_mosquitto,
                                         terminus_psk_keys, write_psk_file, write_terminus_config)
from zerotouch.services.vault import load_owner_ca
from zerotouch.transport.coap.security import add_device_psks, start_role_coap_server

from support import need

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class CountingRelay(asyncio.DatagramProtocol):
    """UDP relay in front of one server: counts the device's datagrams and bytes each way."""

    def __init__(self, target):
        self.target, self.client, self.up, self.down = target, None, [], []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if addr == self.target:
            self.down.append(len(data))
            self.transport.sendto(data, self.client)
        else:
            self.client = addr
            self.up.append(len(data))
            self.transport.sendto(data, self.target)


async def _relay(port: int):
    loop = asyncio.get_running_loop()
    transport, relay = await loop.create_datagram_endpoint(lambda: CountingRelay((HOST, port)),
                                                           local_addr=(HOST, 0))
    return transport, relay, transport.get_extra_info("sockname")[1]


async def test_psk_box_device_onboards_over_coap_and_publishes_with_tls_psk(pskf, tmp_path):
    if find_mosquitto() is None or find_mosquitto_pub() is None:
        need("mosquitto and mosquitto_pub", "apt-get install mosquitto mosquitto-clients")
    from zerotouch.agent.runtime import Agent
    from zerotouch.services.manufacturer import read_factory
    from zerotouch.transport.coap.security import device_coap_transport
    from zerotouch.transport.coap.server import start_coap_server
    f = pskf.f
    gw_dir = tmp_path / "gw"
    gw_dir.mkdir()
    gw_coap = await start_role_coap_server(gw_dir, HOST, 0, gateway=f.gateway, security="oscore-psk")
    f.gateway.psk_lookup = gw_coap.psk_file.psk_for          # what build_gateway does
    rv_coap = await start_coap_server(f.rendezvous, None, bind=(HOST, 0))
    rv_t, rv_relay, rv_port = await _relay(rv_coap.port)
    gw_t, gw_relay, gw_port = await _relay(gw_coap.port)
    files = write_terminus_config(tmp_path / "terminus", ca=load_owner_ca(f.tmp / "vault"), host=HOST,
                                  port=_free_port(), psk_port=_free_port())
    f.gateway.cfg.terminus_host, f.gateway.cfg.terminus_psk_port = HOST, files.psk_port
    terminus = Terminus(files)
    await terminus.start()
    try:
        made = make_box(f.manufacturer, tmp_path / "factory",
                        dataclasses.replace(f.info, url=f"https://{HOST}:{rv_port}"), 2, identity="psk")
        for dev in made.devices:
            await f.rendezvous.register(dev.registration)
            assert not (dev.device_dir / "idevid.key").exists()   # no key pair at all
        # the box claim: the rendezvous gets each K_rv (derived from the box), the gateway the PSKs
        result = await claim_box(f.rendezvous, made.label, HOST, gw_port, f.owner_fp_hex)
        assert len(result.claimed) == 2
        for dev in made.devices:
            await f.gateway.register_label(made.label.device_label(dev.serial).url, "psk box")
        add_device_psks(gw_dir, box_psks(made.label, [d.serial for d in made.devices]))

        reports = []
        for dev in made.devices:
            factory = read_factory(dev.device_dir)
            assert factory["identity"] == "psk"
            transport = device_coap_transport(factory, security="oscore-psk", device_dir=dev.device_dir)
            agent = Agent(dev.device_dir, transport=transport, max_attempts=1)
            if not reports:
                rv_relay.up.clear(); rv_relay.down.clear(); gw_relay.up.clear(); gw_relay.down.clear()
            report = await agent.run(telemetry=0)
            assert report.onboarded and not report.error, report
            if not reports:   # bytes of the first device's whole onboarding, datagrams on the wire
                up = rv_relay.up + gw_relay.up
                down = rv_relay.down + gw_relay.down
                print(f"\nPSK device over CoAP: payload {report.bytes_sent} B sent / "
                      f"{report.bytes_received} B received; datagrams up {len(up)} / {sum(up)} B "
                      f"(largest {max(up)}), down {len(down)} / {sum(down)} B (largest {max(down)})")
                assert max(up) <= 1024 and sum(up) + sum(down) <= 4096
            reports.append(report)
            state = json.loads((dev.device_dir / "state.json").read_text())
            assert state["phase"] == "onboarded" and state["terminus_port"] == files.psk_port
            assert not (dev.device_dir / "ldevid.pem").exists()

        # the terminus learns the devices' TLS-PSK keys from the vault, and reloads
        assert write_psk_file(files, await terminus_psk_keys(f.store, f.vault))
        assert oct(files.psk_file.stat().st_mode & 0o777) == "0o600"
        terminus.reload()
        await asyncio.sleep(0.3)
        a, b = made.devices
        async with TelemetryObserver.for_terminus(files) as observer:
            report = await Agent(a.device_dir).run(telemetry=2)   # a restart: straight to the terminus
            assert report.straight_to_terminus and report.telemetry_sent == 2, report
            assert await observer.wait_for({a.serial}, timeout=10)
            # device a publishes under device b's topic: not authorized, nothing delivered
            codes = await publish_telemetry_psk(
                host=HOST, port=files.psk_port, identity=a.serial,
                key=device_terminus_psk(a.device_dir, a.serial),
                topic=f"devices/{b.serial}/telemetry", payloads=[b"forged"])
            assert codes == [135]
            # ... nor can it claim b's identity without b's key
            with pytest.raises(OSError):
                await publish_telemetry_psk(host=HOST, port=files.psk_port, identity=b.serial,
                                            key=device_terminus_psk(a.device_dir, a.serial),
                                            topic=f"devices/{b.serial}/telemetry", payloads=[b"x"],
                                            timeout=10)
            await asyncio.sleep(0.3)
            assert observer.counts.get(b.serial, 0) == 0
            assert all(payload != b"forged" for _t, payload in observer.messages)
        for key in (await terminus_psk_keys(f.store, f.vault)).values():
            assert key.hex() not in files.log.read_text(errors="replace")
    finally:
        await terminus.stop()
        rv_t.close(); gw_t.close()
        await gw_coap.shutdown()
        await rv_coap.shutdown()
