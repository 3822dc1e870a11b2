"""Open a secret sealed to this TPM's EK by the server (``attestation.duplicate.seal_to_tpm``).

TPM2_Import under the EK turns the server's duplicate into a private area only this TPM can
load (the seed is encrypted to this EK; the outer HMAC binds the object's name), TPM2_Load
loads it, TPM2_Unseal returns the data. The EK's policy (PolicySecret(ENDORSEMENT)) authorises
Import and Load; one policy session serves both, since a policy session with continueSession
is reset after each use and PolicySecret is simply satisfied again (saves a StartAuthSession
and a FlushContext per secret). The sealed object itself has an empty authValue: a password
session opens it. Nothing loaded here survives the call, on success or failure.

TPM commands per secret, 8 (counted on swtpm, the EK already loaded on this connection):
StartAuthSession, PolicySecret, Import, PolicySecret, Load, FlushContext(session), Unseal,
FlushContext(object). The first DA-protected Unseal after a TPM start may be answered
TPM_RC_RETRY (the TPM first clears its orderly state in NV); ESAPI resends it by itself.
"""
from __future__ import annotations

from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (TPM2B_DATA, TPM2B_ENCRYPTED_SECRET, TPM2B_PRIVATE, TPM2B_PUBLIC,
                              TPMT_PUBLIC, TPMT_SYM_DEF_OBJECT)

from ...attestation.duplicate import SealedForTpm
from .core import Tpm, TpmError


class UnsealError(TpmError):
    """The TPM refused a sealed secret: sealed for another TPM, or changed on the way."""


def _public_area(public: bytes) -> TPM2B_PUBLIC:
    try:
        area, used = TPMT_PUBLIC.unmarshal(public)
    except (TSS2_Exception, ValueError, TypeError) as e:
        raise UnsealError(f"the sealed secret's public area is malformed: {e}") from None
    if used != len(public):
        raise UnsealError("the sealed secret's public area has trailing bytes")
    return TPM2B_PUBLIC(publicArea=area)


def _refusal(step: str, e: TSS2_Exception) -> UnsealError:
    return UnsealError(
        f"this TPM refused the sealed secret at {step}: it was sealed for another TPM's "
        f"endorsement key, or it was changed after sealing ({e})")


def unseal_imported(tpm: Tpm, sealed: SealedForTpm) -> bytes:
    """Import, load and unseal `sealed` in this TPM; return the sealed bytes."""
    ek = tpm.ek()
    public = _public_area(sealed.public)
    ctx = tpm.ctx
    with tpm._timed("unseal_imported"):
        handle = None
        try:
            with tpm._ek_policy() as session:
                try:
                    private = ctx.import_(
                        ek, TPM2B_DATA(), public, TPM2B_PRIVATE(buffer=sealed.duplicate),
                        TPM2B_ENCRYPTED_SECRET(secret=sealed.seed),
                        TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL), session1=session)
                except TSS2_Exception as e:
                    raise _refusal("Import", e) from e
                try:
                    ctx.policy_secret(ESYS_TR.ENDORSEMENT, session)  # the EK policy, again
                    handle = ctx.load(ek, private, public, session1=session)
                except TSS2_Exception as e:
                    raise _refusal("Load", e) from e
                tpm._loaded.append(handle)  # so close() flushes it even if we are interrupted
            try:
                return bytes(ctx.unseal(handle, session1=ESYS_TR.PASSWORD))
            except TSS2_Exception as e:
                raise _refusal("Unseal", e) from e
        finally:
            if handle is not None:
                tpm._flush(handle)
