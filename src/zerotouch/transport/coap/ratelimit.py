"""Per-source rate limiting for the CoAP server (UDP has no handshake to slow a flood down).

A token bucket per source address, in front of everything else the server does (OSCORE
unprotect, EDHOC, block-wise reassembly, the protocol core): a request that finds the bucket
empty is answered 4.29 Too Many Requests with Max-Age = seconds until a token is back
(RFC 8516) and goes no further. EDHOC handshakes (POST /.well-known/edhoc, and a request
carrying the EDHOC option: message_3 riding on the first OSCORE request) spend from a second,
smaller bucket too: each costs the server several P-256 operations.

The source is the IP address (not the port: a flood may change ports freely). Devices behind
one NAT share a bucket, so the defaults leave room for a fleet behind one address; set them
per deployment (`RateLimit`, `--coap-rate` / `--coap-handshake-rate`, 0 turns a limit off).
Buckets are kept in this process and bounded (`max_sources`; full buckets are forgotten first).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import aiocoap
from aiocoap import interfaces
from aiocoap.numbers import codes


@dataclass(frozen=True)
class RateLimit:
    """Requests per second per source (and burst); handshakes per second (and burst)."""

    rate: float = 200.0
    burst: float = 400.0
    handshake_rate: float = 20.0
    handshake_burst: float = 40.0
    max_sources: int = 100_000

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or self.handshake_rate > 0


class TokenBuckets:
    """Token buckets by key: `take(key)` spends one token, or returns the seconds to wait."""

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000):
        if rate <= 0 or burst < 1:
            raise ValueError("a bucket needs rate > 0 and burst >= 1")
        self.rate, self.burst, self.clock, self.max_keys = float(rate), float(burst), clock, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last update)

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def take(self, key: str) -> float:
        """0.0 when a token was spent; else the seconds until one is available (nothing spent)."""
        now = self.clock()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            return (1.0 - tokens) / self.rate
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            for k in [k for k in self._buckets if self._tokens(k, now) >= self.burst]:
                del self._buckets[k]
            if len(self._buckets) >= self.max_keys:
                self._buckets.pop(next(iter(self._buckets)))
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def __len__(self) -> int:
        return len(self._buckets)


def source_of(remote) -> str:
    """The source IP address of a request's remote (UDP: sockaddr; TCP/TLS: hostinfo)."""
    sockaddr = getattr(remote, "sockaddr", None)
    if sockaddr:
        host = str(sockaddr[0])
        return host[7:] if host.startswith("::ffff:") else host  # IPv4-mapped: one key per IPv4
    hostinfo = str(getattr(remote, "hostinfo", "") or "")
    if hostinfo.startswith("["):
        return hostinfo[1:hostinfo.find("]")]
    return hostinfo.rsplit(":", 1)[0] if hostinfo.count(":") == 1 else hostinfo


def is_handshake(request: aiocoap.Message) -> bool:
    return (tuple(request.opt.uri_path) == (".well-known", "edhoc")
            or bool(getattr(request.opt, "edhoc", False)))


class RateLimitedSite(interfaces.Resource):
    """Wraps the server's outermost site (plain, OSCORE-PSK or EDHOC) with per-source limits."""

    def __init__(self, inner, limit: RateLimit, *, clock: Callable[[], float] = time.monotonic):
        self._inner = inner
        self.limit = limit
        self.requests = (TokenBuckets(limit.rate, limit.burst, clock=clock, max_keys=limit.max_sources)
                         if limit.rate > 0 else None)
        self.handshakes = (TokenBuckets(limit.handshake_rate, limit.handshake_burst, clock=clock,
                                        max_keys=limit.max_sources)
                           if limit.handshake_rate > 0 else None)
        self.limited = 0

    @property
    def inner(self):
        return self._inner

    def get_resources_as_linkheader(self):
        return self._inner.get_resources_as_linkheader()

    async def render(self, request):
        raise RuntimeError("used through render_to_pipe only")

    async def needs_blockwise_assembly(self, request):
        raise RuntimeError("used through render_to_pipe only")

    def _wait(self, request) -> float:
        source = source_of(request.remote)
        if self.requests is not None:
            wait = self.requests.take(source)
            if wait:
                return wait
        if self.handshakes is not None and is_handshake(request):
            return self.handshakes.take(source)
        return 0.0

    async def render_to_pipe(self, pipe):
        request = pipe.request
        wait = self._wait(request)
        if wait:
            self.limited += 1
            if request.mtype in (aiocoap.CON, None):  # a NON flood is dropped without an answer
                pipe.add_response(aiocoap.Message(code=codes.TOO_MANY_REQUESTS,
                                                  max_age=max(1, math.ceil(wait))), is_last=True)
            return
        await self._inner.render_to_pipe(pipe)
