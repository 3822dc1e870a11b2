"""TPM 2.0 device side, on tpm2-pytss (the only module that imports it).

What is here (the foundation of issue 3):
  * open an ESAPI context on a TCTI string (``swtpm:host=127.0.0.1,port=2321``, ``device:/dev/tpmrm0``);
  * the endorsement key (EK): the persistent one at 0x81010001 when it matches the TCG EK profile
    default template (no CreatePrimary per connection: that costs 40-60 ms on swtpm), else
    re-created from that template; its certificate read from NV (RSA 2048: 0x01c00002,
    ECC P-256: 0x01c0000a);
  * an attestation key (AK): restricted ECDSA P-256 signing key, child of the EK; once
    provisioned (keys.provision) it is persistent at 0x81010002 (``Tpm.ak_handle()``);
  * TPM2_ActivateCredential for a (credentialBlob, encryptedSecret) made by the server
    (``zerotouch.attestation.credential.make_credential``);
  * hygiene: every transient object and session this module creates is flushed; ``close()``
    leaves the TPM with the transient handles it found.

Persistent handles and NV indices are listed in keys.py, which provisions them.

Public values cross the boundary as plain bytes: the AK public area is a marshalled TPMT_PUBLIC,
its private part a marshalled TPM2B_PRIVATE (encrypted by the TPM, only loadable in this TPM).
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import (ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_ECC, TPM2_HT, TPM2_SE,
                                  TPMA_OBJECT, TPMA_SESSION)
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT, TPM2B_PRIVATE,
                              TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMS_ECC_PARMS,
                              TPMS_SCHEME_HASH, TPMT_ECC_SCHEME, TPMT_KDF_SCHEME, TPMT_PUBLIC,
                              TPMT_SYM_DEF, TPMT_SYM_DEF_OBJECT, TPMU_ASYM_SCHEME,
                              TPMU_PUBLIC_PARMS)
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template

# TCG EK profile low-range templates with policy A (PolicySecret(TPM_RH_ENDORSEMENT)).
EK_TYPES = ("EK-ECC256", "EK-RSA2048")
EK_CERT_INDEX = {"EK-RSA2048": 0x01C00002, "EK-ECC256": 0x01C0000A}
EK_PERSISTENT = 0x81010001   # seed 003 table; swtpm_setup already persists its RSA EK here
AK_PERSISTENT = 0x81010002   # chosen by the lead; NB the TCG EK profile reserves it for an ECC EK


class TpmError(RuntimeError):
    """A TPM command failed."""


class ActivationError(TpmError):
    """TPM2_ActivateCredential refused the credential (wrong EK, wrong AK name, tampered blob)."""


@dataclass(frozen=True)
class AkBlob:
    """An attestation key as stored by the device: only this TPM can load it."""
    public: bytes   # marshalled TPMT_PUBLIC (what the server hashes into the AK name)
    private: bytes  # marshalled TPM2B_PRIVATE (sealed to this TPM's EK)


def _ak_template() -> TPM2B_PUBLIC:
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT)
    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
        type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs,
        parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
            scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA, details=TPMU_ASYM_SCHEME(
                ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256))),
            curveID=TPM2_ECC.NIST_P256,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL)))))


def _template_matches(have: TPMT_PUBLIC, want: TPMT_PUBLIC) -> bool:
    """Same key template (type, nameAlg, attributes, policy, parameters), unique ignored."""
    return (have.type == want.type and have.nameAlg == want.nameAlg
            and have.objectAttributes == want.objectAttributes
            and bytes(have.authPolicy) == bytes(want.authPolicy)
            and have.parameters.marshal(have.type) == want.parameters.marshal(want.type))


class _CountingESAPI:
    """Counts the TPM commands issued through an ESAPI context (``Tpm.commands``), so tests
    and benchmarks can say what each operation costs. ``tr_*``/``trsess_*`` are ESAPI
    bookkeeping, except tr_from_tpmpublic, which sends ReadPublic."""

    _LOCAL = ("tr_", "trsess_", "get_tcti", "close", "load_blob")

    def __init__(self, ctx: ESAPI, counts: Counter):
        self._ctx, self._counts = ctx, counts

    def __getattr__(self, name):
        attr = getattr(self._ctx, name)
        if not callable(attr) or (name.startswith(self._LOCAL) and name != "tr_from_tpmpublic"):
            return attr
        counts = self._counts

        def counted(*a, **kw):
            counts[name] += 1
            return attr(*a, **kw)
        return counted


class Tpm:
    """One ESAPI connection. Use as a context manager, or call ``close()``."""

    def __init__(self, tcti: str, *, ek_type: str = "auto"):
        self.tcti = tcti
        try:
            self._ctx = ESAPI(tcti)
        except TSS2_Exception as e:
            raise TpmError(f"cannot open TPM at {tcti!r}: {e}") from e
        self._ek_type = ek_type
        self._ek: ESYS_TR | None = None
        self._ek_public: TPM2B_PUBLIC | None = None
        self._ek_cert: bytes | None = None
        self._ek_persistent = False
        self._ak: ESYS_TR | None = None
        self._persistent: dict[int, ESYS_TR] = {}
        self._loaded: list[ESYS_TR] = []
        self.timings: dict[str, list[float]] = {}
        self.commands: Counter = Counter()   # TPM commands sent, by ESAPI method name
        self._counting = _CountingESAPI(self._ctx, self.commands)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Tpm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        try:
            for h in reversed(self._loaded):
                with contextlib.suppress(TSS2_Exception):
                    ctx.flush_context(h)
        finally:
            self._loaded.clear()
            self._ek = self._ak = None
            self._ek_persistent = False
            self._persistent.clear()
            ctx.close()

    @property
    def ctx(self) -> ESAPI:
        if self._ctx is None:
            raise TpmError("TPM connection is closed")
        return self._counting

    @contextlib.contextmanager
    def _timed(self, op: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings.setdefault(op, []).append((time.perf_counter() - t0) * 1000)

    def _flush(self, h: ESYS_TR) -> None:
        self.ctx.flush_context(h)
        if h in self._loaded:
            self._loaded.remove(h)

    # -- handle accounting -------------------------------------------------------------------
    def _handles(self, ht: int) -> list[int]:
        out: list[int] = []
        start = ht << 24
        more = True
        while more:
            more, data = self.ctx.get_capability(TPM2_CAP.HANDLES, start, 64)
            hs = [int(h) for h in data.data.handles.handle]
            hs = [h for h in hs if h >> 24 == ht]
            out += hs
            if not hs:
                break
            start = hs[-1] + 1
        return out

    def transient_handles(self) -> list[int]:
        return self._handles(TPM2_HT.TRANSIENT)

    def session_handles(self) -> list[int]:
        """Loaded and saved (context-swapped) sessions."""
        return self._handles(TPM2_HT.LOADED_SESSION) + self._handles(TPM2_HT.SAVED_SESSION)

    # -- endorsement key ---------------------------------------------------------------------
    def nv_indices(self) -> list[int]:
        return self._handles(TPM2_HT.NV_INDEX)

    def _nv_reader(self):
        """NV reader for create_ek_template that checks the index exists first (no ESYS
        error logging for the optional template/nonce indices)."""
        present = set(self.nv_indices())
        reader = NVReadEK(self.ctx)

        def read(index) -> bytes:
            if int(index) not in present:
                raise NoSuchIndex(index)
            return reader(index)
        return read

    def ek_types_with_certificate(self) -> list[str]:
        """Which TCG low-range EK certificates this TPM carries in NV."""
        reader = self._nv_reader()
        found = []
        for t in EK_TYPES:
            with contextlib.suppress(NoSuchIndex):
                if reader(EK_CERT_INDEX[t]):
                    found.append(t)
        return found

    def _choose_ek_type(self) -> str:
        if self._ek_type != "auto":
            if self._ek_type not in EK_TYPES:
                raise TpmError(f"unsupported EK type {self._ek_type}; one of {EK_TYPES}")
            return self._ek_type
        have = self.ek_types_with_certificate()
        for t in EK_TYPES:  # ECC P-256 preferred
            if t in have:
                return t
        return "EK-RSA2048"

    def persistent_public(self, handle: int) -> tuple[ESYS_TR, TPMT_PUBLIC] | None:
        """(ESYS_TR, public area) of the persistent object at ``handle``, or None."""
        if handle not in self._handles(TPM2_HT.PERSISTENT):
            return None
        tr = self.ctx.tr_from_tpmpublic(handle)
        pub, _, _ = self.ctx.read_public(tr)
        return tr, pub.publicArea

    def _persistent_ek(self) -> bool:
        """Use the persistent EK when it has the default template of the wanted EK type."""
        found = self.persistent_public(EK_PERSISTENT)
        if found is None:
            return False
        tr, pub = found
        kind = {TPM2_ALG.RSA: "EK-RSA2048", TPM2_ALG.ECC: "EK-ECC256"}.get(pub.type)
        if kind is None or self._ek_type not in ("auto", kind):
            self.ctx.tr_close(tr)
            return False

        def no_nv(index):  # the default template; an NV-provided one falls back to CreatePrimary
            raise NoSuchIndex(index)
        _, want = create_ek_template(kind, no_nv)
        if not _template_matches(pub, want.publicArea):
            self.ctx.tr_close(tr)
            return False
        self._ek, self._ek_type, self._ek_persistent = tr, kind, True
        self._persistent[EK_PERSISTENT] = tr
        self._ek_public, self._ek_cert = TPM2B_PUBLIC(publicArea=pub), None
        return True

    def ek(self) -> ESYS_TR:
        """The EK: the persistent one at 0x81010001 if it has the TCG default template (its
        certificate is read from NV only when asked for), else created once per connection."""
        if self._ek is None:
            with self._timed("ek_persistent"):
                if self._persistent_ek():
                    return self._ek
            self._ek_type = self._choose_ek_type()
            with self._timed("ek_create"):
                cert, template = create_ek_template(self._ek_type, self._nv_reader())
                try:
                    h, pub, _, _, _ = self.ctx.create_primary(
                        TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
                except TSS2_Exception as e:
                    raise TpmError(f"CreatePrimary(EK) failed: {e}") from e
            self._loaded.append(h)
            self._ek, self._ek_public, self._ek_cert = h, pub, cert
        return self._ek

    def persist_ek(self) -> None:
        """Make the current EK persistent at 0x81010001 (provisioning), if it is not yet."""
        if self.ek_is_persistent:
            return
        cert = self.ek_certificate()
        self._ek = self.persist(self._ek, EK_PERSISTENT, hierarchy=ESYS_TR.OWNER)
        self._ek_persistent, self._ek_cert = True, cert or b""

    @property
    def ek_is_persistent(self) -> bool:
        self.ek()
        return self._ek_persistent

    def ak_handle(self) -> ESYS_TR:
        """The provisioned AK, persistent at 0x81010002 (see keys.provision)."""
        if self._ak is None:
            self._ak = self.persistent_handle(AK_PERSISTENT)
        return self._ak

    # -- persistent objects ------------------------------------------------------------------
    def persistent_handle(self, handle: int) -> ESYS_TR:
        """ESYS_TR of a persistent object (one ReadPublic the first time per connection)."""
        if handle not in self._persistent:
            try:
                self._persistent[handle] = self.ctx.tr_from_tpmpublic(handle)
            except TSS2_Exception as e:
                raise TpmError(f"no persistent object at {handle:#x}: TPM not provisioned "
                               f"({e})") from e
        return self._persistent[handle]

    def persist(self, transient: ESYS_TR, handle: int, *, hierarchy=ESYS_TR.OWNER) -> ESYS_TR:
        """EvictControl a loaded object to ``handle`` and flush the transient copy."""
        try:
            tr = self.ctx.evict_control(hierarchy, transient, handle)
        except TSS2_Exception as e:
            raise TpmError(f"EvictControl to {handle:#x} failed: {e}") from e
        self._flush(transient)
        self._persistent[handle] = tr
        return tr

    def evict(self, handle: int) -> None:
        """Remove the persistent object at ``handle`` (no-op when there is none)."""
        if handle not in self._handles(TPM2_HT.PERSISTENT):
            return
        tr = self.persistent_handle(handle)
        self.ctx.evict_control(ESYS_TR.OWNER, tr, handle)  # ESYS invalidates tr
        self._persistent.pop(handle, None)
        if self._ek == tr:
            self._ek, self._ek_persistent = None, False
        if self._ak == tr:
            self._ak = None

    @property
    def ek_type(self) -> str:
        self.ek()
        return self._ek_type

    def ek_certificate(self) -> bytes | None:
        """The EK certificate (DER) from NV, or None when the TPM has none for this EK type."""
        self.ek()
        if self._ek_persistent and self._ek_cert is None:
            reader = self._nv_reader()
            try:
                self._ek_cert = reader(EK_CERT_INDEX[self._ek_type])
            except NoSuchIndex:
                self._ek_cert = b""
        return bytes(self._ek_cert) if self._ek_cert else None

    def ek_public(self) -> bytes:
        """The EK public area (marshalled TPMT_PUBLIC)."""
        self.ek()
        return self._ek_public.publicArea.marshal()

    def ek_public_key(self):
        """The EK public key as a `cryptography` key (compare with the certificate's)."""
        from cryptography.hazmat.primitives.serialization import load_der_public_key
        self.ek()
        return load_der_public_key(self._ek_public.to_der())

    @contextlib.contextmanager
    def _ek_policy(self):
        """A policy session satisfying the EK's policy A: PolicySecret(TPM_RH_ENDORSEMENT)."""
        s = self.ctx.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
        try:
            self.ctx.trsess_set_attributes(s, TPMA_SESSION.CONTINUESESSION)
            self.ctx.policy_secret(ESYS_TR.ENDORSEMENT, s)
            yield s
        finally:
            self.ctx.flush_context(s)

    # -- attestation key ---------------------------------------------------------------------
    def create_ak(self) -> AkBlob:
        """A new restricted ECDSA P-256 signing key, child of the EK."""
        ek = self.ek()
        with self._timed("ak_create"):
            try:
                with self._ek_policy() as s:
                    priv, pub, _, _, _ = self.ctx.create(
                        ek, TPM2B_SENSITIVE_CREATE(), _ak_template(), session1=s)
            except TSS2_Exception as e:
                raise TpmError(f"Create(AK) failed: {e}") from e
        return AkBlob(pub.publicArea.marshal(), priv.marshal())

    def load_ak(self, ak: AkBlob) -> ESYS_TR:
        """Load an AK under the EK; the handle stays loaded until ``unload`` or ``close``."""
        ek = self.ek()
        pub, _ = TPMT_PUBLIC.unmarshal(ak.public)
        priv, _ = TPM2B_PRIVATE.unmarshal(ak.private)
        with self._timed("ak_load"):
            try:
                with self._ek_policy() as s:
                    h = self.ctx.load(ek, priv, TPM2B_PUBLIC(publicArea=pub), session1=s)
            except TSS2_Exception as e:
                raise TpmError(f"Load(AK) failed: {e}") from e
        self._loaded.append(h)
        return h

    def unload(self, handle: ESYS_TR) -> None:
        self._flush(handle)

    def name(self, handle: ESYS_TR) -> bytes:
        """The TPM's name for a loaded object (nameAlg || H(TPMT_PUBLIC))."""
        _, name, _ = self.ctx.read_public(handle)
        return bytes(name)

    # -- credential activation ---------------------------------------------------------------
    def activate_credential(self, ak: ESYS_TR, credential_blob: bytes, secret: bytes) -> bytes:
        """TPM2_ActivateCredential: the credential the server bound to (this EK, ak's name).

        ``credential_blob`` and ``secret`` are the contents of TPM2B_ID_OBJECT and
        TPM2B_ENCRYPTED_SECRET (as returned by ``attestation.credential.make_credential``).
        """
        ek = self.ek()
        with self._timed("activate"):
            try:
                with self._ek_policy() as s:
                    cred = self.ctx.activate_credential(
                        ak, ek, TPM2B_ID_OBJECT(credential=credential_blob),
                        TPM2B_ENCRYPTED_SECRET(secret=secret),
                        session1=ESYS_TR.PASSWORD, session2=s)
            except TSS2_Exception as e:
                raise ActivationError(f"ActivateCredential failed: {e}") from e
        return bytes(cred)


def open_tpm(tcti: str, **kw) -> Tpm:
    return Tpm(tcti, **kw)
