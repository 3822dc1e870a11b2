"""Bad input over CoAP gets a 4.xx with a CBOR ErrorReply and changes nothing."""
from __future__ import annotations

import aiocoap
import pytest
from aiocoap.numbers import codes

from zerotouch.protocol.messages import ErrorReply
from zerotouch.transport.coap.common import MAX_PAYLOAD

from coap_harness import snapshot


@pytest.fixture
async def raw():
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    yield ctx
    await ctx.shutdown()


async def post(raw, url, payload, cf=60, code=codes.POST):
    msg = aiocoap.Message(code=code, payload=payload, uri=url)
    if cf is not None:
        msg.opt.content_format = cf
    return await raw.request(msg).response


def error_of(resp) -> ErrorReply:
    assert resp.opt.content_format == 60
    return ErrorReply.decode(bytes(resp.payload))


@pytest.mark.parametrize("path", ["rv/find-owner", "zt/hello", "zt/prove", "zt/done"])
@pytest.mark.parametrize("payload", [b"", b"\xff\x00garbage", b"\xa1\x01\x02",
                                     bytes.fromhex("d28443a10126a0f640")])
async def test_malformed_payload_is_4xx_with_error_reply(fleet, coap_server, raw, path, payload):
    await fleet.make()
    before = await snapshot(fleet.store)
    resp = await post(raw, f"{coap_server.url}/{path}", payload)
    assert resp.code.class_ == 4, resp.code
    assert error_of(resp).code
    assert await snapshot(fleet.store) == before


async def test_oversized_payload_is_413_and_stored_nothing(fleet, coap_server, raw):
    await fleet.make()
    before = await snapshot(fleet.store)
    resp = await post(raw, f"{coap_server.url}/zt/prove", bytes(MAX_PAYLOAD + 1))
    assert resp.code == codes.REQUEST_ENTITY_TOO_LARGE
    assert error_of(resp).code == "too_large"
    assert resp.opt.size1 == MAX_PAYLOAD
    assert await snapshot(fleet.store) == before


async def test_announced_oversize_is_refused_at_the_first_block(fleet, coap_server, raw):
    msg = aiocoap.Message(code=codes.POST, payload=bytes(1024), uri=f"{coap_server.url}/zt/hello",
                          content_format=60)
    msg.opt.block1 = aiocoap.optiontypes.BlockOption.BlockwiseTuple(0, True, 6)
    msg.opt.size1 = 10 * MAX_PAYLOAD
    resp = await raw.request(msg, handle_blockwise=False).response
    assert resp.code == codes.REQUEST_ENTITY_TOO_LARGE and error_of(resp).code == "too_large"


async def test_wrong_content_format_is_415(fleet, coap_server, raw):
    resp = await post(raw, f"{coap_server.url}/zt/hello", b"{}", cf=50)  # application/json
    assert resp.code == codes.UNSUPPORTED_CONTENT_FORMAT and error_of(resp).code == "media_type"


async def test_get_and_unknown_paths(coap_server, raw):
    assert (await post(raw, f"{coap_server.url}/zt/hello", b"", code=codes.GET)).code == codes.METHOD_NOT_ALLOWED
    assert (await post(raw, f"{coap_server.url}/zt/nope", b"\xa0")).code == codes.NOT_FOUND


async def test_unclaimed_find_owner_is_503_with_max_age(fleet, coap_server, raw):
    dev = await fleet.make(claim=False)
    resp = await post(raw, f"{coap_server.url}/rv/find-owner", fleet.core(dev).find_owner_request())
    assert resp.code == codes.SERVICE_UNAVAILABLE
    reply = error_of(resp)
    assert reply.retry_after is not None and resp.opt.max_age == reply.retry_after > 0


async def test_replayed_hello_is_refused_not_500(fleet, coap_server, raw):
    dev = await fleet.make()
    core = fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    hello = core.hello_request()
    first = await post(raw, f"{coap_server.url}/zt/hello", hello)
    assert first.code == codes.CHANGED
    again = await post(raw, f"{coap_server.url}/zt/hello", hello)   # a new CoAP message, same body
    assert again.code.class_ == 4, again.code
    assert error_of(again).code
