"""Stateless gateways: two processes on one database, a device's requests alternating between them."""
from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from zerotouch.agent.runtime import Agent
from zerotouch.introducer.claim import Owner, claim_device
from zerotouch.services.admin import register_devices
from zerotouch.services.manufacturer import Manufacturer
from zerotouch.services.roles import init_gateway, init_rendezvous
from zerotouch.transport.http.client import HttpDeviceTransport
from zerotouch.util.net import free_port, wait_for_port
from support import drop_pg_schema, make_pg_schema, need, pg_reachable


class AlternatingTransport(HttpDeviceTransport):
    """Sends each gateway request to the next replica in turn and records which got what."""

    def __init__(self, replicas: list[str], **kw):
        super().__init__(**kw)
        self.replicas = replicas
        self.calls: list[tuple[str, str]] = []

    async def gateway(self, gateway_url: str, step: str, body: bytes) -> bytes:
        url = self.replicas[len(self.calls) % len(self.replicas)]
        self.calls.append((step, url))
        return await super().gateway(url, step, body)


async def _start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "zerotouch.cli", *args,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL,
                                                env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_device_requests_alternate_between_two_gateway_processes(tmp_path, backend):
    schema = None
    if backend == "postgresql":
        if not pg_reachable():
            need("PostgreSQL on 127.0.0.1:5432", "apt-get install postgresql")
        schema = await make_pg_schema()
        db = f"postgresql://127.0.0.1:5432/test?schema={schema}"
    else:
        db = f"sqlite:///{tmp_path}/shared.db"
    procs = []
    try:
        factory = Manufacturer(tmp_path / "factory")
        ca = str(tmp_path / "factory" / "manufacturer-ca.pem")
        rv_port, gw1, gw2 = free_port(), free_port(), free_port()
        info = init_rendezvous(tmp_path / "rv", host="127.0.0.1", port=rv_port, manufacturer_cas=[ca], db=db)
        cfg = init_gateway(tmp_path / "gw", host="127.0.0.1", port=gw1, manufacturer_cas=[ca],
                           rendezvous_info=str(tmp_path / "rv" / "public.json"), db=db)
        procs.append(await _start("rendezvous", "serve", "--dir", str(tmp_path / "rv")))
        await wait_for_port("127.0.0.1", rv_port, 30)
        for port in (gw1, gw2):  # one after the other: the second finds the schema migrated
            procs.append(await _start("gateway", "serve", "--dir", str(tmp_path / "gw"), "--port", str(port)))
            await wait_for_port("127.0.0.1", port, 30)

        devices = [factory.make_device(tmp_path / "factory", info) for _ in range(3)]
        assert all(s == 201 for s, _ in await register_devices(info, [d.registration for d in devices]))
        owner = Owner(address="127.0.0.1", port=gw1, fingerprint=cfg["owner_fingerprint"],
                      gateway_url=cfg["url"], admin_token=(tmp_path / "gw" / "admin.token").read_text().strip(),
                      gateway_ca_pem=(tmp_path / "gw" / "vault" / "owner-ca.pem").read_text())
        for d in devices:
            await claim_device(d.label.url, owner, rendezvous_ca_pem=info.tls_ca_pem)

        replicas = [f"https://127.0.0.1:{gw1}", f"https://127.0.0.1:{gw2}"]
        for i, dev in enumerate(devices):
            # start each device on a different replica so both see every step type
            order = replicas if i % 2 == 0 else replicas[::-1]
            transport = AlternatingTransport(order, rendezvous_ca_pem=info.tls_ca_pem)
            report = await Agent(dev.device_dir, transport=transport, max_attempts=1).run(telemetry=0)
            assert report.onboarded and report.error is None, report.errors
            assert [s for s, _ in transport.calls] == ["hello", "prove", "done"]
            # hello and done on one process, prove on the other: state lived only in the database
            assert transport.calls[0][1] != transport.calls[1][1] == order[1]
            state = json.loads((dev.device_dir / "state.json").read_text())
            assert state["phase"] == "onboarded"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            await p.wait()
        if schema:
            await drop_pg_schema(schema)
