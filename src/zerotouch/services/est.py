"""EST server of the owner gateway: who may enroll for which certificate, under which policy.

The stages of seed 003, each with its own credential:
  label `ldevid` (and the default label): authenticated by an IDevID from a manufacturer CA
      (or a configured HTTP Basic password) of a device in the inventory -> an LDevID;
  label `operational`: authenticated by an unrevoked LDevID from the owner CA -> a short-lived
      operational certificate;
  `simplereenroll`: authenticated by the certificate being renewed -> the same kind again.

Proof-of-possession linking (RFC 7030 §3.5) under TLS 1.3, where tls-unique does not exist and
Python has no exporter API: the CSR's signature proves possession of its key; the identity
the certificate names is never taken from the CSR but from the authenticated credential (so
a CSR relayed by another client can only ever yield a certificate naming that client);
simplereenroll needs the CSR subject to equal the presented certificate's. Under TLS 1.2 a
CSR carrying challengePassword must carry base64(tls-unique) of its own connection, as RFC 7030
says. docs/est.md explains the same for operators.
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import time
from typing import Awaitable, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import AttributeOID

from ..pki.ca import DEVICE_URN_PREFIX, device_identity, load_der_cert, verify_device_chain
from ..pki.keys import cert_fingerprint, generate_p256
from ..protocol import est as codec
from ..protocol.est import EnrollmentPolicy, PolicyViolation
from ..protocol.errors import Conflict, MalformedMessage, NotAuthorized, NotFound, ProtocolError
from ..protocol.states import InventoryState
from ..storage.base import EnrollRequest, Store
from .est_policy import (  # noqa: F401 - re-exported: callers import them from here
    Authenticated, AuthenticationRequired, BasicUser, ClientIdentity, EnrollmentPending, EstPolicy,
    _dummy_hash, hash_password, verify_password)
from .vault import Vault

STAGES = {"": "ldevid", "ldevid": "ldevid", "operational": "operational"}
# which credential may ask for which certificate kind (simpleenroll / serverkeygen)
CREDENTIALS_FOR = {"ldevid": ("idevid", "basic"), "operational": ("ldevid",)}



class EstService:
    def __init__(self, store: Store, vault: Vault, policy: EstPolicy, *,
                 manufacturer_cas: list[x509.Certificate], owner_ca: x509.Certificate | None = None,
                 clock: Callable[[], float] = time.time):
        self.store, self.vault, self.policy = store, vault, policy
        self.manufacturer_cas = list(manufacturer_cas)
        self._owner = owner_ca          # None: asked of the vault on first use
        self.clock = clock

    @property
    def basic_configured(self) -> bool:
        return bool(self.policy.basic_users)

    async def owner_ca(self) -> x509.Certificate:
        if self._owner is None:
            self._owner = load_der_cert(await self.vault.owner_ca_der())
        return self._owner

    # --- authentication -----------------------------------------------------------------
    async def authenticate(self, ident: ClientIdentity) -> Authenticated:
        if ident.chain:
            return await self._by_certificate(ident.chain)
        if ident.username is not None:
            return await self._by_password(ident.username, ident.password or "")
        if self.basic_configured:
            raise AuthenticationRequired("authenticate with a TLS client certificate or HTTP Basic")
        raise NotAuthorized("a TLS client certificate is required (IDevID, LDevID or the "
                            "certificate being renewed)", code="unauthenticated")

    async def _by_certificate(self, chain: tuple[bytes, ...]) -> Authenticated:
        # Only the leaf: our device certificates are issued straight by a root.
        leaf = load_der_cert(chain[0])
        now = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)
        owner = await self.owner_ca()
        if leaf.issuer == owner.subject:
            verify_device_chain(leaf, [owner], now)
            serial, urn = device_identity(leaf)
            rec = await self.store.certs.get(format(leaf.serial_number, "x"))
            if rec is None or rec.kind not in ("ldevid", "operational") or rec.device_serial != serial:
                raise NotAuthorized("client certificate is not a device certificate this owner issued")
            if rec.revoked_at is not None:
                raise NotAuthorized(f"client certificate {rec.serial_number} is revoked "
                                    f"({rec.reason or 'unspecified'})", code="revoked")
            await self._in_inventory(serial)
            return Authenticated(serial, urn, rec.kind, leaf)
        verify_device_chain(leaf, self.manufacturer_cas, now)
        serial, urn = device_identity(leaf)
        inv = await self._in_inventory(serial)
        if inv.idevid_fp and not hmac.compare_digest(inv.idevid_fp, cert_fingerprint(leaf)):
            raise NotAuthorized("this IDevID is not the one the device onboarded with")
        return Authenticated(serial, urn, "idevid", leaf)

    async def _by_password(self, username: str, password: str) -> Authenticated:
        user = self.policy.basic_users.get(username)
        ok = await asyncio.to_thread(verify_password, password,
                                     user.password_hash if user else _dummy_hash())
        if user is None or not ok:
            raise AuthenticationRequired("wrong user name or password")
        await self._in_inventory(user.device_serial)
        return Authenticated(user.device_serial, DEVICE_URN_PREFIX + user.device_serial, "basic")

    async def _in_inventory(self, serial: str):
        inv = await self.store.inventory.get(serial)
        if inv is None:
            raise NotAuthorized(f"device {serial} is not in the owner's inventory",
                                code="not_in_inventory")
        if inv.state is InventoryState.REVOKED:
            raise NotAuthorized(f"device {serial} is revoked by its owner", code="revoked")
        return inv

    def _kind(self, op: str, label: str, auth: Authenticated) -> str:
        """Which certificate kind this operation under this label gives this credential."""
        if label not in STAGES:
            raise NotFound(f"unknown EST label {label!r}: this server has 'ldevid' and 'operational'")
        if op == "simplereenroll":
            if auth.credential not in ("ldevid", "operational"):
                raise NotAuthorized("simplereenroll needs the certificate being renewed as the "
                                    "TLS client certificate")
            if label and STAGES[label] != auth.credential:
                raise NotAuthorized(f"label {label!r} renews {STAGES[label]} certificates, but the "
                                    f"client presented an {auth.credential} certificate")
            return auth.credential
        kind = STAGES[label]
        if auth.credential not in CREDENTIALS_FOR[kind]:
            need = " or ".join(CREDENTIALS_FOR[kind]).replace("basic", "the configured password")
            raise NotAuthorized(f"the {kind} stage is authenticated by the device's {need}, not "
                                f"an {auth.credential} certificate (renewals use simplereenroll)")
        return kind

    @staticmethod
    def _pop_link(csr: x509.CertificateSigningRequest, ident: ClientIdentity) -> None:
        if ident.tls_unique is None:
            return      # TLS 1.3 or via a proxy: no tls-unique (see the module docstring)
        try:
            attr = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
        except x509.AttributeNotFound:
            return
        if not hmac.compare_digest(attr.value, base64.b64encode(ident.tls_unique)):
            raise NotAuthorized("CSR challengePassword is not this TLS connection's tls-unique "
                                "(RFC 7030 §3.5): the CSR was made for another connection")

    # --- operations ---------------------------------------------------------------------
    async def cacerts(self) -> bytes:
        return codec.certs_only([await self.owner_ca()])

    async def csrattrs(self, label: str, ident: ClientIdentity | None = None) -> bytes:
        if label not in STAGES:
            raise NotFound(f"unknown EST label {label!r}: this server has 'ldevid' and 'operational'")
        policy = self.policy.default
        if ident is not None and (ident.chain or ident.username is not None):
            try:  # csrattrs needs no authentication (RFC 7030 §4.5); a known client gets its own
                policy = self.policy.for_device((await self.authenticate(ident)).serial)
            except ProtocolError:
                pass
        return codec.encode_csr_attrs(codec.csr_attrs_for(list(policy.key_types)))

    async def enroll(self, op: str, label: str, csr_der: bytes, ident: ClientIdentity) -> bytes:
        """simpleenroll / simplereenroll: the issued certificate (DER)."""
        if op not in ("simpleenroll", "simplereenroll"):
            raise NotFound(f"unknown enrollment operation {op!r}")
        auth = await self.authenticate(ident)
        kind = self._kind(op, label, auth)
        policy = self.policy.for_device(auth.serial)
        csr = policy.check_csr(csr_der)
        self._pop_link(csr, ident)
        if op == "simplereenroll":
            _same_names(csr, auth.cert)

        async def issue():
            der = await self.vault.issue_certificate(csr_der, auth.serial, auth.urn,
                                                     policy.days_for(kind), kind)
            return der, der

        async def again(cert_serial: str) -> bytes:
            rec = await self.store.certs.get(cert_serial)
            if rec is None or rec.revoked_at is not None:
                raise NotAuthorized("the certificate issued for this request has been revoked")
            return rec.der
        return await self._approved(auth, kind, csr_der, policy, issue, again)

    async def serverkeygen(self, label: str, csr_der: bytes,
                           ident: ClientIdentity) -> tuple[bytes, bytes]:
        """(PKCS#8 DER of a new P-256 key, its certificate DER). The CSR's own key is unused."""
        auth = await self.authenticate(ident)
        kind = self._kind("simpleenroll", label, auth)
        policy = self.policy.for_device(auth.serial)
        try:
            x509.load_der_x509_csr(csr_der)
        except ValueError:
            raise MalformedMessage("body is not a DER PKCS#10 CSR") from None
        if "P-256" not in policy.key_types:
            raise PolicyViolation("serverkeygen makes P-256 keys, which this device's policy "
                                  f"does not allow (allowed: {policy.allowed()})")

        async def issue():
            key = generate_p256()
            own_csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
                       .sign(key, hashes.SHA256()))
            der = await self.vault.issue_certificate(
                own_csr.public_bytes(serialization.Encoding.DER), auth.serial, auth.urn,
                policy.days_for(kind), kind)
            pkcs8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
            return (pkcs8, der), der

        async def again(_cert_serial: str):
            raise Conflict("this request was already issued; a server-generated key is "
                           "delivered only once")
        return await self._approved(auth, f"{kind}:serverkeygen", csr_der, policy, issue, again)

    # --- manual approval ----------------------------------------------------------------
    async def _approved(self, auth: Authenticated, label: str, csr_der: bytes,
                        policy: EnrollmentPolicy, issue: Callable[[], Awaitable[tuple]],
                        again: Callable[[str], Awaitable]):
        if not policy.manual_approval:
            return (await issue())[0]
        repo, now = self.store.enroll_requests, self.clock()
        rid = hashlib.sha256(csr_der).hexdigest()
        pending = EnrollmentPending(f"enrollment request {rid} awaits approval by the owner's "
                                    "administrator; retry the same request later",
                                    retry_after=self.policy.retry_after)
        req = await repo.get(rid)
        if req is None:
            if await repo.add(EnrollRequest(id=rid, device_serial=auth.serial, label=label,
                                            csr_der=csr_der, created_at=now)):
                raise pending
            req = await repo.get(rid)   # a concurrent identical request stored it first
        if req is None or req.device_serial != auth.serial or req.label != label:
            raise Conflict("this CSR was already submitted by another client or for another stage")
        if req.state == "pending":
            raise pending
        if req.state == "rejected":
            raise NotAuthorized(f"enrollment request {rid} was rejected by the owner's administrator",
                                code="rejected")
        if req.state == "issued":
            if req.cert_serial is None:
                raise pending               # another replica is issuing it right now
            return await again(req.cert_serial)
        # approved: take the request first, so concurrent retries cannot issue twice
        if not await repo.decide(rid, "approved", "issued", now):
            raise pending
        try:
            result, der = await issue()
        except BaseException:
            await repo.decide(rid, "issued", "approved", now)   # let a retry issue it
            raise
        serial = format(x509.load_der_x509_certificate(der).serial_number, "x")
        await repo.decide(rid, "issued", "issued", now, cert_serial=serial)
        return result

    async def approve(self, request_id: str) -> EnrollRequest:
        return await self._decide(request_id, ("pending",), "approved")

    async def reject(self, request_id: str) -> EnrollRequest:
        return await self._decide(request_id, ("pending", "approved"), "rejected")

    async def pending(self) -> list[EnrollRequest]:
        return await self.store.enroll_requests.list(state="pending")

    async def _decide(self, request_id: str, olds: tuple[str, ...], new: str) -> EnrollRequest:
        repo = self.store.enroll_requests
        for old in olds:
            if await repo.decide(request_id, old, new, self.clock()):
                return await repo.get(request_id)
        req = await repo.get(request_id)
        if req is None:
            raise NotFound(f"no enrollment request {request_id}")
        raise Conflict(f"enrollment request {request_id} is {req.state}, it cannot become {new}")


def _same_names(csr: x509.CertificateSigningRequest, cert: x509.Certificate) -> None:
    """RFC 7030 §4.2.2: a renewal keeps the subject (and the SAN, when the CSR names one)."""
    if csr.subject != cert.subject:
        raise PolicyViolation(f"simplereenroll: CSR subject '{csr.subject.rfc4514_string()}' must "
                              f"equal the renewed certificate's '{cert.subject.rfc4514_string()}'")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    if san != cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value:
        raise PolicyViolation("simplereenroll: CSR subjectAltName must equal the renewed "
                              "certificate's")


__all__ = ["EstService", "EstPolicy", "EnrollmentPolicy", "ClientIdentity", "Authenticated",
           "BasicUser", "hash_password", "verify_password", "EnrollmentPending", "PolicyViolation",
           "AuthenticationRequired", "est_admin"]


async def est_admin(directory, action: str, request_id: str | None = None, *,
                    show_all: bool = False, out=print) -> int:
    """`zerotouch gateway est list|approve|reject`: the person in RFC 7030's 202 loop."""
    from .roles import build_gateway   # roles builds EstService: import here, not at the top
    gw = await build_gateway(directory)
    try:
        if action == "list":
            reqs = (await gw.store.enroll_requests.list(limit=100_000) if show_all
                    else await gw.est.pending())
            for r in reqs:
                when = dt.datetime.fromtimestamp(r.created_at, dt.timezone.utc).isoformat(timespec="seconds")
                out(f"{r.id}  {r.state:8}  {r.device_serial}  {r.label}  {when}")
            if not reqs:
                out("no enrollment requests" + ("" if show_all else " awaiting approval"))
            return 0
        req = await (gw.est.approve if action == "approve" else gw.est.reject)(request_id or "")
        out(f"{req.id}: {req.state} ({req.device_serial}, {req.label})")
        return 0
    except ProtocolError as exc:
        out(f"refused: {exc.message}")
        return 1
    finally:
        await gw.close()
