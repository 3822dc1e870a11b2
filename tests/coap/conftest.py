from __future__ import annotations

import pytest

pytest.importorskip("aiocoap")

from zerotouch.transport.coap import start_coap_server  # noqa: E402

from coap_harness import HOST, UdpRelay  # noqa: E402


@pytest.fixture
async def coap_server(fleet):
    """The fleet's rendezvous and gateway on one CoAP/UDP port (port 0: no races)."""
    server = await start_coap_server(fleet.rendezvous, fleet.gateway, bind=(HOST, 0))
    yield server
    await server.shutdown()


@pytest.fixture
async def relay(coap_server):
    r = await UdpRelay((HOST, coap_server.port)).start()
    yield r
    r.close()
