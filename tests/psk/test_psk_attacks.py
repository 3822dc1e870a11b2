"""Attacks on the PSK profile, each stopped, leaving nothing issued or moved."""
from __future__ import annotations

import os

import pytest

from zerotouch.identity.psk import PskIdentity
from zerotouch.protocol import psk
from zerotouch.protocol.errors import (BadSignature, Conflict, NotAuthorized, ProtocolError,
                                       StaleMessage)
from zerotouch.protocol.messages import Challenge, FindOwner, Hello, Redirect
from zerotouch.protocol.proofs import owner_proof
from zerotouch.protocol.states import DeviceState, InventoryState, RendezvousStatus


async def _sessions(f) -> int:
    from sqlalchemy import func, select
    from zerotouch.storage.schema import gw_sessions
    async with f.store.engine.connect() as c:
        return (await c.execute(select(func.count()).select_from(gw_sessions))).scalar_one()


async def test_hello_macd_with_another_devices_psk_is_refused(pskf):
    f = pskf.f
    victim, attacker = await pskf.make(), await pskf.make()
    core = pskf.core(victim)
    core.receive_redirect(await f.rendezvous.find_owner(core.find_owner_request()))
    # the attacker knows its own PSK and MACs a hello naming the victim
    forged = pskf.core(victim, psk=PskIdentity(attacker.device_dir).psk())
    forged.state, forged._nonce, forged.redirect = DeviceState.REDIRECTED, os.urandom(16), core.redirect
    with pytest.raises(BadSignature):
        await f.gateway.hello(forged.hello_request())
    # ... or names itself in the payload with the victim's kid
    msg = Hello(serial=attacker.serial, nonce=os.urandom(16), time=int(f.gateway.cfg.clock()))
    with pytest.raises(NotAuthorized):
        await f.gateway.hello(psk.mac0(msg.encode(),
                                       psk.GatewayLegKeys.from_psk(PskIdentity(attacker.device_dir).psk(),
                                                                   attacker.serial).up,
                                       kid=psk.device_kid(victim.serial)))
    assert await _sessions(f) == 0
    assert (await f.store.inventory.get(victim.serial)).state is InventoryState.EXPECTED


async def test_find_owner_macd_with_another_devices_psk_is_refused(pskf):
    f = pskf.f
    victim, attacker = await pskf.make(), await pskf.make()
    forged = pskf.core(victim, psk=PskIdentity(attacker.device_dir).psk())
    with pytest.raises(BadSignature):
        await f.rendezvous.find_owner(forged.find_owner_request())


async def test_replayed_macd_hello_and_prove_are_refused(pskf):
    f = pskf.f
    dev = await pskf.make()
    core = pskf.core(dev)
    core.receive_redirect(await f.rendezvous.find_owner(core.find_owner_request()))
    hello = core.hello_request()
    core.receive_challenge(await f.gateway.hello(hello))
    with pytest.raises(ProtocolError):          # the nonce answers one hello only
        await f.gateway.hello(hello)
    assert await _sessions(f) == 1
    prove = core.prove_request()
    core.receive_credentials(await f.gateway.prove(prove))
    secret = await f.vault.channel_secret(dev.serial)
    with pytest.raises(Conflict):               # nothing is issued twice
        await f.gateway.prove(prove)
    assert await f.vault.channel_secret(dev.serial) == secret
    done = core.done_request()
    core.receive_done_ack(await f.gateway.done(done))
    with pytest.raises(Conflict):
        await f.gateway.done(done)


async def test_redirect_macd_without_the_psk_is_refused(pskf):
    f = pskf.f
    dev = await pskf.make()
    core = pskf.core(dev)
    req = core.find_owner_request()
    nonce = FindOwner.decode(psk.parse_mac0(req).payload).nonce
    now = int(f.gateway.cfg.clock())
    evil = Redirect(serial=dev.serial, nonce=nonce, gateway_url="coap://evil.example:5683",
                    owner_fp=bytes(32), issued=now, expires=now + 300)
    # a key guessed, the rendezvous key of another device, or the rendezvous' signature
    other = await pskf.make()
    for key in (os.urandom(32),
                psk.RendezvousLegKeys.from_rv_key(
                    psk.rendezvous_key(PskIdentity(other.device_dir).psk(), other.serial), other.serial).down,
                # the device-to-rendezvous key (a reflected MAC) is not the answer key either
                psk.RendezvousLegKeys.from_rv_key(
                    psk.rendezvous_key(PskIdentity(dev.device_dir).psk(), dev.serial), dev.serial).up):
        with pytest.raises(BadSignature):
            core.receive_redirect(psk.mac0(evil.encode(), key))
    from zerotouch.protocol import cose
    from zerotouch.protocol.errors import MalformedMessage
    with pytest.raises(MalformedMessage):
        core.receive_redirect(cose.sign1(evil.encode(), cose.SoftwareSigner(f.rv_key)))
    assert core.state is DeviceState.FINDING_OWNER and core.redirect is None
    # and a genuine, but replayed, redirect for an older nonce
    old = await f.rendezvous.find_owner(req)
    core.reset()
    core.find_owner_request()
    with pytest.raises(StaleMessage):
        core.receive_redirect(old)


async def test_wrong_owner_proof_is_refused_even_with_the_psk(pskf):
    """Whoever holds the PSK (a box label) but not N_device cannot pose as the owner."""
    f = pskf.f
    dev = await pskf.make()
    core = pskf.core(dev)
    core.receive_redirect(await f.rendezvous.find_owner(core.find_owner_request()))
    hello = Hello.decode(psk.parse_mac0(core.hello_request()).payload)
    keys = psk.GatewayLegKeys.from_psk(PskIdentity(dev.device_dir).psk(), dev.serial)
    fake = Challenge(session=os.urandom(16), nonce=hello.nonce, challenge=os.urandom(16),
                     owner_proof=owner_proof(os.urandom(8), hello.nonce),
                     expires=int(f.gateway.cfg.clock()) + 60)
    with pytest.raises(NotAuthorized, match="N_device"):
        core.receive_challenge(psk.mac0(fake.encode(), keys.down))
    assert core.state is DeviceState.HELLO_SENT


async def test_challenge_macd_by_another_owner_without_the_psk_is_refused(pskf):
    f = pskf.f
    dev = await pskf.make()
    core = pskf.core(dev)
    core.receive_redirect(await f.rendezvous.find_owner(core.find_owner_request()))
    hello = Hello.decode(psk.parse_mac0(core.hello_request()).payload)
    n = PskIdentity(dev.device_dir).n_device()   # knows N_device (the label), not the PSK
    fake = Challenge(session=os.urandom(16), nonce=hello.nonce, challenge=os.urandom(16),
                     owner_proof=owner_proof(n, hello.nonce), expires=int(f.gateway.cfg.clock()) + 60)
    with pytest.raises(BadSignature):
        core.receive_challenge(psk.mac0(fake.encode(), os.urandom(32)))


async def test_wrapped_secret_opens_only_with_its_psk_and_nonce(pskf):
    f = pskf.f
    dev, other = await pskf.make(), await pskf.make()
    key, n = PskIdentity(dev.device_dir).psk(), PskIdentity(dev.device_dir).n_device()
    session, nonce = os.urandom(16), os.urandom(16)
    wrapped = await f.vault.seal_channel_secret_psk(
        dev.serial, wrap_key=psk.session_wrap_key(key, dev.serial, session), session=session, nonce=nonce)
    ok = psk.unwrap_secret(psk.session_wrap_key(key, dev.serial, session), wrapped, serial=dev.serial,
                           session=session, nonce=nonce, n_device=n)
    assert ok == await f.vault.channel_secret(dev.serial)
    other_key = PskIdentity(other.device_dir).psk()
    with pytest.raises(BadSignature):   # another device's PSK
        psk.unwrap_secret(psk.session_wrap_key(other_key, dev.serial, session), wrapped,
                          serial=dev.serial, session=session, nonce=nonce, n_device=n)
    with pytest.raises(BadSignature):   # another nonce M: H(M|N) inside differs
        psk.unwrap_secret(psk.session_wrap_key(key, dev.serial, session), wrapped, serial=dev.serial,
                          session=session, nonce=os.urandom(16), n_device=n)
    with pytest.raises(BadSignature):   # another N_device
        psk.unwrap_secret(psk.session_wrap_key(key, dev.serial, session), wrapped, serial=dev.serial,
                          session=session, nonce=nonce, n_device=os.urandom(8))
    with pytest.raises(BadSignature):   # another session
        psk.unwrap_secret(psk.session_wrap_key(key, dev.serial, os.urandom(16)), wrapped,
                          serial=dev.serial, session=session, nonce=nonce, n_device=n)


async def test_a_psk_message_cannot_continue_a_certificate_session_nor_the_reverse(pskf):
    f = pskf.f
    cert_dev = await f.make()
    cert_core = f.core(cert_dev)
    cert_core.receive_redirect(await f.rendezvous.find_owner(cert_core.find_owner_request()))
    cert_core.receive_challenge(await f.gateway.hello(cert_core.hello_request()))
    # a PSK device (with its own valid PSK) names the certificate device's session
    dev = await pskf.make()
    keys = psk.GatewayLegKeys.from_psk(PskIdentity(dev.device_dir).psk(), dev.serial)
    prove = psk.PskProve(session=cert_core._challenge.session, challenge=cert_core._challenge.challenge)
    with pytest.raises(NotAuthorized):
        await f.gateway.prove(psk.mac0(prove.encode(), keys.up, kid=psk.device_kid(dev.serial)))


async def test_device_without_a_gateway_psk_is_refused_and_not_redirected_elsewhere(pskf):
    f = pskf.f
    dev = await pskf.make(gateway_psk=False)
    core = pskf.core(dev)
    core.receive_redirect(await f.rendezvous.find_owner(core.find_owner_request()))
    with pytest.raises(NotAuthorized, match="PSK"):
        await f.gateway.hello(core.hello_request())
    assert await _sessions(f) == 0


async def test_certificate_device_cannot_use_the_mac_path_at_the_rendezvous(pskf):
    f = pskf.f
    dev = await f.make()   # a certificate device: no K_rv; a MAC'd find-owner naming it is refused
    msg = FindOwner(serial=dev.serial, nonce=os.urandom(16), time=int(f.gateway.cfg.clock()))
    with pytest.raises(NotAuthorized):
        await f.rendezvous.find_owner(psk.mac0(msg.encode(), os.urandom(32),
                                               kid=psk.device_kid(dev.serial)))
    assert (await f.store.rendezvous.get(dev.serial)).status is RendezvousStatus.MAPPED
