"""PSK mode over CoAP: OSCORE (RFC 8613) security contexts from the device's pre-shared key.

For devices without public-key crypto (issue 5, item 7). The device and the server that knows
its PSK (the rendezvous and/or the owner gateway, which learn it through the claim) derive an
OSCORE security context from it; the protection itself is aiocoap's OSCORE implementation.

Context parameters (both sides must agree; changing any of them is a wire-format change):

- Master Secret: the device's 32-byte PSK (`services.bulk.derive_psk(master, devid)` for a box,
  or a key set at manufacture).
- Master Salt: `MASTER_SALT` = b"zerotouch oscore-psk v1" (fixed, public; domain separation).
- ID Context: none.
- AEAD: AES-CCM-16-64-128 (the RFC 8613 default), HKDF-SHA256, replay window 32.
- IDs, one context per role so a request for the rendezvous is never accepted by the gateway:
  role byte R = 0x01 (rendezvous) or 0x02 (gateway);
  device Sender ID (the KID on the wire) = R || Device ID (4 bytes, big-endian);
  server Sender ID = R. (AES-CCM-16-64-128 allows IDs up to 7 bytes.)

State: contexts are kept in memory.

- Server: the replay window of a device's context starts unknown in each server process, so
  the first request of each device gets a protected 4.01 with Echo (RFC 8613 Appendix B.1.2)
  and aiocoap's client answers it by itself: one extra round trip per device and process, and
  no replay of a request recorded before a restart.
- Device: the sender sequence number MUST NOT restart for the same PSK (AES-CCM nonce reuse).
  `OscorePskTransport` takes `sequence_numbers` and calls `on_sequence` (RFC 8613 B.1.1:
  persist a value ahead of the one in use); a device that cannot persist must not use PSK
  mode across reboots with the same key.
"""
from __future__ import annotations

import secrets
from typing import Callable, Iterable

import aiocoap
from aiocoap import interfaces, oscore
from aiocoap.numbers import codes
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

from ...protocol.errors import MalformedMessage
from ..http.client import PeerRefused
from .client import CoapDeviceTransport
from .common import MAX_PAYLOAD, PATHS, status_for_code
from .server import CoapServer, _bound_port, build_site, rate_limited

MASTER_SALT = b"zerotouch oscore-psk v1"
ALGORITHM = "AES-CCM-16-64-128"
HASHFUN = "sha256"
WINDOW = 32
ROLE_RENDEZVOUS = b"\x01"
ROLE_GATEWAY = b"\x02"
ROLES = {"rendezvous": ROLE_RENDEZVOUS, "gateway": ROLE_GATEWAY}
PSK_MIN = 16

# Unprotected requests are answered only here (RFC 6690 discovery); every other path of the
# site needs OSCORE.
UNPROTECTED_PATHS = frozenset({(".well-known", "core")})

PskLookup = Callable[[str], "bytes | None"]


def devid_bytes(devid: str | int) -> bytes:
    """The 4-byte Device ID (8 hex digits or a 32-bit number)."""
    if isinstance(devid, str):
        try:
            if len(devid) != 8:
                raise ValueError
            devid = int(devid, 16)
        except ValueError:
            raise MalformedMessage("devid must be 8 hex digits") from None
    if not isinstance(devid, int) or isinstance(devid, bool) or not 0 <= devid <= 0xFFFFFFFF:
        raise MalformedMessage("devid must be a 32-bit number")
    return devid.to_bytes(4, "big")


def _role(role: str) -> bytes:
    try:
        return ROLES[role]
    except KeyError:
        raise ValueError(f"role must be one of {sorted(ROLES)}") from None


class PskSecurityContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):
    """An in-memory OSCORE context (aiocoap's classes) with the parameters above."""

    def __init__(self, psk: bytes, *, sender_id: bytes, recipient_id: bytes,
                 sender_sequence_number: int = 0, echo_recovery: bool = False,
                 on_sequence: Callable[[int], None] | None = None,
                 authenticated_claims: Iterable[str] = ()):
        if not isinstance(psk, (bytes, bytearray)) or len(psk) < PSK_MIN:
            raise ValueError(f"a PSK is at least {PSK_MIN} bytes")
        self.alg_aead = oscore.algorithms[ALGORITHM]
        self.hashfun = oscore.hashfunctions[HASHFUN]
        self.id_context = None
        self.sender_id = bytes(sender_id)
        self.recipient_id = bytes(recipient_id)
        if max(len(self.sender_id), len(self.recipient_id)) > self.alg_aead.iv_bytes - 6:
            raise ValueError("sender or recipient ID too long for the algorithm")
        self.derive_keys(MASTER_SALT, bytes(psk))
        self.sender_sequence_number = sender_sequence_number
        self._on_sequence = on_sequence
        self.recipient_replay_window = oscore.ReplayWindow(WINDOW, lambda: None)
        if echo_recovery:
            # Unknown window: the first request is answered 4.01 + Echo (RFC 8613 B.1.2).
            self.echo_recovery = secrets.token_bytes(8)
        else:
            self.echo_recovery = None
            self.recipient_replay_window.initialize_empty()
        self.authenticated_claims = list(authenticated_claims)

    def post_seqnoincrease(self):
        if self._on_sequence is not None:
            self._on_sequence(self.sender_sequence_number)

    def __repr__(self):
        return (f"<{type(self).__name__} sender_id={self.sender_id.hex()} "
                f"recipient_id={self.recipient_id.hex()}>")


def device_context(psk: bytes, devid: str | int, role: str, **kw) -> PskSecurityContext:
    """The device's context for talking to the rendezvous or the gateway."""
    r = _role(role)
    return PskSecurityContext(psk, sender_id=r + devid_bytes(devid), recipient_id=r, **kw)


def server_context(psk: bytes, devid: str | int, role: str) -> PskSecurityContext:
    """The server's context for one device (replay window recovered through Echo)."""
    r = _role(role)
    d = devid_bytes(devid)
    return PskSecurityContext(psk, sender_id=r, recipient_id=r + d, echo_recovery=True,
                              authenticated_claims=[f"zt-psk:{d.hex()}"])


class PskContextStore:
    """Server credentials for `OscoreSiteWrapper`: the KID names the role and the device.

    `psk_for(devid_hex)` returns the device's PSK or None (unknown device). It is called on
    the request path and must not block: feed it from memory (e.g. `add` when a claim brings
    a PSK, or `PskContextStore.from_box`). A context lives as long as its PSK does here, so the
    replay window holds across requests; a changed PSK gets a fresh context.
    """

    def __init__(self, psk_for: PskLookup | None = None, *, roles: Iterable[str] = ("rendezvous", "gateway")):
        self._psk_for = psk_for
        self._psks: dict[str, bytes] = {}
        self._roles = {_role(r) for r in roles}
        self._contexts: dict[bytes, tuple[bytes, PskSecurityContext]] = {}

    def add(self, devid: str | int, psk: bytes) -> None:
        self._psks[devid_bytes(devid).hex()] = bytes(psk)

    def remove(self, devid: str | int) -> None:
        d = devid_bytes(devid).hex()
        self._psks.pop(d, None)
        for r in ROLES.values():
            self._contexts.pop(r + bytes.fromhex(d), None)

    @classmethod
    def from_box(cls, master: bytes, first: int, last: int, **kw) -> "PskContextStore":
        """Every device of a claimed box (PSK derived as in `services/bulk.py`)."""
        from ...services.bulk import derive_psk
        if not 0 <= first <= last <= 0xFFFFFFFF:
            raise ValueError("bad Device ID range")

        def psk_for(devid_hex: str) -> bytes | None:
            n = int(devid_hex, 16)
            return derive_psk(master, n) if first <= n <= last else None
        return cls(psk_for, **kw)

    def _lookup(self, devid_hex: str) -> bytes | None:
        psk = self._psks.get(devid_hex)
        if psk is None and self._psk_for is not None:
            psk = self._psk_for(devid_hex)
        return psk

    def find_oscore(self, unprotected) -> PskSecurityContext:
        """aiocoap's server-credentials interface; KeyError → plaintext 4.01."""
        kid = unprotected.get(oscore.COSE_KID)
        if (not isinstance(kid, bytes) or len(kid) != 5 or kid[:1] not in self._roles
                or unprotected.get(oscore.COSE_KID_CONTEXT) is not None):
            raise KeyError("no such context")
        devid_hex = kid[1:].hex()
        psk = self._lookup(devid_hex)
        if psk is None:
            raise KeyError("unknown device")
        cached = self._contexts.get(kid)
        if cached is not None and cached[0] == psk:
            return cached[1]
        role = next(k for k, v in ROLES.items() if v == kid[:1])
        ctx = server_context(psk, devid_hex, role)
        self._contexts[kid] = (psk, ctx)
        return ctx

    def find_all_used_contextless_oscore_kid(self) -> set[bytes]:
        return set(self._contexts)


_PATH_ROLE = {"rv": ROLE_RENDEZVOUS, "zt": ROLE_GATEWAY}


class _RoleCheckedSite(interfaces.Resource):
    """Inside OSCORE: /rv/* only with a rendezvous-role context, /zt/* only with a gateway one
    (a combined server holds both; the path is encrypted, so this is checked after unprotect)."""

    def __init__(self, inner):
        self._inner = inner

    def get_resources_as_linkheader(self):
        return self._inner.get_resources_as_linkheader()

    async def render(self, request):
        raise RuntimeError("used through render_to_pipe only")

    async def needs_blockwise_assembly(self, request):
        raise RuntimeError("used through render_to_pipe only")

    async def render_to_pipe(self, pipe):
        request = pipe.request
        want = _PATH_ROLE.get(request.opt.uri_path[0] if request.opt.uri_path else "")
        secctx = getattr(request.remote, "security_context", None)
        if want is not None and (secctx is None or secctx.sender_id != want):
            pipe.add_response(aiocoap.Message(code=codes.FORBIDDEN), is_last=True)
            return
        await self._inner.render_to_pipe(pipe)


class ProtectedOnlySite(OscoreSiteWrapper):
    """aiocoap's OSCORE site wrapper that refuses unprotected requests (4.01) outside
    `unprotected_paths`. Protected requests reach the inner site with
    `request.remote.authenticated_claims == ["zt-psk:<devid hex>"]`; their answers are
    protected with the same context."""

    def __init__(self, inner_site, server_credentials, *,
                 unprotected_paths: Iterable[tuple[str, ...]] = UNPROTECTED_PATHS):
        super().__init__(_RoleCheckedSite(inner_site), server_credentials)
        self._inner_plain = inner_site
        self._unprotected_paths = frozenset(tuple(p) for p in unprotected_paths)

    async def render_to_pipe(self, pipe):
        request = pipe.request
        if (request.opt.oscore is None
                and tuple(request.opt.uri_path) not in self._unprotected_paths):
            if request.mtype == aiocoap.CON or request.mtype is None:
                pipe.add_response(aiocoap.Message(code=codes.UNAUTHORIZED,
                                                  payload=b"OSCORE required"), is_last=True)
            return
        if request.opt.oscore is None:  # discovery: straight to the site
            await self._inner_plain.render_to_pipe(pipe)
            return
        if request.opt.uri_path == (".well-known", "edhoc"):
            # No EDHOC here (PSK mode only): don't let the wrapper start one.
            pipe.add_response(aiocoap.Message(code=codes.NOT_FOUND), is_last=True)
            return
        await super().render_to_pipe(pipe)


async def start_oscore_psk_server(rendezvous=None, gateway=None, *, store: PskContextStore,
                                  bind: tuple[str, int] = ("127.0.0.1", 5683),
                                  max_size: int = MAX_PAYLOAD,
                                  unprotected_paths: Iterable[tuple[str, ...]] = UNPROTECTED_PATHS,
                                  rate_limit=None, channel_binding: bool = True) -> CoapServer:
    """Like `start_coap_server` over UDP, every endpoint behind OSCORE with PSK contexts."""
    if rendezvous is None and gateway is None:
        raise ValueError("serve at least one of rendezvous and gateway")
    inner = build_site(rendezvous, gateway, max_size=max_size, channel_binding=channel_binding)
    site = ProtectedOnlySite(inner, store, unprotected_paths=unprotected_paths)
    limited = rate_limited(site, rate_limit)
    host, port = bind
    ctx = await aiocoap.Context.create_server_context(limited or site, bind=(host, port),
                                                      transports=["udp6"])
    return CoapServer(context=ctx, host=host, port=_bound_port(ctx, port), scheme="coap", site=inner,
                      limiter=limited)


class OscorePskTransport(CoapDeviceTransport):
    """`CoapDeviceTransport` whose requests are OSCORE-protected with the device's PSK.

    `sequence_numbers` ({"rendezvous": n, "gateway": m}) resumes the sender sequence numbers
    persisted by `on_sequence(role, next_number)`; never start two transports from the same
    numbers with the same PSK.
    """

    name = "coap+oscore-psk"

    def __init__(self, *, devid: str | int, psk: bytes,
                 sequence_numbers: dict[str, int] | None = None,
                 on_sequence: Callable[[str, int], None] | None = None,
                 protect: Iterable[str] = ("rendezvous", "gateway"), **kw):
        super().__init__(**kw)
        seq = sequence_numbers or {}
        self.devid = devid_bytes(devid).hex()
        self.contexts: dict[str, PskSecurityContext] = {}
        for role in protect:
            cb = (lambda n, _r=role: on_sequence(_r, n)) if on_sequence is not None else None
            self.contexts[role] = device_context(psk, self.devid, role,
                                                 sender_sequence_number=seq.get(role, 0),
                                                 on_sequence=cb)

    @property
    def sequence_numbers(self) -> dict[str, int]:
        return {r: c.sender_sequence_number for r, c in self.contexts.items()}

    async def _context(self) -> aiocoap.Context:
        async with self._lock:
            if self._ctx is None:
                ctx = await aiocoap.Context.create_client_context(transports=["oscore", "udp6", "tlsclient"])
                ctx.client_credentials.ssl_client_context = self._ssl_client_context
                self._ctx = ctx
            return self._ctx

    async def _protected_post(self, role: str, base: str, path, body, tls, **kw) -> bytes:
        secctx = self.contexts.get(role)
        if secctx is not None:
            ctx = await self._context()
            # aiocoap picks the OSCORE context by the request URI (same string as in _post).
            ctx.client_credentials[f"{base}/{'/'.join(path)}"] = secctx
        try:
            return await self._post(base, path, body, tls, **kw)
        except OSError as exc:
            plain = exc.__cause__
            if isinstance(plain, oscore.NotAProtectedMessage):
                # The server refused in plaintext (unknown device, wrong key, replay, …).
                msg = plain.plain_message
                raise PeerRefused(f"OSCORE refused: CoAP {msg.code.dotted} "
                                  f"{bytes(msg.payload)[:64].decode('utf-8', 'replace')}",
                                  status=status_for_code(msg.code), code="oscore_refused") from None
            if isinstance(plain, oscore.ProtectionInvalid):
                raise PeerRefused(f"OSCORE answer does not verify: {plain}", status=502,
                                  code="oscore_invalid") from None
            raise

    async def find_owner(self, rendezvous_url: str, body: bytes) -> bytes:
        base = self._base(rendezvous_url, self._rendezvous_override)
        return await self._protected_post("rendezvous", base, PATHS["find-owner"], body, self._rv_ssl)

    async def gateway(self, gateway_url: str, step: str, body: bytes) -> bytes:
        if step not in ("hello", "prove", "done"):
            raise ValueError(f"unknown gateway step {step!r}")
        base = self._base(gateway_url, self._gateway_override)
        return await self._protected_post("gateway", base, PATHS[step], body, self._gw_ssl,
                                          capture_peer=True)
