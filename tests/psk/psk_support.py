"""The in-memory fleet (tests/fleet.py) set up for PSK-profile devices."""
from __future__ import annotations

import os
import time

from zerotouch.identity.psk import PskIdentity
from zerotouch.protocol.psk import rendezvous_key
from zerotouch.protocol.psk_device import PskDeviceOnboarding
from zerotouch.services.rendezvous_psk import RvPskKeys

PSK_PORT = 8884


class PskFleet:
    """Wraps a Fleet: PSK devices, their claims (with K_rv) and the gateway's PSK table."""

    def __init__(self, fleet):
        self.f = fleet
        self.psks: dict[str, bytes] = {}
        fleet.rendezvous.psk_keys = RvPskKeys(fleet.store.secrets, os.urandom(32))
        fleet.gateway.psk_lookup = self.psks.get
        fleet.gateway.cfg.terminus_psk_port = PSK_PORT

    async def make(self, *, claim: bool = True, inventory: bool = True, gateway_psk: bool = True,
                   psk: bytes | None = None):
        f = self.f
        dev = f.manufacturer.make_psk_device(f.tmp / "factory", f.info, psk=psk)
        await f.rendezvous.register(dev.registration)
        key = PskIdentity(dev.device_dir).psk()
        if claim:
            await f.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid,
                                     cip="127.0.0.1", cport=8444, cfingerprint=f.owner_fp_hex,
                                     cpsk=rendezvous_key(key, dev.serial).hex())
        if inventory:
            await f.gateway.register_label(dev.label.url, "psk device")
        if gateway_psk:
            self.psks[dev.serial] = key
        return dev

    @staticmethod
    def core(dev, *, psk: bytes | None = None, n_device: bytes | None = None,
             clock=time.time) -> PskDeviceOnboarding:
        ident = PskIdentity(dev.device_dir)
        return PskDeviceOnboarding(serial=dev.serial, n_device=n_device or ident.n_device(),
                                   psk_key=psk or ident.psk(), clock=clock, rng=os.urandom)

    async def onboard(self, core: PskDeviceOnboarding) -> None:
        f = self.f
        core.receive_redirect(await f.rendezvous.find_owner(core.find_owner_request()))
        core.receive_challenge(await f.gateway.hello(core.hello_request()))
        core.receive_credentials(await f.gateway.prove(core.prove_request()))
        core.receive_done_ack(await f.gateway.done(core.done_request()))
