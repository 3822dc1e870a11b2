"""A whole onboarding system wired in memory (no sockets): used by core and attack tests."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from zerotouch.identity.software import SoftwareIdentity
from zerotouch.pki.keys import generate_p256, public_key_pem, spki_fingerprint
from zerotouch.protocol.cose import SoftwareSigner
from zerotouch.protocol.device import DeviceOnboarding
from zerotouch.services.gateway import GatewayConfig, GatewayService
from zerotouch.services.manufacturer import MadeDevice, Manufacturer, RendezvousInfo, SECRET_FILE
from zerotouch.services.rendezvous import RendezvousConfig, RendezvousService
from zerotouch.services.vault import LocalVault, init_vault_dir
from zerotouch.storage import open_store


@dataclass
class Fleet:
    tmp: Path
    store: object
    manufacturer: Manufacturer
    rv_key: object
    rendezvous: RendezvousService
    vault: LocalVault
    gateway: GatewayService
    info: RendezvousInfo
    gateway_url: str = "https://127.0.0.1:8444"

    @property
    def owner_fp_hex(self) -> str:
        return self.vault.owner_fingerprint.hex()

    async def make(self, *, claim: bool = True, inventory: bool = True) -> MadeDevice:
        dev = self.manufacturer.make_device(self.tmp / "factory", self.info)
        await self.rendezvous.register(dev.registration)
        if claim:
            await self.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid,
                                        cip="127.0.0.1", cport=8444, cfingerprint=self.owner_fp_hex)
        if inventory:
            await self.gateway.register_label(dev.label.url, "test device")
        return dev

    def core(self, dev: MadeDevice, *, rv_key=None, clock=time.time) -> DeviceOnboarding:
        n_device = bytes.fromhex((dev.device_dir / SECRET_FILE).read_text())
        return DeviceOnboarding(serial=dev.serial, urn=dev.urn,
                                rendezvous_key=rv_key or self.rv_key.public_key(),
                                n_device=n_device, identity=SoftwareIdentity(dev.device_dir),
                                clock=clock, rng=os.urandom)

    async def onboard(self, core: DeviceOnboarding) -> None:
        core.receive_redirect(await self.rendezvous.find_owner(core.find_owner_request()))
        core.receive_challenge(await self.gateway.hello(core.hello_request()))
        core.receive_credentials(await self.gateway.prove(core.prove_request()))
        core.receive_done_ack(await self.gateway.done(core.done_request()))


async def make_fleet(tmp: Path, db_url: str, *, notify: bool = True) -> Fleet:
    store = await open_store(db_url)
    manufacturer = Manufacturer(tmp / "manufacturer")
    rv_key = generate_p256()
    info = RendezvousInfo(url="https://127.0.0.1:8443", key_pem=public_key_pem(rv_key.public_key()).decode(),
                          tls_ca_pem="")
    rendezvous = RendezvousService(store.rendezvous, SoftwareSigner(rv_key),
                                   RendezvousConfig(manufacturer_cas=[manufacturer.ca.cert]))
    init_vault_dir(tmp / "vault")
    vault = LocalVault(tmp / "vault", store.secrets, store.certs)
    cfg = GatewayConfig(manufacturer_cas=[manufacturer.ca.cert], terminus_host="127.0.0.1",
                        terminus_port=8883)
    gateway = GatewayService(store, vault, cfg, notify_rendezvous=rendezvous.registered if notify else None)
    return Fleet(tmp=tmp, store=store, manufacturer=manufacturer, rv_key=rv_key,
                 rendezvous=rendezvous, vault=vault, gateway=gateway, info=info)


__all__ = ["Fleet", "make_fleet", "spki_fingerprint"]
