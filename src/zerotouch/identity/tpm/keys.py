"""TPM-resident device keys: factory provisioning, signing, LDevID keys and their TSS2 PEM files.

Handles and NV indices (seed 003's table, TCG provisioning guidance for the SRK):

  =============  ===========================================================================
  0x81010001     EK, endorsement hierarchy, TCG EK profile default template (swtpm_setup
                 already persists its RSA-2048 EK here; provision() persists it otherwise)
  0x81010002     AK, restricted ECDSA P-256 signing key, child of the EK (core.create_ak)
                 (NB: the TCG EK profile reserves 0x81010002 for an ECC P-256 EK; provision
                 refuses to evict anything there that is not our AK unless replace=True)
  0x81020000     IDevID key: ECC P-256, non-restricted signing, fixedTPM|fixedParent|
                 sensitiveDataOrigin|userWithAuth, empty auth; a *primary* key of the
                 endorsement hierarchy with a unique field of SHA-256("zerotouch IDevID")
  0x81000001     SRK: TCG provisioning guidance ECC P-256 storage primary (owner hierarchy),
                 the parent of LDevID keys and of their TSS2 PEM files (tpm2-openssl)
  0x01C90001     NV: N_device (8-32 bytes), write-once (WRITEDEFINE, locked after writing),
                 readable with empty auth, NO_DA
  0x01C90000     NV: IDevID certificate (DER), readable with empty auth, owner writes it
  =============  ===========================================================================

Why the IDevID key is a primary key and not a child of the EK: a primary is derived from the
endorsement seed and its template, so the *same* key can be re-created after an accidental
eviction (the IDevID certificate stays valid) and no EK policy session is needed to create it.
A child of the EK would be a fresh random key each time and need the EK's PolicySecret dance.
Both die with TPM2_ChangeEPS, as an IDevID should.

The NV indices live in the owner hierarchy: the seed puts the IDevID certificate under the
platform hierarchy, but firmware disables platform auth after boot on real devices, so an
agent could never provision or read-manage it; a factory that can use the platform hierarchy
may move it (only the index attributes change).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import namedtype, tag, univ
from tpm2_pytss.constants import (ESYS_TR, TPM2_ALG, TPM2_ECC, TPM2_HT, TPM2_RH, TPM2_ST,
                                  TPMA_NV, TPMA_OBJECT)
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (TPM2B_ECC_PARAMETER, TPM2B_NV_PUBLIC, TPM2B_PRIVATE,
                              TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMS_ECC_PARMS,
                              TPMS_ECC_POINT, TPMS_NV_PUBLIC, TPMS_SCHEME_HASH,
                              TPMT_ECC_SCHEME, TPMT_KDF_SCHEME, TPMT_PUBLIC, TPMT_SIG_SCHEME,
                              TPMT_SYM_DEF_OBJECT, TPMT_TK_HASHCHECK, TPMU_PUBLIC_ID,
                              TPMU_PUBLIC_PARMS, TPMU_SIG_SCHEME, TPMU_SYM_KEY_BITS,
                              TPMU_SYM_MODE)

from .core import AK_PERSISTENT, EK_PERSISTENT, Tpm, TpmError, _template_matches

IDEVID_PERSISTENT = 0x81020000
SRK_PERSISTENT = 0x81000001
N_DEVICE_INDEX = 0x01C90001
IDEVID_CERT_INDEX = 0x01C90000
N_DEVICE_SIZES = range(8, 33)
NV_CHUNK = 512   # below every TPM's TPM2_PT_NV_BUFFER_MAX (swtpm: 1024)

_SIGN_ATTRS = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
               | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
               | TPMA_OBJECT.SIGN_ENCRYPT)


def _ecc_template(attrs, *, scheme=TPM2_ALG.NULL, symmetric=None, unique_x=b"",
                  unique_y=b"") -> TPM2B_PUBLIC:
    sym = symmetric or TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)
    sch = TPMT_ECC_SCHEME(scheme=scheme)
    if scheme == TPM2_ALG.ECDSA:
        sch.details.ecdsa = TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)
    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
        type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs,
        parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
            symmetric=sym, scheme=sch, curveID=TPM2_ECC.NIST_P256,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL))),
        unique=TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(x=TPM2B_ECC_PARAMETER(unique_x),
                                                 y=TPM2B_ECC_PARAMETER(unique_y)))))


def idevid_template() -> TPM2B_PUBLIC:
    # NULL scheme: the signer names ECDSA-SHA256 per TPM2_Sign (TLS stacks may pick another).
    return _ecc_template(_SIGN_ATTRS, unique_x=hashlib.sha256(b"zerotouch IDevID").digest())


def srk_template() -> TPM2B_PUBLIC:
    """TCG TPM v2.0 Provisioning Guidance, ECC P-256 SRK: restricted decrypt, AES-128-CFB,
    noDA, unique = two 32-byte zero coordinates."""
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA | TPMA_OBJECT.RESTRICTED
             | TPMA_OBJECT.DECRYPT)
    aes128cfb = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
                                    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))
    return _ecc_template(attrs, symmetric=aes128cfb, unique_x=bytes(32), unique_y=bytes(32))


def ldevid_template() -> TPM2B_PUBLIC:
    return _ecc_template(_SIGN_ATTRS | TPMA_OBJECT.NODA)


def _spki(key) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _public_key(public: TPMT_PUBLIC) -> ec.EllipticCurvePublicKey:
    return load_der_public_key(public.to_der())


# -- signing -------------------------------------------------------------------------------------
class TpmSigner:
    """The cose ``Signer`` protocol over a loaded or persistent non-restricted P-256 key:
    SHA-256 in software, TPM2_Sign over the digest (NULL hashcheck ticket), DER output."""

    _SCHEME = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA, details=TPMU_SIG_SCHEME(
        ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)))
    _NO_TICKET = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)

    def __init__(self, tpm: Tpm, handle: ESYS_TR | int, public: TPMT_PUBLIC | None = None):
        self.tpm = tpm
        self.handle = tpm.persistent_handle(handle) if isinstance(handle, int) and \
            handle >> 24 == TPM2_HT.PERSISTENT else handle
        self._public = _public_key(public) if public is not None else None

    def public_key(self) -> ec.EllipticCurvePublicKey:
        if self._public is None:
            pub, _, _ = self.tpm.ctx.read_public(self.handle)
            self._public = _public_key(pub.publicArea)
        return self._public

    def sign_der(self, data: bytes) -> bytes:
        h = hashes.Hash(hashes.SHA256())
        h.update(data)
        with self.tpm._timed("sign"):
            try:
                sig = self.tpm.ctx.sign(self.handle, h.finalize(), self._SCHEME, self._NO_TICKET)
            except TSS2_Exception as e:
                raise TpmError(f"TPM2_Sign failed: {e}") from e
        return encode_dss_signature(int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big"),
                                    int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big"))


# -- LDevID keys under the SRK -------------------------------------------------------------------
@dataclass(frozen=True)
class TpmKeyBlob:
    """A key created under the SRK: only this TPM can load it (the private part is encrypted
    by the SRK's seed)."""
    public: bytes   # marshalled TPMT_PUBLIC
    private: bytes  # marshalled TPM2B_PRIVATE

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return _public_key(TPMT_PUBLIC.unmarshal(self.public)[0])

    @contextlib.contextmanager
    def load_signer(self, tpm: Tpm):
        """Load under the SRK, yield a TpmSigner, flush on exit."""
        pub, _ = TPMT_PUBLIC.unmarshal(self.public)
        priv, _ = TPM2B_PRIVATE.unmarshal(self.private)
        with tpm._timed("key_load"):
            try:
                h = tpm.ctx.load(tpm.persistent_handle(SRK_PERSISTENT), priv,
                                 TPM2B_PUBLIC(publicArea=pub))
            except TSS2_Exception as e:
                raise TpmError(f"Load(LDevID) failed: {e}") from e
        tpm._loaded.append(h)
        try:
            yield TpmSigner(tpm, h, pub)
        finally:
            tpm._flush(h)


def create_signing_key(tpm: Tpm) -> TpmKeyBlob:
    """A fresh ECC P-256 signing key under the SRK (the LDevID key; private part never leaves
    the TPM unencrypted)."""
    with tpm._timed("key_create"):
        try:
            priv, pub, _, _, _ = tpm.ctx.create(tpm.persistent_handle(SRK_PERSISTENT),
                                                TPM2B_SENSITIVE_CREATE(), ldevid_template())
        except TSS2_Exception as e:
            raise TpmError(f"Create(LDevID) under the SRK failed: {e}") from e
    return TpmKeyBlob(pub.publicArea.marshal(), priv.marshal())


# -- TSS2 PRIVATE KEY files (tpm2-openssl, tpm2-tss-engine) --------------------------------------
LOADABLE_KEY_OID = univ.ObjectIdentifier("2.23.133.10.1.3")
_PEM_LABEL = "TSS2 PRIVATE KEY"


def _explicit(n: int, asn1):
    return asn1.subtype(explicitTag=tag.Tag(tag.tagClassContext, tag.tagFormatConstructed, n))


class _TpmKeyAsn1(univ.Sequence):
    """TPMKey from the "ASN.1 Specification for TPM 2.0 Key Files" (tpm2-openssl reads it).
    policy/secret/authPolicy are only parsed so that such files can be refused."""
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("type", univ.ObjectIdentifier()),
        namedtype.OptionalNamedType("emptyAuth", _explicit(0, univ.Boolean())),
        namedtype.OptionalNamedType("policy", _explicit(1, univ.SequenceOf(univ.Any()))),
        namedtype.OptionalNamedType("secret", _explicit(2, univ.OctetString())),
        namedtype.OptionalNamedType("authPolicy", _explicit(3, univ.SequenceOf(univ.Any()))),
        namedtype.NamedType("parent", univ.Integer()),
        namedtype.NamedType("pubkey", univ.OctetString()),   # TPM2B_PUBLIC
        namedtype.NamedType("privkey", univ.OctetString()))  # TPM2B_PRIVATE


def tss2_private_key_pem(blob: TpmKeyBlob, parent: int = SRK_PERSISTENT) -> bytes:
    """The key as a ``-----BEGIN TSS2 PRIVATE KEY-----`` file (emptyAuth, loadable key)."""
    key = _TpmKeyAsn1()
    key["type"] = LOADABLE_KEY_OID
    key["emptyAuth"] = key["emptyAuth"].clone(True)
    key["parent"] = parent
    key["pubkey"] = len(blob.public).to_bytes(2, "big") + blob.public
    key["privkey"] = blob.private
    b64 = base64.encodebytes(der_encoder.encode(key)).decode().replace("\n", "")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return "\n".join([f"-----BEGIN {_PEM_LABEL}-----", *lines,
                      f"-----END {_PEM_LABEL}-----", ""]).encode()


def parse_tss2_private_key_pem(pem: bytes) -> tuple[TpmKeyBlob, int]:
    """(blob, parent handle) from a TSS2 PRIVATE KEY file; refuses policy-bound/imported keys."""
    text = pem.decode("ascii").strip()
    head, tail = f"-----BEGIN {_PEM_LABEL}-----", f"-----END {_PEM_LABEL}-----"
    if not (text.startswith(head) and text.endswith(tail)):
        raise ValueError("not a TSS2 PRIVATE KEY PEM")
    der = base64.b64decode("".join(text[len(head):-len(tail)].split()), validate=True)
    key, rest = der_decoder.decode(der, asn1Spec=_TpmKeyAsn1())
    if rest:
        raise ValueError("trailing data after the TPMKey")
    if key["type"] != LOADABLE_KEY_OID:
        raise ValueError(f"unsupported TSS2 key type {key['type']}")
    if key["policy"].isValue or key["secret"].isValue or key["authPolicy"].isValue:
        raise ValueError("policy-bound or imported TSS2 keys are not supported")
    pub = bytes(key["pubkey"])
    if len(pub) < 2 or int.from_bytes(pub[:2], "big") != len(pub) - 2:
        raise ValueError("pubkey is not a TPM2B_PUBLIC")
    return TpmKeyBlob(pub[2:], bytes(key["privkey"])), int(key["parent"])


# -- NV --------------------------------------------------------------------------------------------
def _nv_define(tpm: Tpm, index: int, size: int, extra: TPMA_NV) -> ESYS_TR:
    attrs = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA | extra
    info = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
        nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=attrs, dataSize=size))
    try:
        return tpm.ctx.nv_define_space(None, info, ESYS_TR.OWNER)
    except TSS2_Exception as e:
        raise TpmError(f"NV_DefineSpace({index:#x}) failed: {e}") from e


def _nv_write(tpm: Tpm, nv: ESYS_TR, data: bytes) -> None:
    for off in range(0, len(data), NV_CHUNK):
        tpm.ctx.nv_write(nv, data[off:off + NV_CHUNK], off, auth_handle=ESYS_TR.OWNER)


def _nv_read(tpm: Tpm, index: int) -> bytes:
    """Read a whole index with its (empty) auth value; raises TpmError when it is absent."""
    if index not in tpm.nv_indices():
        raise TpmError(f"NV index {index:#x} is not defined: TPM not provisioned")
    nv = tpm.ctx.tr_from_tpmpublic(index)
    try:
        pub, _ = tpm.ctx.nv_read_public(nv)
        size, out = pub.nvPublic.dataSize, b""
        while len(out) < size:
            out += bytes(tpm.ctx.nv_read(nv, min(NV_CHUNK, size - len(out)), len(out),
                                         auth_handle=nv))
        return out
    except TSS2_Exception as e:
        raise TpmError(f"NV_Read({index:#x}) failed: {e}") from e
    finally:
        tpm.ctx.tr_close(nv)


def _nv_undefine(tpm: Tpm, index: int) -> None:
    if index in tpm.nv_indices():
        tpm.ctx.nv_undefine_space(tpm.ctx.tr_from_tpmpublic(index), ESYS_TR.OWNER)


def read_n_device(tpm: Tpm) -> bytes:
    return _nv_read(tpm, N_DEVICE_INDEX)


def store_idevid_certificate(tpm: Tpm, cert_der: bytes) -> None:
    """Store (or replace) the IDevID certificate in NV 0x01C90000."""
    _nv_undefine(tpm, IDEVID_CERT_INDEX)
    _nv_write(tpm, _nv_define(tpm, IDEVID_CERT_INDEX, len(cert_der), TPMA_NV(0)), cert_der)


def read_idevid_certificate(tpm: Tpm) -> bytes | None:
    if IDEVID_CERT_INDEX not in tpm.nv_indices():
        return None
    return _nv_read(tpm, IDEVID_CERT_INDEX)


# -- provisioning ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Provisioned:
    ek_public: bytes                       # marshalled TPMT_PUBLIC
    ek_cert: bytes | None                  # DER, from the TPM maker, if any
    ak_public: bytes                       # marshalled TPMT_PUBLIC
    idevid_public: ec.EllipticCurvePublicKey


def is_provisioned(tpm: Tpm) -> bool:
    persistent = tpm._handles(TPM2_HT.PERSISTENT)
    return (N_DEVICE_INDEX in tpm.nv_indices() or IDEVID_PERSISTENT in persistent
            or AK_PERSISTENT in persistent)


def _persist_primary(tpm: Tpm, hierarchy: ESYS_TR, template: TPM2B_PUBLIC, handle: int):
    try:
        h, pub, _, _, _ = tpm.ctx.create_primary(TPM2B_SENSITIVE_CREATE(), template, hierarchy)
    except TSS2_Exception as e:
        raise TpmError(f"CreatePrimary for {handle:#x} failed: {e}") from e
    tpm._loaded.append(h)
    tpm.persist(h, handle)
    return pub.publicArea


def provision(tpm: Tpm, n_device: bytes, *, replace: bool = False) -> Provisioned:
    """Factory provisioning: persist EK, AK, IDevID key and SRK; write N_device once.

    Refuses a TPM that is already provisioned unless ``replace`` (then the AK and N_device
    are new; the IDevID key comes back the same, being a primary key).
    """
    if len(n_device) not in N_DEVICE_SIZES:
        raise ValueError("N_device must be 8 to 32 bytes")
    with tpm._timed("provision"):
        if is_provisioned(tpm):
            if not replace:
                raise TpmError("TPM already provisioned (IDevID/AK/N_device present); "
                               "pass replace=True to re-provision")
            for handle in (AK_PERSISTENT, IDEVID_PERSISTENT):
                tpm.evict(handle)
            for index in (N_DEVICE_INDEX, IDEVID_CERT_INDEX):
                _nv_undefine(tpm, index)
        if EK_PERSISTENT in tpm._handles(TPM2_HT.PERSISTENT) and not tpm.ek_is_persistent:
            raise TpmError(f"{EK_PERSISTENT:#x} holds an object that is not the default EK")
        tpm.persist_ek()
        ek_cert = tpm.ek_certificate()
        if ek_cert is not None and _spki(x509.load_der_x509_certificate(ek_cert).public_key()) \
                != _spki(tpm.ek_public_key()):
            raise TpmError("the EK does not match the EK certificate in NV")
        if AK_PERSISTENT in tpm._handles(TPM2_HT.PERSISTENT):
            raise TpmError(f"{AK_PERSISTENT:#x} is occupied (an ECC EK?) and not by our AK")
        ak = tpm.create_ak()
        tpm.persist(tpm.load_ak(ak), AK_PERSISTENT)
        idevid = _persist_primary(tpm, ESYS_TR.ENDORSEMENT, idevid_template(),
                                  IDEVID_PERSISTENT)
        srk = tpm.persistent_public(SRK_PERSISTENT)
        if srk is not None and not _same_template(srk[1], srk_template().publicArea):
            tpm.evict(SRK_PERSISTENT)
            srk = None
        if srk is None:
            _persist_primary(tpm, ESYS_TR.OWNER, srk_template(), SRK_PERSISTENT)
        nv = _nv_define(tpm, N_DEVICE_INDEX, len(n_device), TPMA_NV.WRITEDEFINE)
        _nv_write(tpm, nv, n_device)
        tpm.ctx.nv_write_lock(nv, auth_handle=ESYS_TR.OWNER)
        tpm.ctx.tr_close(nv)
    return Provisioned(tpm.ek_public(), ek_cert, ak.public, _public_key(idevid))


def _same_template(have: TPMT_PUBLIC, want: TPMT_PUBLIC) -> bool:
    return _template_matches(have, want)


def idevid_signer(tpm: Tpm) -> TpmSigner:
    return TpmSigner(tpm, IDEVID_PERSISTENT)
