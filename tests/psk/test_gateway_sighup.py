"""`gateway serve` keeps one copy of psk.json for the gateway core (hello/prove/done MACs) and
OSCORE-PSK, and SIGHUP re-reads it for both — with or without CoAP — even when an edit left
the file's mtime, size and inode as they were (so the per-lookup change check cannot see it)."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from zerotouch.services import roles, servers
from zerotouch.services.manufacturer import Manufacturer
from zerotouch.util.net import free_port

DEVID = "0a000001"


def _edit_in_place_unseen(path, data: dict) -> None:
    """Rewrite the file in place with same-length content and put its mtime back."""
    st = os.stat(path)
    text = json.dumps(data).encode()
    assert len(text) == st.st_size
    with open(path, "r+b") as fh:
        fh.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (st.st_mtime_ns, st.st_size, st.st_ino)


@pytest.mark.parametrize("coap", [False, True], ids=["https-only", "with-oscore-psk"])
async def test_sighup_reloads_the_gateway_cores_psk_json(tmp_path, monkeypatch, coap):
    if coap:
        pytest.importorskip("aiocoap.oscore_sitewrapper")
    factory = Manufacturer(tmp_path / "factory")
    gw_dir = tmp_path / "gw"
    port = free_port()
    roles.init_gateway(gw_dir, host="127.0.0.1", port=port,
                       manufacturer_cas=[str(factory.dir / "manufacturer-ca.pem")])
    key1, key2 = bytes([1]) * 32, bytes([2]) * 32
    (gw_dir / "psk.json").write_text(json.dumps({"devices": {DEVID: key1.hex()}}))
    os.chmod(gw_dir / "psk.json", 0o600)

    built, coap_servers = [], []
    real_build = servers.build_gateway

    async def build(directory, **kw):
        gw = await real_build(directory, **kw)
        built.append(gw)
        return gw
    monkeypatch.setattr(servers, "build_gateway", build)
    from zerotouch.transport.coap import security
    real_start = security.start_role_coap_server

    async def start(*a, **kw):
        server = await real_start(*a, **kw)
        coap_servers.append(server)
        return server
    monkeypatch.setattr(security, "start_role_coap_server", start)

    ready = asyncio.Event()
    serving = asyncio.create_task(servers.serve_gateway(
        gw_dir, port=port, on_ready=ready.set, coap=coap,
        coap_security="oscore-psk" if coap else "none"))
    try:
        await asyncio.wait_for(ready.wait(), 15)
        [gw] = built
        lookup = gw.service.psk_lookup
        assert lookup(DEVID) == key1
        if coap:   # one copy: the OSCORE contexts come from the core's PskFile
            [server] = coap_servers
            assert server.psk_file is gw.psk_file
        _edit_in_place_unseen(gw_dir / "psk.json", {"devices": {DEVID: key2.hex()}})
        assert lookup(DEVID) == key1                  # the change check cannot see that edit
        loads = gw.psk_file.loads
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            if gw.psk_file.loads > loads:
                break
            await asyncio.sleep(0.01)
        assert gw.psk_file.loads == loads + 1
        assert lookup(DEVID) == key2                  # the core sees the new key
        if coap:
            assert coap_servers[0].psk_file.psk_for(DEVID) == key2
    finally:
        serving.cancel()
        try:
            await serving
        except asyncio.CancelledError:
            pass
