"""CoAP server of the rendezvous and the owner gateway (UDP, and CoAP over TLS per RFC 8323).

POST /rv/find-owner            → RendezvousService.find_owner
POST /zt/hello|prove|done      → GatewayService.hello / prove / done
GET  /.well-known/core         → the above as RFC 6690 links

Requests and answers are application/cbor (Content-Format 60). Large bodies travel
block-wise (RFC 7959): aiocoap reassembles Block1 requests and serves Block2 answers from a
short-lived cache; the reassembly here is bounded (4.13 Request Entity Too Large with Size1).
A ProtocolError becomes its response code with a CBOR ErrorReply payload; 5.03 carries the
retry delay in Max-Age (CoAP has no Retry-After). Anything unexpected is a bare 5.00, logged
and never echoed.
"""
from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiocoap
import aiocoap.resource as resource
from aiocoap.blockwise import Block1Spool, IncompleteException
from aiocoap.error import RenderableError
from aiocoap.numbers import codes

from ...protocol.errors import MessageTooLarge, ProtocolError
from ...protocol.messages import ErrorReply
from .binding import ChannelBinding, channel_peer
from .common import ACCEPTED_CF, CBOR_CF, MAX_PAYLOAD, PATHS, code_for_status

log = logging.getLogger("zerotouch.coap")

Handler = Callable[[bytes], Awaitable[bytes]]


def error_message(exc: ProtocolError) -> aiocoap.Message:
    reply = ErrorReply(code=exc.code[:64], message=exc.message[:512], retry_after=exc.retry_after)
    msg = aiocoap.Message(code=code_for_status(exc.status), payload=reply.encode(),
                          content_format=CBOR_CF)
    if exc.retry_after is not None:
        msg.opt.max_age = max(0, min(int(exc.retry_after), 0xFFFFFFFF))
    return msg


class _Refused(RenderableError):
    """A ProtocolError raised where aiocoap expects a renderable error (block reassembly)."""

    def __init__(self, exc: ProtocolError, size1: int | None = None):
        self.exc = exc
        self.size1 = size1

    def to_message(self):
        msg = error_message(self.exc)
        if self.size1 is not None:
            msg.opt.size1 = self.size1
        return msg


class _BoundedBlock1Spool(Block1Spool):
    """aiocoap's Block1 reassembly with a ceiling: a peer cannot grow a request without bound."""

    def __init__(self, max_size: int):
        super().__init__()
        self.max_size = max_size

    def feed_and_take(self, req: aiocoap.Message) -> aiocoap.Message:
        too_large = MessageTooLarge(f"request body exceeds {self.max_size} bytes")
        if req.opt.size1 is not None and req.opt.size1 > self.max_size:
            raise _Refused(too_large, self.max_size)
        b1 = req.opt.block1
        if b1 is not None and b1.start + len(req.payload) > self.max_size:
            self._assemblies.pop(_key(req), None)
            raise _Refused(too_large, self.max_size)
        try:
            return super().feed_and_take(req)
        except ValueError:  # a gap or an overlap between blocks
            self._assemblies.pop(_key(req), None)
            raise IncompleteException from None


def _key(req):
    from aiocoap.blockwise import _extract_block_key
    return _extract_block_key(req)


class CborEndpoint(resource.Resource):
    """One POST endpoint: CBOR bytes in, CBOR bytes out, errors → codes."""

    def __init__(self, fn: Handler, *, max_size: int = MAX_PAYLOAD, name: str = "",
                 step: str = "", binding: ChannelBinding | None = None):
        super().__init__()
        self._fn = fn
        self._name = name
        self._step = step
        # Under a device-bound OSCORE context (PSK or EDHOC) the message must be that device's
        # (binding.py); build_site always gives one, a bare endpoint checks nothing.
        self._binding = binding
        self.max_size = max_size
        self._block1 = _BoundedBlock1Spool(max_size)
        self.requests = 0

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        self.requests += 1
        try:
            cf = request.opt.content_format
            if cf is not None and int(cf) not in ACCEPTED_CF:
                raise ProtocolError(f"send Content-Format {CBOR_CF} (application/cbor), not {int(cf)}",
                                    status=415, code="media_type")
            if len(request.payload) > self.max_size:
                raise MessageTooLarge(f"request body exceeds {self.max_size} bytes")
            payload = bytes(request.payload)
            peer = channel_peer(request) if self._binding is not None else None
            kid = self._binding.check(self._step, payload, peer) if peer is not None else None
            body = await self._fn(payload)
            if peer is not None:
                self._binding.accepted(peer, kid)
        except ProtocolError as exc:
            log.info("CoAP POST %s -> %s %s", self._name, exc.status, exc.code)
            return error_message(exc)
        except Exception:
            log.exception("internal error on CoAP POST %s", self._name)
            return aiocoap.Message(code=codes.INTERNAL_SERVER_ERROR)
        return aiocoap.Message(code=codes.CHANGED, payload=body, content_format=CBOR_CF)


def build_site(rendezvous=None, gateway=None, *, max_size: int = MAX_PAYLOAD,
               channel_binding: bool = True) -> resource.Site:
    """The protocol endpoints. `channel_binding=False` only for tests of the OSCORE layer
    with stand-in services (bodies that are not protocol messages)."""
    site = resource.Site()
    binding = ChannelBinding() if channel_binding else None
    if rendezvous is not None:
        site.add_resource(PATHS["find-owner"], CborEndpoint(rendezvous.find_owner, max_size=max_size,
                                                            name="/rv/find-owner", step="find-owner",
                                                            binding=binding))
    if gateway is not None:
        for step in ("hello", "prove", "done"):
            site.add_resource(PATHS[step], CborEndpoint(getattr(gateway, step), max_size=max_size,
                                                        name=f"/zt/{step}", step=step,
                                                        binding=binding))
    # RFC 6690 resource discovery: GET /.well-known/core lists the endpoints above.
    site.add_resource((".well-known", "core"),
                      resource.WKCResource(site.get_resources_as_linkheader, impl_info=None))
    return site


@dataclass
class CoapServer:
    """A running CoAP server; `port` is the bound port (useful with port 0)."""

    context: aiocoap.Context
    host: str
    port: int
    scheme: str
    site: resource.Site = field(repr=False)
    limiter: object = field(default=None, repr=False)  # RateLimitedSite when limits are on

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def shutdown(self) -> None:
        await self.context.shutdown()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.shutdown()


def _bound_port(context: aiocoap.Context, default: int) -> int:
    for iface in context.request_interfaces:
        inner = getattr(iface, "token_interface", None) or iface
        # UDP: the message interface's asyncio transport; TCP/TLS: the asyncio server.
        mi = getattr(inner, "message_interface", None)
        transport = getattr(mi, "transport", None) if mi is not None else None
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                return sock.getsockname()[1]
        server = getattr(inner, "server", None)
        if server is not None and server.sockets:
            return server.sockets[0].getsockname()[1]
    return default


async def start_coap_server(rendezvous=None, gateway=None, *, bind: tuple[str, int] = ("127.0.0.1", 5683),
                            ssl_context: ssl.SSLContext | None = None,
                            max_size: int = MAX_PAYLOAD, edhoc_identity=None, edhoc_known=None,
                            edhoc_protected=None, rate_limit=None) -> CoapServer:
    """Serve the rendezvous and/or gateway over CoAP.

    Without `ssl_context`: CoAP over UDP (`coap://`). With it: CoAP over TLS, RFC 8323
    (`coaps+tcp://`), ALPN "coap". Port 0 picks a free port (read it from `.port`).
    `rate_limit` (a `ratelimit.RateLimit`): per-source limits in front of everything.
    """
    if rendezvous is None and gateway is None:
        raise ValueError("serve at least one of rendezvous and gateway")
    site = build_site(rendezvous, gateway, max_size=max_size)
    host, port = bind
    if edhoc_identity is not None:  # EDHOC + OSCORE, pinned raw public keys (UDP only)
        if ssl_context is not None:
            raise ValueError("EDHOC + OSCORE runs over UDP; drop ssl_context")
        from .edhoc import KnownDevices, start_edhoc_coap_server
        return await start_edhoc_coap_server(site, identity=edhoc_identity,
                                             known=edhoc_known if edhoc_known is not None else KnownDevices(),
                                             bind=bind,
                                             protected=edhoc_protected, rate_limit=rate_limit)
    limited = rate_limited(site, rate_limit)
    outer = limited or site
    if ssl_context is not None:
        ssl_context.set_alpn_protocols(["coap"])
        ctx = await aiocoap.Context.create_server_context(
            outer, bind=(host, port), transports=["tlsserver"], _ssl_context=ssl_context)
        scheme = "coaps+tcp"
    else:
        ctx = await aiocoap.Context.create_server_context(outer, bind=(host, port), transports=["udp6"])
        scheme = "coap"
    return CoapServer(context=ctx, host=host, port=_bound_port(ctx, port), scheme=scheme, site=site,
                      limiter=limited)


def rate_limited(site, rate_limit):
    """`site` behind per-source token buckets, or None when `rate_limit` is None or all off."""
    if rate_limit is None or not rate_limit.enabled:
        return None
    from .ratelimit import RateLimitedSite
    return RateLimitedSite(site, rate_limit)
