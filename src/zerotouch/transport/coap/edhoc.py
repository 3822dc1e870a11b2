"""CoAP over UDP protected by EDHOC (RFC 9528) + OSCORE (RFC 8613), raw public keys pinned.

Both sides hold a P-256 key and present it as a CWT Claims Set (CCS, a "raw public key":
no certificates). Each side pins the other by fingerprint — SHA-256 over the DER
SubjectPublicKeyInfo of the key in the CCS, the same pin form as `pki.keys.spki_fingerprint`:

* the client (device) knows the server's fingerprint and refuses to finish EDHOC with any
  other key (`PinnedEdhocCredentials`);
* the server accepts only clients whose fingerprint is in its known-device list
  (`KnownDevices`), and resources wrapped by `EdhocGuard` refuse anything that did not
  arrive over an OSCORE context set up by EDHOC with such a device (4.01).

EDHOC method 3 (static DH both ways), cipher suite 2 (P-256, SHA-256, AES-CCM-16-64-128);
credentials travel by value (the pins are fingerprints, so the peer must show its key).

Built on aiocoap's EDHOC support (aiocoap 0.4.17, lakers-python 0.6.x). Two private
aiocoap methods are overridden here (`OscoreSiteWrapper._get_edhoc_identity` and
`._process_edhoc_msg12`) — re-check them when aiocoap moves.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Iterable

import aiocoap
import cbor2
import lakers
from aiocoap import error, interfaces
from aiocoap.credentials import CredentialsMap
from aiocoap.edhoc import EdhocCredentials, EdhocInitiatorContext, EdhocResponderContext
from aiocoap.numbers import POST
from aiocoap.numbers.eaditem import EADLabel
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper
from aiocoap.transports.oscore import OSCOREAddress
from cryptography.hazmat.primitives.asymmetric import ec

from ...pki.keys import spki_fingerprint

log = logging.getLogger("zerotouch.coap.edhoc")

#: EDHOC method 3: both sides authenticate with static Diffie-Hellman keys.
METHOD = 3
#: Cipher suite 2: P-256 / SHA-256 / AES-CCM-16-64-128 (the one aiocoap maps to OSCORE).
SUITE = 2
#: Prefix of the authenticated claim an EDHOC-authenticated device carries on the server.
CLAIM_PREFIX = "edhoc-device:"


class EdhocPinMismatch(error.Error):
    """The server presented a key other than the pinned one: nothing is sent to it."""


# --- keys and credentials ---------------------------------------------------------------

def _public_from_ccs(ccs: dict) -> ec.EllipticCurvePublicKey:
    """The P-256 public key inside a CCS ({2: sub, 8: {1: COSE_Key}}), strictly."""
    try:
        cose_key = ccs[8][1]
        if cose_key[1] != 2 or cose_key[-1] != 1:
            raise ValueError("not an EC2 P-256 COSE_Key")
        x, y = cose_key[-2], cose_key[-3]
        if not (isinstance(x, bytes) and isinstance(y, bytes) and len(x) == len(y) == 32):
            raise ValueError("bad coordinates")
        return ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                             ec.SECP256R1()).public_key()
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"not a CCS with a P-256 key: {exc!r}") from None


def ccs_fingerprint(ccs: dict | bytes) -> bytes:
    """SHA-256 over the DER SubjectPublicKeyInfo of the key in a CCS (dict or its CBOR)."""
    if isinstance(ccs, (bytes, bytearray)):
        ccs = cbor2.loads(bytes(ccs))
    return spki_fingerprint(_public_from_ccs(ccs))


@dataclass(frozen=True)
class EdhocIdentity:
    """A P-256 key and the CCS (raw public key credential) that presents it."""

    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    subject: str = ""

    @classmethod
    def generate(cls, subject: str = "") -> "EdhocIdentity":
        return cls(ec.generate_private_key(ec.SECP256R1()), subject)

    @property
    def fingerprint(self) -> bytes:
        return spki_fingerprint(self.private_key.public_key())

    @property
    def ccs(self) -> dict:
        """{2: sub, 8: {1: COSE_Key(kty EC2, kid, crv P-256, x, y)}}.

        lakers insists on a kid; the first fingerprint byte serves (credentials travel by
        value, the kid is never used to look anything up).
        """
        nums = self.private_key.public_key().public_numbers()
        cose_key = {1: 2, 2: self.fingerprint[:1], -1: 1,
                    -2: nums.x.to_bytes(32, "big"), -3: nums.y.to_bytes(32, "big")}
        return {2: self.subject, 8: {1: cose_key}}

    @property
    def credential(self) -> bytes:
        """CRED_x as EDHOC hashes it: the CCS in canonical CBOR."""
        return cbor2.dumps(self.ccs, canonical=True)

    @property
    def d(self) -> bytes:
        return self.private_key.private_numbers().private_value.to_bytes(32, "big")

    def aiocoap_credentials(self, cls=EdhocCredentials, **kw) -> EdhocCredentials:
        return cls(suite=SUITE, method=METHOD, own_cred_style="by-value", own_cred={14: self.ccs},
                   private_key={1: 2, -1: 1, -4: self.d}, **kw)


# --- client side -------------------------------------------------------------------------

class PinnedEdhocCredentials(EdhocCredentials):
    """Client credentials for one server origin: our CCS, the server's key pinned.

    The EDHOC handshake runs once and its OSCORE context is reused for every later request
    (aiocoap 0.4.17 would otherwise re-run EDHOC per request: it caches the handshake on the
    transport, never on the credentials). `reset()` forgets it (e.g. after the server lost
    its contexts and answers 4.01).
    """

    def __init__(self, identity: EdhocIdentity, server_fingerprint: bytes):
        if len(server_fingerprint) != 32:
            raise ValueError("server fingerprint must be 32 bytes (SHA-256)")
        super().__init__(suite=SUITE, method=METHOD, own_cred_style="by-value",
                         own_cred={14: identity.ccs},
                         private_key={1: 2, -1: 1, -4: identity.d},
                         peer_cred={"unauthenticated": True},  # checked below, by fingerprint
                         use_combined_edhoc=True)
        self.server_fingerprint = bytes(server_fingerprint)
        self._context: EdhocInitiatorContext | None = None
        self._lock = asyncio.Lock()
        self.handshakes = 0

    def reset(self) -> None:
        self._context = None

    async def establish_context(self, wire, underlying_address, underlying_proxy_scheme,
                                underlying_uri_host, logger):
        async with self._lock:
            if self._context is None:
                self._context = await self._handshake(wire, underlying_address,
                                                      underlying_proxy_scheme, underlying_uri_host,
                                                      logger)
                self.handshakes += 1
            return self._context

    async def _handshake(self, wire, underlying_address, underlying_proxy_scheme,
                         underlying_uri_host, logger) -> EdhocInitiatorContext:
        # Follows aiocoap.edhoc.EdhocCredentials.establish_context (0.4.17) with the pin added.
        c_i = bytes([random.randint(0, 23)])
        initiator = lakers.EdhocInitiator()
        message_1 = initiator.prepare_message_1(
            c_i, [lakers.EADItem(EADLabel.CRED_BY_VALUE, is_critical=False)])
        msg1 = aiocoap.Message(code=POST, proxy_scheme=underlying_proxy_scheme,
                               uri_host=underlying_uri_host, uri_path=[".well-known", "edhoc"],
                               payload=cbor2.dumps(True) + message_1)
        msg1.remote = underlying_address
        msg2 = await wire.request(msg1).response_raising

        c_r, id_cred_r, ead_2 = initiator.parse_message_2(msg2.payload)
        if any(e.is_critical() for e in ead_2):
            raise error.BadRequest("critical EAD_2")
        parsed = cbor2.loads(id_cred_r)
        if not isinstance(parsed, dict) or 14 not in parsed:
            raise EdhocPinMismatch("server sent its credential by reference; a pin needs its key")
        try:
            fingerprint = ccs_fingerprint(parsed[14])
        except ValueError as exc:
            raise EdhocPinMismatch(f"server credential unusable: {exc}") from None
        if fingerprint != self.server_fingerprint:
            logger.warning("EDHOC: server key %s is not the pinned %s", fingerprint.hex(),
                           self.server_fingerprint.hex())
            raise EdhocPinMismatch("server key does not match the pinned fingerprint")

        cred_r = cbor2.dumps(parsed[14], canonical=True)
        # Proves the server holds that key (MAC_2 under its static DH key).
        initiator.verify_message_2(self.own_key.d, cbor2.dumps(self.own_cred[14], canonical=True),
                                   cred_r)
        ctx = EdhocInitiatorContext(initiator, c_i, c_r, self.own_cred_style, logger)
        ctx.complete_without_message_4()  # message_3 rides on the first OSCORE request
        return ctx


def origin_of(base_url: str) -> str:
    """The credentials-map key aiocoap matches a request URI against: `coap://host:port/*`."""
    return base_url.rstrip("/") + "/*"


def pin_server(ctx: aiocoap.Context, base_url: str, identity: EdhocIdentity,
               server_fingerprint: bytes) -> PinnedEdhocCredentials:
    """Make every request from `ctx` to `base_url` (coap://host:port) go over EDHOC+OSCORE.

    `ctx` must have the "oscore" client transport (e.g. transports=["oscore", "udp6"]).
    """
    creds = PinnedEdhocCredentials(identity, server_fingerprint)
    ctx.client_credentials[origin_of(base_url)] = creds
    return creds


# --- server side -------------------------------------------------------------------------

class KnownDevices:
    """The fingerprints of the device keys the server accepts (mutable while serving)."""

    def __init__(self, fingerprints: Iterable[bytes] = ()):
        self._fps: set[bytes] = {bytes(f) for f in fingerprints}

    def add(self, fingerprint: bytes) -> None:
        self._fps.add(bytes(fingerprint))

    def discard(self, fingerprint: bytes) -> None:
        self._fps.discard(bytes(fingerprint))

    def __contains__(self, fingerprint) -> bool:
        return bytes(fingerprint) in self._fps

    def __len__(self) -> int:
        return len(self._fps)


class _ServerCredentials(CredentialsMap):
    """aiocoap's credentials map, with EDHOC peers looked up by fingerprint."""

    def __init__(self, known: KnownDevices):
        super().__init__()
        self.known = known

    def find_edhoc_by_id_cred_peer(self, id_cred_peer):
        # Raising KeyError makes aiocoap abort EDHOC (4.00) before message_3 is verified.
        try:
            parsed = cbor2.loads(id_cred_peer)
        except Exception:
            raise KeyError("unparsable ID_CRED_I") from None
        if not isinstance(parsed, dict) or 14 not in parsed:
            log.info("EDHOC refused: client credential not sent by value")
            raise KeyError("credential by reference")
        try:
            fingerprint = ccs_fingerprint(parsed[14])
        except ValueError:
            raise KeyError("unusable credential") from None
        if fingerprint not in self.known:
            log.info("EDHOC refused: unknown device key %s", fingerprint.hex())
            raise KeyError("unknown device")
        return cbor2.dumps(parsed[14], canonical=True), [CLAIM_PREFIX + fingerprint.hex()]


class EdhocSiteWrapper(OscoreSiteWrapper):
    """aiocoap's OSCORE site wrapper with one EDHOC identity for every origin the server is
    reached at (behind NAT or a balancer the origin is not ours to know), a known-device list,
    and a bound on half-finished and established responder contexts (aiocoap keeps them
    forever and has only 48 one-byte connection identifiers: it would refuse every EDHOC
    after the 47th). The oldest context is evicted; its device just runs EDHOC again.
    """

    def __init__(self, inner_site, identity: EdhocIdentity, known: KnownDevices, *,
                 max_contexts: int = 40):
        if not 1 <= max_contexts <= 46:
            raise ValueError("max_contexts must be 1..46 (aiocoap uses 1-byte C_R values)")
        super().__init__(inner_site, _ServerCredentials(known))
        self.identity = identity
        self.known = known
        self.max_contexts = max_contexts
        self._own = identity.aiocoap_credentials()

    def _get_edhoc_identity(self, origin):
        return self._own

    def revoke(self, fingerprint: bytes) -> int:
        """Drop a device from the known list and end its OSCORE contexts; returns how many."""
        self.known.discard(fingerprint)
        claim = CLAIM_PREFIX + bytes(fingerprint).hex()
        gone = [k for k, v in self.server_credentials.items()
                if isinstance(v, EdhocResponderContext) and claim in v.authenticated_claims]
        for k in gone:
            del self.server_credentials[k]
        return len(gone)

    def _process_edhoc_msg12(self, pipe):
        contexts = [k for k, v in self.server_credentials.items()
                    if isinstance(v, EdhocResponderContext)]
        for k in contexts[:max(0, len(contexts) - self.max_contexts + 1)]:
            del self.server_credentials[k]
        return super()._process_edhoc_msg12(pipe)


def edhoc_peer(request: aiocoap.Message) -> bytes | None:
    """The fingerprint of the device an inner-site request came from over EDHOC, or None."""
    remote = request.remote
    if not isinstance(remote, OSCOREAddress):
        return None
    for claim in getattr(remote, "authenticated_claims", ()) or ():
        if isinstance(claim, str) and claim.startswith(CLAIM_PREFIX):
            return bytes.fromhex(claim[len(CLAIM_PREFIX):])
    return None


class EdhocGuard(interfaces.Resource):
    """Wraps a site: paths under `protected` (all by default) need an EDHOC-authenticated
    device, anything else is 4.01 Unauthorized. /.well-known/core stays open."""

    def __init__(self, inner_site, protected: Iterable[tuple[str, ...]] | None = None):
        self._inner = inner_site
        self._protected = None if protected is None else [tuple(p) for p in protected]

    def _is_protected(self, path: tuple[str, ...]) -> bool:
        if path == (".well-known", "core"):
            return False
        if self._protected is None:
            return True
        return any(path[:len(p)] == p for p in self._protected)

    def get_resources_as_linkheader(self):
        return self._inner.get_resources_as_linkheader()

    async def needs_blockwise_assembly(self, request):
        raise RuntimeError("EdhocGuard renders through render_to_pipe only")

    async def render(self, request):
        raise RuntimeError("EdhocGuard renders through render_to_pipe only")

    async def render_to_pipe(self, pipe):
        request = pipe.request
        if self._is_protected(tuple(request.opt.uri_path)) and edhoc_peer(request) is None:
            raise error.Unauthorized("EDHOC + OSCORE with a known device key required")
        await self._inner.render_to_pipe(pipe)


async def start_edhoc_coap_server(site, *, identity: EdhocIdentity, known: KnownDevices,
                                  bind: tuple[str, int] = ("127.0.0.1", 5683),
                                  protected: Iterable[tuple[str, ...]] | None = None,
                                  max_contexts: int = 40, rate_limit=None):
    """Serve `site` over CoAP/UDP with EDHOC + OSCORE. Returns a `CoapServer` whose `.site`
    is the `EdhocSiteWrapper` (its `.known` is the live known-device list)."""
    from .server import CoapServer, _bound_port, rate_limited

    wrapped = EdhocSiteWrapper(EdhocGuard(site, protected), identity, known,
                               max_contexts=max_contexts)
    limited = rate_limited(wrapped, rate_limit)
    host, port = bind
    ctx = await aiocoap.Context.create_server_context(limited or wrapped, bind=(host, port),
                                                      transports=["udp6"])
    return CoapServer(context=ctx, host=host, port=_bound_port(ctx, port), scheme="coap", site=wrapped,
                      limiter=limited)


class AnyDeviceKey(KnownDevices):
    """Admission by message, not by a key list: any P-256 device key completes EDHOC, and the
    adapter then requires each message to be that key's (binding.py: the IDevID in the message
    certifies the EDHOC key), while the core checks the IDevID chain, the registration (the
    rendezvous) or the inventory (the gateway). What `rendezvous/gateway serve --coap-security
    edhoc` uses: neither server knows a device's key before its first message."""

    def __contains__(self, fingerprint) -> bool:
        return True
