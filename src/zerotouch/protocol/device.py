"""Device side of onboarding as a sans-IO state machine.

The caller moves bytes: it asks for the next request, sends it however it likes (HTTP,
CoAP, a test calling a server core), and feeds the answer back. Time and randomness are
injected. Nothing is accepted from the owner before the owner has proved itself.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ..identity.base import DeviceIdentity
from ..pki.keys import spki_fingerprint
from . import cose
from .codec import MAX_MESSAGE
from .errors import BadSignature, MalformedMessage, NotAuthorized, StaleMessage
from .messages import (NONCE_LEN, Bundle, Challenge, Credentials, Done, DoneAck, FindOwner,
                       Hello, Prove, Redirect)
from .proofs import check_owner_proof
from .states import DEVICE_TRANSITIONS, DeviceState, check_transition

CLOCK_SKEW = 300  # seconds a device clock may be off before an expiry is believed


@dataclass(frozen=True)
class OnboardingResult:
    gateway_url: str
    owner_fp: bytes
    owner_ca_der: bytes
    ldevid_der: bytes
    bundle: Bundle
    bundle_raw: bytes
    channel_secret: bytes


def check_redirect(redirect: Redirect, *, serial: str, nonce: bytes, now: float) -> None:
    """What a device checks in an authenticated redirect, however it was authenticated
    (rendezvous signature, or a PSK device's MAC)."""
    if redirect.nonce != nonce:
        raise StaleMessage("redirect does not answer this request (nonce differs): a replay")
    if redirect.serial != serial:
        raise NotAuthorized("redirect is for another device")
    if redirect.expires + CLOCK_SKEW < now:
        raise StaleMessage("redirect has expired")
    if not redirect.gateway_url.startswith(("https://", "coaps://", "coap://")):
        raise MalformedMessage("redirect names an unsupported gateway URL")


class DeviceOnboarding:
    def __init__(self, *, serial: str, urn: str, rendezvous_key, n_device: bytes,
                 identity: DeviceIdentity, clock: Callable[[], float],
                 rng: Callable[[int], bytes]):
        self.serial = serial
        self.urn = urn
        self._rv_key = rendezvous_key
        self._n = n_device
        self._id = identity
        self._clock = clock
        self._rng = rng
        self.state = DeviceState.FACTORY
        self._nonce = b""
        self.redirect: Redirect | None = None
        self._owner_key = None
        self._owner_ca_der = b""
        self._challenge: Challenge | None = None
        self._csr_key_fp = b""
        self.result: OnboardingResult | None = None

    @property
    def owner_ca_der(self) -> bytes:
        """The owner CA certificate, once the owner has proved itself."""
        return self._owner_ca_der

    def _go(self, new: DeviceState) -> None:
        check_transition(DEVICE_TRANSITIONS, self.state, new)
        self.state = new

    def reset(self) -> None:
        """Start over from the rendezvous (after an error or a timeout)."""
        self.state = DeviceState.FACTORY
        self.redirect = self._challenge = self.result = None
        self._owner_key = None

    def _sign(self, msg, *, with_cert: bool = True) -> bytes:
        if with_cert:
            return cose.sign1(msg.encode(), self._id.idevid_signer(),
                              x5chain=[self._id.idevid_cert_der()])
        # After hello the gateway keeps the IDevID with the session: name it, do not resend it.
        return cose.sign1(msg.encode(), self._id.idevid_signer(),
                          kid=hashlib.sha256(self._id.idevid_cert_der()).digest())

    # --- phase 3 ------------------------------------------------------------------------
    def find_owner_request(self) -> bytes:
        self._go(DeviceState.FINDING_OWNER)
        self._nonce = self._rng(NONCE_LEN)
        return self._sign(FindOwner(serial=self.serial, nonce=self._nonce, time=int(self._clock())))

    def receive_redirect(self, data: bytes) -> Redirect:
        if self.state is not DeviceState.FINDING_OWNER:
            raise MalformedMessage("no redirect was asked for")
        signed = cose.parse_sign1(data, max_size=MAX_MESSAGE)
        redirect = Redirect.decode(signed.verify(self._rv_key))  # only the pinned key
        check_redirect(redirect, serial=self.serial, nonce=self._nonce, now=self._clock())
        self.redirect = redirect
        self._go(DeviceState.REDIRECTED)
        return redirect

    # --- phase 4 ------------------------------------------------------------------------
    def hello_request(self) -> bytes:
        self._go(DeviceState.HELLO_SENT)
        evidence = self._id.tpm_evidence()   # (EK certificate, AK public area) or None
        extra = dict(ek_cert=evidence[0], ak_public=evidence[1]) if evidence else {}
        return self._sign(Hello(serial=self.serial, nonce=self._nonce, time=int(self._clock()),
                                **extra))

    def receive_challenge(self, data: bytes) -> Challenge:
        if self.state is not DeviceState.HELLO_SENT:
            raise MalformedMessage("no challenge was expected")
        assert self.redirect is not None
        signed = cose.parse_sign1(data, max_size=MAX_MESSAGE)
        chain = signed.x5chain
        if not chain:
            raise BadSignature("challenge carries no owner certificate")
        try:
            owner_ca = x509.load_der_x509_certificate(chain[0])
            owner_key = owner_ca.public_key()
        except (ValueError, x509.InvalidVersion, TypeError, UnsupportedAlgorithm):
            raise MalformedMessage("owner certificate is not DER X.509 with a usable key") from None
        if spki_fingerprint(owner_key) != self.redirect.owner_fp:
            raise NotAuthorized("owner key is not the one the rendezvous pinned")
        challenge = Challenge.decode(signed.verify(owner_key))
        if challenge.nonce != self._nonce:
            raise StaleMessage("challenge does not answer this hello (nonce differs)")
        if not check_owner_proof(challenge.owner_proof, self._n, self._nonce):
            raise NotAuthorized("owner does not know this device's secret (N_device)")
        if challenge.expires + CLOCK_SKEW < self._clock():
            raise StaleMessage("challenge has expired")
        if self._id.tpm_evidence() and (challenge.cred_blob is None or challenge.cred_secret is None
                                        or challenge.pcr_mask is None):
            # Our secret can only be sealed to the TPM: an owner that skips attestation cannot
            # give us one, so say so instead of failing later.
            raise MalformedMessage("owner did not ask for TPM attestation (no credential in the challenge)")
        self._owner_key = owner_key
        self._owner_ca_der = chain[0]
        self._challenge = challenge
        self._go(DeviceState.OWNER_VERIFIED)
        return challenge

    def prove_request(self) -> bytes:
        assert self._challenge is not None
        self._go(DeviceState.PROVE_SENT)
        ch = self._challenge
        extra = {}
        if ch.cred_blob is not None and self._id.tpm_evidence():
            # Activation proves our AK shares a TPM with our EK; the quote over the owner's
            # fresh challenge says what software this TPM measured.
            attest, sig, pcrs = self._id.tpm_quote(ch.challenge, ch.pcr_mask)
            extra = dict(activation=self._id.tpm_activate(ch.cred_blob, ch.cred_secret),
                         quote=attest, quote_sig=sig, pcr_values=pcrs)
        else:
            extra = dict(seal_key=self._id.new_seal_key())
        csr_der = self._id.create_ldevid_csr(self.serial, self.urn)
        csr = x509.load_der_x509_csr(csr_der)
        self._csr_key_fp = spki_fingerprint(csr.public_key())
        return self._sign(Prove(session=ch.session, challenge=ch.challenge, csr=csr_der, **extra),
                          with_cert=False)

    # --- phase 5 ------------------------------------------------------------------------
    def receive_credentials(self, data: bytes) -> OnboardingResult:
        if self.state is not DeviceState.PROVE_SENT:
            raise MalformedMessage("no credentials were expected")
        assert self._challenge is not None and self.redirect is not None
        signed = cose.parse_sign1(data, max_size=MAX_MESSAGE)
        creds = Credentials.decode(signed.verify(self._owner_key))
        if creds.session != self._challenge.session or creds.nonce != self._nonce:
            raise StaleMessage("credentials belong to another onboarding")
        owner_ca = x509.load_der_x509_certificate(self._owner_ca_der)
        try:
            ldevid = x509.load_der_x509_certificate(creds.ldevid)
            ldevid.verify_directly_issued_by(owner_ca)
        except (ValueError, TypeError, Exception) as exc:
            raise BadSignature(f"LDevID is not issued by the owner CA: {exc}") from None
        if spki_fingerprint(ldevid.public_key()) != self._csr_key_fp:
            raise NotAuthorized("LDevID certifies a key this device did not ask for")
        bundle_signed = cose.parse_sign1(creds.bundle, max_size=MAX_MESSAGE)
        bundle = Bundle.decode(bundle_signed.verify(self._owner_key))
        if bundle.serial != self.serial:
            raise NotAuthorized("config bundle is for another device")
        if bundle.owner_ca != self._owner_ca_der:
            raise NotAuthorized("config bundle names another owner CA")
        if not 0 < bundle.terminus_port < 65536:
            raise MalformedMessage("config bundle has an invalid terminus port")
        secret = self._id.open_sealed(creds.sealed_secret, serial=self.serial,
                                      session=self._challenge.session, nonce=self._nonce,
                                      n_device=self._n)
        self.result = OnboardingResult(
            gateway_url=self.redirect.gateway_url, owner_fp=self.redirect.owner_fp,
            owner_ca_der=self._owner_ca_der, ldevid_der=creds.ldevid, bundle=bundle,
            bundle_raw=creds.bundle, channel_secret=secret)
        self._go(DeviceState.CREDENTIALED)
        return self.result

    def done_request(self) -> bytes:
        """Call once the result is stored durably."""
        assert self.result is not None and self._challenge is not None
        self._go(DeviceState.DONE_SENT)
        return self._sign(Done(session=self._challenge.session, serial=self.serial,
                               ldevid_fp=hashlib.sha256(self.result.ldevid_der).digest()),
                          with_cert=False)

    def receive_done_ack(self, data: bytes) -> None:
        if self.state is not DeviceState.DONE_SENT:
            raise MalformedMessage("no acknowledgement was expected")
        assert self._challenge is not None
        signed = cose.parse_sign1(data, max_size=MAX_MESSAGE)
        ack = DoneAck.decode(signed.verify(self._owner_key))
        if ack.session != self._challenge.session or ack.serial != self.serial:
            raise StaleMessage("acknowledgement belongs to another onboarding")
        self._go(DeviceState.ONBOARDED)


def der_to_pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
