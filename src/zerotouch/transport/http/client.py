"""HTTP clients: the device side of onboarding, and the admin/introducer/manufacturer calls."""
from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from typing import Any

import aiohttp

from ...protocol.codec import MAX_MESSAGE
from ...protocol.errors import MalformedMessage, ProtocolError, RemoteError, TryLater
from ...protocol.messages import ErrorReply

CBOR = "application/cbor"
log = logging.getLogger("zerotouch.client")


class PeerRefused(RemoteError):
    """The server answered with an error status."""


@functools.lru_cache(maxsize=64)
def client_ssl_context(ca_pem: str | bytes | None) -> ssl.SSLContext:
    """Verify the server against `ca_pem`; None means 'authenticate in the messages instead'.

    Contexts are cached: building one is cheap only without the system CA store, which we
    never need (every trust anchor here is pinned).
    """
    return new_client_context(ca_pem)


def new_client_context(ca_pem: str | bytes | None, *, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A fresh client context (callers that change it, e.g. aiocoap setting ALPN, need their own)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_pem:
        ctx.load_verify_locations(cadata=ca_pem.decode() if isinstance(ca_pem, bytes) else ca_pem)
    else:
        # Gateway before the owner is known: its certificate is checked against the owner CA
        # once the signed challenge has proved which owner this is (see Agent).
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def _error_from(status: int, body: bytes, headers) -> ProtocolError:
    retry = headers.get("Retry-After")
    retry_after = int(retry) if retry and retry.isdigit() else None
    code, message = "http_error", f"HTTP {status}"
    try:
        reply = ErrorReply.decode(body, max_size=4096)
        code, message = reply.code, reply.message
        retry_after = reply.retry_after if reply.retry_after is not None else retry_after
    except ProtocolError:
        try:
            import json
            data = json.loads(body)
            code, message = data.get("error", code), data.get("message", message)
        except Exception:
            pass
    cls = TryLater if status == 503 else PeerRefused
    return cls(f"{message} (HTTP {status})", status=status, code=code, retry_after=retry_after)


class PeerCertConnector(aiohttp.TCPConnector):
    """Remembers the TLS certificate of the server each request was sent to.

    Read when the connection is handed out, not from the response: aiohttp may already have
    released the connection of a small response by the time the caller looks.
    """

    last_peer_cert: bytes | None = None

    async def connect(self, req, traces, timeout):
        conn = await super().connect(req, traces, timeout)
        ssl_obj = conn.transport.get_extra_info("ssl_object") if conn.transport else None
        self.last_peer_cert = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        return conn


class WireCounter:
    """Bytes a device's TCP sockets handed to and took from the kernel: TLS records (handshake,
    alerts, session tickets) carrying HTTP heads and bodies, i.e. the TCP payload both ways.
    TCP/IP headers, retransmissions and ACKs are not in it (the kernel adds those)."""

    __slots__ = ("sent", "received", "connections")

    def __init__(self):
        self.sent = self.received = self.connections = 0


class CountingSocket(socket.socket):
    """A TCP socket that adds what every send/recv moved to a WireCounter.

    asyncio's socket transport calls these methods on the socket object it was given, and the
    TLS layer sits above that transport, so what is counted here is what crossed the socket."""

    def __init__(self, *args, wire: WireCounter, **kwargs):
        super().__init__(*args, **kwargs)
        self._wire = wire
        wire.connections += 1

    def send(self, data, *args):
        n = super().send(data, *args)
        self._wire.sent += n
        return n

    def sendall(self, data, *args):
        super().sendall(data, *args)
        self._wire.sent += memoryview(data).nbytes

    def sendmsg(self, buffers, *args):
        n = super().sendmsg(buffers, *args)
        self._wire.sent += n
        return n

    def recv(self, bufsize, *args):
        data = super().recv(bufsize, *args)
        self._wire.received += len(data)
        return data

    def recv_into(self, buffer, *args):
        n = super().recv_into(buffer, *args)
        self._wire.received += n
        return n


def counting_socket_factory(wire: WireCounter):
    """An aiohttp/aiohappyeyeballs `socket_factory` making CountingSockets for `wire`."""
    def make(addr_info) -> socket.socket:
        family, type_, proto, _name, _addr = addr_info
        return CountingSocket(family, type_, proto, wire=wire)
    return make


class HttpDeviceTransport:
    """How an agent reaches the rendezvous and the gateway over HTTPS.

    `bytes_sent` / `bytes_received` count message bodies (what the protocol sends);
    `wire_bytes_sent` / `wire_bytes_received` count what its TCP sockets moved (TLS handshakes
    and records, HTTP heads included), for comparison with CoAP datagrams."""

    name = "http"

    def __init__(self, *, rendezvous_ca_pem: str | None, timeout: float = 15.0,
                 keepalive: bool = True):
        self._keepalive = keepalive
        self._rv_ssl = client_ssl_context(rendezvous_ca_pem)
        self._gw_ssl = client_ssl_context(None)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.gateway_peer_cert: bytes | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wire = WireCounter()
        # Only asyncio's own socket transports call the socket's Python methods; an event loop
        # doing its I/O in C on the file descriptor (uvloop) would leave the counts at 0.
        self._wire_measured = True

    @property
    def wire_bytes_sent(self) -> int | None:
        return self.wire.sent if self._wire_measured else None

    @property
    def wire_bytes_received(self) -> int | None:
        return self.wire.received if self._wire_measured else None

    def _new_session(self) -> aiohttp.ClientSession:
        # Without keep-alive every request is a new connection, so a load balancer can send
        # consecutive requests of one onboarding to different gateway replicas.
        self._wire_measured = self._wire_measured and isinstance(
            asyncio.get_running_loop(), asyncio.selector_events.BaseSelectorEventLoop)
        self._connector = PeerCertConnector(force_close=not self._keepalive,
                                            socket_factory=counting_socket_factory(self.wire))
        return aiohttp.ClientSession(timeout=self._timeout, connector=self._connector)

    async def __aenter__(self):
        self._session = self._new_session()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, url: str, body: bytes, ctx: ssl.SSLContext, *, capture_peer: bool = False) -> bytes:
        if self._session is None:
            self._session = self._new_session()
        self.bytes_sent += len(body)
        async with self._session.post(url, data=body, headers={"Content-Type": CBOR}, ssl=ctx) as resp:
            if capture_peer:
                # One request at a time per device, so the connector's last connection is ours.
                self.gateway_peer_cert = self._connector.last_peer_cert
            data = await resp.content.read(MAX_MESSAGE + 1)
            self.bytes_received += len(data)
            if len(data) > MAX_MESSAGE:
                raise MalformedMessage("server answer is too large")
            if resp.status != 200:
                raise _error_from(resp.status, data, resp.headers)
            return data

    async def find_owner(self, rendezvous_url: str, body: bytes) -> bytes:
        return await self._post(f"{rendezvous_url}/rv/v1/find-owner", body, self._rv_ssl)

    async def gateway(self, gateway_url: str, step: str, body: bytes) -> bytes:
        return await self._post(f"{gateway_url}/zt/v1/{step}", body, self._gw_ssl, capture_peer=True)


async def post_json(url: str, *, json_body: Any = None, data: Any = None, content_type: str | None = None,
                    ca_pem: str | None = None, token: str | None = None, insecure: bool = False,
                    timeout: float = 15.0) -> tuple[int, Any]:
    """Small helper for admin/introducer calls; returns (status, parsed JSON or text)."""
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if content_type:
        headers["Content-Type"] = content_type
    ctx = client_ssl_context(None if insecure else ca_pem) if url.startswith("https") else None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.post(url, json=json_body, data=data, headers=headers, ssl=ctx) as resp:
            try:
                return resp.status, await resp.json(content_type=None)
            except Exception:
                return resp.status, await resp.text()


async def post_cbor(url: str, body: bytes, *, ca_pem: str | None, timeout: float = 15.0,
                    session: aiohttp.ClientSession | None = None) -> tuple[int, bytes]:
    ctx = client_ssl_context(ca_pem)
    own = session is None
    s = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
    try:
        async with s.post(url, data=body, headers={"Content-Type": CBOR}, ssl=ctx) as resp:
            return resp.status, await resp.read()
    finally:
        if own:
            await s.close()


class RendezvousReporter:
    """Tells the rendezvous, in the background, that devices reached their owner.

    A device's `done` must not wait on another service; reports queue here and are sent over
    one kept-alive connection, retried with backoff if the rendezvous is away.
    """

    def __init__(self, rendezvous_url: str, ca_pem: str | None, *, retries: int = 8):
        self.url = f"{rendezvous_url}/rv/v1/registered"
        self.ca_pem = ca_pem
        self.retries = retries
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=100_000)
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self.sent = 0
        self.failed = 0

    async def __call__(self, report: bytes) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        try:
            self._queue.put_nowait(report)
        except asyncio.QueueFull:
            self.failed += 1
            log.warning("rendezvous report queue is full; a status update is dropped")

    async def _run(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        while True:
            report = await self._queue.get()
            for attempt in range(self.retries):
                try:
                    status, _ = await post_cbor(self.url, report, ca_pem=self.ca_pem, session=self._session)
                    if status in (200, 204, 409):  # 409: already registered or revoked; nothing to retry
                        self.sent += 1
                        break
                    if 400 <= status < 500:
                        log.warning("rendezvous refused a registration report: HTTP %s", status)
                        self.failed += 1
                        break
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    log.info("rendezvous report failed (attempt %d): %s", attempt + 1, exc)
                await asyncio.sleep(min(30.0, 0.5 * 2 ** attempt))
            else:
                self.failed += 1
            self._queue.task_done()

    async def drain(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._queue.join(), timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._session is not None:
            await self._session.close()
