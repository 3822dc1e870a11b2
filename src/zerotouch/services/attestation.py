"""TPM attestation at the owner gateway: EK chain, credential activation, PCR quote vs policy.

Hello (EK certificate + AK public) -> `TpmAttestation.begin`: checks the EK chains to a TPM
maker the owner trusts and is the TPM the manufacturer bound the IDevID to, then makes a
credential (TPM2_MakeCredential in pure Python) only that TPM can activate, for that AK.
Prove (activated credential + quote over the challenge) -> `TpmAttestation.check`: the
credential came back (the AK lives in the EK's TPM), the quote is signed by that AK over this
session's challenge, and the quoted PCRs are what the device type's policy allows. Nothing here
needs a TPM. The gateway dir holds the trust and the policies:

    tpm/roots/*.pem          TPM manufacturer roots the owner trusts
    tpm/intermediates/*.pem  their intermediate CAs
    policies/<type>.json     allowed PCR values per device type (IDevID OU); default.json for any
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cbor2
from cryptography import x509

from ..attestation.credential import CredentialError, check_ak_public, make_credential
from ..attestation.ek import EkCertificateError, EkVerifier, ek_key_id
from ..attestation.quote import PcrPolicy, QuoteError, verify_quote
from ..pki.hwmodule import DEFAULT_DEVICE_TYPE, device_type, tpm_binding
from ..protocol.errors import MalformedMessage, NotAuthorized
from ..protocol.messages import Hello, Prove

ROOTS_DIR = "tpm/roots"
INTERMEDIATES_DIR = "tpm/intermediates"
POLICIES_DIR = "policies"
CREDENTIAL_LEN = 32


class AttestationFailed(NotAuthorized):
    """A TPM check failed: no secret is released; the reason goes on the device's record."""

    def __init__(self, message: str):
        super().__init__(message, code="attestation_failed")


def pcr_mask(indices) -> int:
    mask = 0
    for i in indices:
        mask |= 1 << i
    return mask


def mask_indices(mask: int) -> list[int]:
    if not 0 < mask < 1 << 24:
        raise MalformedMessage("PCR selection must name PCRs 0..23")
    return [i for i in range(24) if mask >> i & 1]


@dataclass(frozen=True)
class Begun:
    """What hello hands back: the session's attestation state and the challenge's TPM fields."""
    state: bytes
    cred_blob: bytes
    cred_secret: bytes
    pcr_mask: int


@dataclass
class TpmAttestation:
    verifier: EkVerifier
    policies: dict[str, PcrPolicy] = field(default_factory=dict)
    rng: Callable[[int], bytes] | None = None

    @classmethod
    def load(cls, gateway_dir: Path, rng=None) -> "TpmAttestation":
        gateway_dir = Path(gateway_dir)
        roots = [p.read_bytes() for p in sorted((gateway_dir / ROOTS_DIR).glob("*.pem"))]
        inters = [p.read_bytes() for p in sorted((gateway_dir / INTERMEDIATES_DIR).glob("*.pem"))]
        policies = {}
        for p in sorted((gateway_dir / POLICIES_DIR).glob("*.json")):
            policies[p.stem] = PcrPolicy.from_json(p.read_text())
        return cls(EkVerifier.from_pem(roots, inters), policies, rng)

    def policy_for(self, cert: x509.Certificate) -> PcrPolicy:
        dtype = device_type(cert)
        policy = self.policies.get(dtype) or self.policies.get(DEFAULT_DEVICE_TYPE)
        if policy is None:
            raise AttestationFailed(
                f"no PCR policy for device type {dtype!r}: capture one from a known-good device "
                "(zerotouch policy capture) and install it on the gateway")
        return policy

    # -- hello ---------------------------------------------------------------------------------
    def begin(self, hello: Hello, idevid: x509.Certificate) -> Begun | None:
        """None for a device without a TPM (and whose IDevID names none)."""
        try:
            bound = tpm_binding(idevid)
        except ValueError as exc:
            raise MalformedMessage(str(exc)) from None
        if hello.ek_cert is None and hello.ak_public is None:
            if bound is not None:
                raise AttestationFailed("the IDevID says this device's key is in a TPM, but the "
                                        "device sent no TPM evidence")
            return None
        if hello.ek_cert is None or hello.ak_public is None:
            raise MalformedMessage("TPM evidence needs both the EK certificate and the AK public area")
        try:
            ek = self.verifier.verify(hello.ek_cert)
        except EkCertificateError as exc:
            raise AttestationFailed(str(exc)) from None
        if bound is not None and not hmac.compare_digest(bound, ek_key_id(ek)):
            raise AttestationFailed("the EK is not the one of the TPM the manufacturer bound this "
                                    "IDevID to")
        try:
            ak_name = check_ak_public(hello.ak_public)
        except CredentialError as exc:
            raise AttestationFailed(f"attestation key refused: {exc}") from None
        policy = self.policy_for(idevid)
        credential = (self.rng or _urandom)(CREDENTIAL_LEN)
        try:
            blob, secret = make_credential(ek.public_key(), ak_name, credential)
        except CredentialError as exc:
            raise AttestationFailed(f"cannot make a credential for this EK: {exc}") from None
        mask = pcr_mask(sorted(policy.pcrs))
        state = cbor2.dumps({"ek": hello.ek_cert, "ak": hello.ak_public,
                             "cred": hashlib.sha256(credential).digest(), "policy": policy.name,
                             "mask": mask}, canonical=True)
        return Begun(state, blob, secret, mask)

    # -- prove ---------------------------------------------------------------------------------
    def check(self, state: bytes, prove: Prove, challenge: bytes, idevid: x509.Certificate) -> bytes:
        """Raises AttestationFailed unless the TPM evidence holds; returns the EK certificate
        (DER) the channel secret must be sealed to."""
        st = cbor2.loads(state)
        if prove.activation is None or prove.quote is None or prove.quote_sig is None \
                or prove.pcr_values is None:
            raise AttestationFailed("TPM device sent no credential activation and quote")
        if prove.seal_key is not None:
            raise MalformedMessage("a TPM device's secret is sealed to its TPM, not to a seal key")
        if not hmac.compare_digest(hashlib.sha256(prove.activation).digest(), st["cred"]):
            raise AttestationFailed("credential activation failed: the attestation key is not in "
                                    "the TPM of that EK")
        indices = mask_indices(st["mask"])
        if len(prove.pcr_values) != 32 * len(indices):
            raise MalformedMessage(f"expected {len(indices)} PCR values of 32 bytes")
        values = {i: prove.pcr_values[32 * n:32 * n + 32] for n, i in enumerate(indices)}
        try:
            verify_quote(st["ak"], prove.quote, prove.quote_sig, nonce=challenge, pcr_values=values)
        except QuoteError as exc:
            raise AttestationFailed(f"quote refused: {exc}") from None
        policy = self.policies.get(st["policy"])
        if policy is None:   # removed between hello and prove
            policy = self.policy_for(idevid)
        violations = policy.violations(values)
        if violations:
            raise AttestationFailed(f"PCR policy {policy.name!r} violated: " + "; ".join(violations))
        return st["ek"]


def _urandom(n: int) -> bytes:
    import os
    return os.urandom(n)


def summary(state: bytes) -> str:
    """For the device record: which TPM, which policy."""
    st = cbor2.loads(state)
    ek = x509.load_der_x509_certificate(st["ek"])
    return (f"TPM attested: EK {ek_key_id(ek).hex()[:16]}, policy {st['policy']!r}, "
            f"PCRs {','.join(map(str, mask_indices(st['mask'])))}")
