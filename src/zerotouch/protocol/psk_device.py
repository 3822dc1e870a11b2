"""Device side of the PSK profile as a sans-IO state machine (same steps and states as
`device.DeviceOnboarding`, symmetric crypto only: see psk.py for the keys).

Nothing from the owner is accepted before its challenge verifies under the gateway-to-device
MAC key *and* carries the owner proof H(N_device | M) for this device's fresh nonce.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import psk
from .device import CLOCK_SKEW, check_redirect
from .errors import MalformedMessage, NotAuthorized, StaleMessage
from .messages import NONCE_LEN, Challenge, Done, DoneAck, FindOwner, Hello, Redirect
from .proofs import check_owner_proof
from .states import DEVICE_TRANSITIONS, DeviceState, check_transition



@dataclass(frozen=True)
class PskOnboardingResult:
    gateway_url: str
    owner_fp: bytes
    bundle: psk.PskBundle
    bundle_raw: bytes
    channel_secret: bytes


class PskDeviceOnboarding:
    profile = "psk"

    def __init__(self, *, serial: str, n_device: bytes, psk_key: bytes,
                 clock: Callable[[], float], rng: Callable[[int], bytes]):
        self.serial = serial
        self._n = n_device
        self._rv = psk.RendezvousLegKeys.from_rv_key(psk.rendezvous_key(psk_key, serial), serial)
        self._gw = psk.GatewayLegKeys.from_psk(psk_key, serial)
        self._psk = psk_key
        self._kid = psk.device_kid(serial)
        self._clock = clock
        self._rng = rng
        self.state = DeviceState.FACTORY
        self._nonce = b""
        self.redirect: Redirect | None = None
        self._challenge: Challenge | None = None
        self.result: PskOnboardingResult | None = None

    owner_ca_der = b""   # no certificates in this profile

    def _go(self, new: DeviceState) -> None:
        check_transition(DEVICE_TRANSITIONS, self.state, new)
        self.state = new

    def reset(self) -> None:
        self.state = DeviceState.FACTORY
        self.redirect = self._challenge = self.result = None

    def _mac(self, msg, key: bytes) -> bytes:
        return psk.mac0(msg.encode(), key, kid=self._kid)

    @staticmethod
    def _open(data: bytes, key: bytes, cls):
        return cls.decode(psk.parse_mac0(data).verify(key))

    # --- find the owner ----------------------------------------------------------------------
    def find_owner_request(self) -> bytes:
        self._go(DeviceState.FINDING_OWNER)
        self._nonce = self._rng(NONCE_LEN)
        return self._mac(FindOwner(serial=self.serial, nonce=self._nonce, time=int(self._clock())),
                         self._rv.up)

    def receive_redirect(self, data: bytes) -> Redirect:
        if self.state is not DeviceState.FINDING_OWNER:
            raise MalformedMessage("no redirect was asked for")
        redirect = self._open(data, self._rv.down, Redirect)   # only a holder of K_rv
        check_redirect(redirect, serial=self.serial, nonce=self._nonce, now=self._clock())
        self.redirect = redirect
        self._go(DeviceState.REDIRECTED)
        return redirect

    # --- onboard -----------------------------------------------------------------------------
    def hello_request(self) -> bytes:
        self._go(DeviceState.HELLO_SENT)
        return self._mac(Hello(serial=self.serial, nonce=self._nonce, time=int(self._clock())),
                         self._gw.up)

    def receive_challenge(self, data: bytes) -> Challenge:
        if self.state is not DeviceState.HELLO_SENT:
            raise MalformedMessage("no challenge was expected")
        challenge = self._open(data, self._gw.down, Challenge)
        if challenge.nonce != self._nonce:
            raise StaleMessage("challenge does not answer this hello (nonce differs)")
        if not check_owner_proof(challenge.owner_proof, self._n, self._nonce):
            raise NotAuthorized("owner does not know this device's secret (N_device)")
        if challenge.expires + CLOCK_SKEW < self._clock():
            raise StaleMessage("challenge has expired")
        if challenge.cred_blob is not None or challenge.cred_secret is not None:
            raise MalformedMessage("a PSK device has no TPM to activate a credential")
        self._challenge = challenge
        self._go(DeviceState.OWNER_VERIFIED)
        return challenge

    def prove_request(self) -> bytes:
        assert self._challenge is not None
        self._go(DeviceState.PROVE_SENT)
        ch = self._challenge
        return self._mac(psk.PskProve(session=ch.session, challenge=ch.challenge), self._gw.up)

    def receive_credentials(self, data: bytes) -> PskOnboardingResult:
        if self.state is not DeviceState.PROVE_SENT:
            raise MalformedMessage("no credentials were expected")
        assert self._challenge is not None and self.redirect is not None
        creds = self._open(data, self._gw.down, psk.PskCredentials)
        if creds.session != self._challenge.session or creds.nonce != self._nonce:
            raise StaleMessage("credentials belong to another onboarding")
        bundle = self._open(creds.bundle, self._gw.bundle, psk.PskBundle)
        if bundle.serial != self.serial or bundle.psk_identity != self.serial:
            raise NotAuthorized("config bundle is for another device")
        if not 0 < bundle.terminus_port < 65536:
            raise MalformedMessage("config bundle has an invalid terminus port")
        secret = psk.unwrap_secret(
            psk.session_wrap_key(self._psk, self.serial, self._challenge.session),
            creds.wrapped_secret, serial=self.serial, session=self._challenge.session,
            nonce=self._nonce, n_device=self._n)
        self.result = PskOnboardingResult(
            gateway_url=self.redirect.gateway_url, owner_fp=self.redirect.owner_fp,
            bundle=bundle, bundle_raw=creds.bundle, channel_secret=secret)
        self._go(DeviceState.CREDENTIALED)
        return self.result

    def done_request(self) -> bytes:
        assert self.result is not None and self._challenge is not None
        self._go(DeviceState.DONE_SENT)
        return self._mac(Done(session=self._challenge.session, serial=self.serial,
                              ldevid_fp=psk.bundle_hash(self.result.bundle_raw)), self._gw.up)

    def receive_done_ack(self, data: bytes) -> None:
        if self.state is not DeviceState.DONE_SENT:
            raise MalformedMessage("no acknowledgement was expected")
        assert self._challenge is not None
        ack = self._open(data, self._gw.down, DoneAck)
        if ack.session != self._challenge.session or ack.serial != self.serial:
            raise StaleMessage("acknowledgement belongs to another onboarding")
        self._go(DeviceState.ONBOARDED)
