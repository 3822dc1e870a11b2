"""Attacks on onboarding, each stopped — and each leaving nothing stored or changed.

Every test drives the real device core against the real server cores (the in-memory fleet of
`tests/fleet.py`); an attacker is modelled by hand-built or replayed messages. After every
refusal the test checks the state an attack could have moved: device state, inventory,
rendezvous mapping, gateway sessions, issued certificates, channel secrets in the vault.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import cbor2
import pytest
from sqlalchemy import func, select

from zerotouch.identity.software import SoftwareIdentity
from zerotouch.pki.keys import cert_der, generate_p256
from zerotouch.protocol import cose
from zerotouch.protocol.codec import MAX_MESSAGE
from zerotouch.protocol.device import DeviceOnboarding
from zerotouch.protocol.errors import (BadSignature, Conflict, MalformedMessage, NotAuthorized,
                                       ProtocolError, StaleMessage)
from zerotouch.protocol.messages import (Bundle, Challenge, Credentials, FindOwner, Hello, Prove,
                                         Redirect)
from zerotouch.protocol.proofs import owner_proof
from zerotouch.protocol.states import (DeviceState, InventoryState, RendezvousStatus,
                                       SessionState)
from zerotouch.protocol.tte import Label
from zerotouch.services.manufacturer import SECRET_FILE, Manufacturer
from zerotouch.storage.schema import gw_sessions

from fleet import make_fleet

LDEVID_KEY_FILE = "ldevid.key"  # where the software identity keeps a key it made for a CSR


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
async def other_owner(tmp_path, fleet):
    """A second, independent owner (own vault, owner key, gateway, database) that trusts the
    same manufacturer: the attacker's — or simply the wrong — owner."""
    other = await make_fleet(tmp_path / "other", f"sqlite:///{tmp_path}/other.db")
    other.gateway.cfg.manufacturer_cas.append(fleet.manufacturer.ca.cert)
    try:
        yield other
    finally:
        await other.store.close()


async def session_count(store) -> int:
    async with store.engine.connect() as c:
        return (await c.execute(select(func.count()).select_from(gw_sessions))).scalar_one()


def payload_of(signed: bytes):
    return cose.parse_sign1(signed, max_size=MAX_MESSAGE).payload


def device_signed(ident: SoftwareIdentity, msg) -> bytes:
    return cose.sign1(msg.encode(), ident.idevid_signer(), x5chain=[ident.idevid_cert_der()])


async def to_challenge(fleet, dev, core=None) -> tuple[DeviceOnboarding, Challenge]:
    core = core or fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    challenge = core.receive_challenge(await fleet.gateway.hello(core.hello_request()))
    return core, challenge


async def assert_nothing_issued(fleet, serial: str) -> None:
    assert await fleet.store.certs.for_device(serial) == []
    assert await fleet.vault.channel_secret(serial) is None
    inv = await fleet.store.inventory.get(serial)
    if inv is not None:
        assert inv.state is not InventoryState.ONBOARDED
        assert inv.ldevid_serial is None


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


# --- phase 3: the redirect -------------------------------------------------------------------
async def test_replayed_redirect_is_refused_as_stale(fleet):
    dev = await fleet.make()
    core = fleet.core(dev)
    old_redirect = await fleet.rendezvous.find_owner(core.find_owner_request())
    core.reset()
    new_request = core.find_owner_request()          # a new request has a new nonce
    with pytest.raises(StaleMessage):
        core.receive_redirect(old_redirect)
    assert core.state is DeviceState.FINDING_OWNER and core.redirect is None
    # the answer to the new request is still accepted: the replay changed nothing
    core.receive_redirect(await fleet.rendezvous.find_owner(new_request))
    assert core.state is DeviceState.REDIRECTED
    assert (await fleet.store.rendezvous.get(dev.serial)).status is RendezvousStatus.MAPPED


async def test_redirect_signed_by_another_key_is_refused(fleet):
    dev = await fleet.make()
    core = fleet.core(dev)
    request = FindOwner.decode(payload_of(core.find_owner_request()))
    now = int(time.time())
    evil = Redirect(serial=dev.serial, nonce=request.nonce, gateway_url="https://203.0.113.66:443",
                    owner_fp=os.urandom(32), issued=now, expires=now + 300)
    forged = cose.sign1(evil.encode(), cose.SoftwareSigner(generate_p256()))
    with pytest.raises(BadSignature):
        core.receive_redirect(forged)
    assert core.state is DeviceState.FINDING_OWNER and core.redirect is None
    # the same redirect signed by the pinned rendezvous key would have been taken: only the key differs
    genuine = cose.sign1(evil.encode(), cose.SoftwareSigner(fleet.rv_key))
    assert core.receive_redirect(genuine).gateway_url == "https://203.0.113.66:443"


# --- phase 4: the owner proves itself ---------------------------------------------------------
async def test_owner_that_does_not_know_n_device_is_refused(fleet, other_owner):
    dev = await fleet.make(claim=False, inventory=False)
    # the other owner registers a forged label: the right devid, a wrong OTP (= N_device)
    wrong_otp = bytes(b ^ 0xFF for b in dev.label.otp_bytes).hex()
    forged = Label(rendezvous=dev.label.rendezvous, devid=dev.serial, otp=wrong_otp)
    await other_owner.gateway.register_label(forged.url)
    await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.serial, cip="127.0.0.1",
                                 cport=9444, cfingerprint=other_owner.owner_fp_hex)
    core = fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    assert core.redirect.owner_fp == other_owner.vault.owner_fingerprint   # pin matches: only N differs
    challenge = await other_owner.gateway.hello(core.hello_request())
    with pytest.raises(NotAuthorized):
        core.receive_challenge(challenge)
    assert core.state is DeviceState.HELLO_SENT
    with pytest.raises((AssertionError, ProtocolError)):
        core.prove_request()                      # the device never makes or sends a CSR
    assert not (dev.device_dir / LDEVID_KEY_FILE).exists()
    await assert_nothing_issued(other_owner, dev.serial)


async def test_owner_key_other_than_the_pinned_one_is_refused(fleet, other_owner):
    dev = await fleet.make()          # claimed for fleet's owner: the redirect pins fleet's key
    await other_owner.gateway.register_label(dev.label.url)   # other owner even knows N_device
    core = fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    assert core.redirect.owner_fp == fleet.vault.owner_fingerprint
    challenge_raw = await other_owner.gateway.hello(core.hello_request())   # traffic diverted
    # the other owner's proof is right; only its key is not the pinned one
    challenge = Challenge.decode(payload_of(challenge_raw))
    assert challenge.owner_proof == owner_proof(dev.label.otp_bytes, challenge.nonce)
    with pytest.raises(NotAuthorized):
        core.receive_challenge(challenge_raw)
    assert core.state is DeviceState.HELLO_SENT
    assert not (dev.device_dir / LDEVID_KEY_FILE).exists()
    await assert_nothing_issued(other_owner, dev.serial)
    # the real owner still onboards the device afterwards
    core.reset()
    await fleet.onboard(core)
    assert core.state is DeviceState.ONBOARDED
    assert core.result.owner_ca_der == await fleet.vault.owner_ca_der()


# --- device identity ---------------------------------------------------------------------------
async def test_device_from_an_untrusted_manufacturer_is_refused(tmp_path, fleet):
    rogue = Manufacturer(tmp_path / "rogue", name="rogue manufacturer")
    rdev = rogue.make_device(tmp_path / "rogue-factory", fleet.info)
    with pytest.raises(NotAuthorized):
        await fleet.rendezvous.register(rdev.registration)
    assert await fleet.store.rendezvous.get(rdev.serial) is None
    await fleet.gateway.register_label(rdev.label.url)     # even if the owner lists it
    core = fleet.core(rdev)
    request = core.find_owner_request()
    with pytest.raises(NotAuthorized):
        await fleet.rendezvous.find_owner(request)
    # suppose the device reached the gateway anyway (a redirect by the pinned key)
    now = int(time.time())
    core.receive_redirect(cose.sign1(Redirect(
        serial=rdev.serial, nonce=FindOwner.decode(payload_of(request)).nonce,
        gateway_url=fleet.gateway_url, owner_fp=fleet.vault.owner_fingerprint,
        issued=now, expires=now + 300).encode(), cose.SoftwareSigner(fleet.rv_key)))
    with pytest.raises(NotAuthorized):
        await fleet.gateway.hello(core.hello_request())
    assert await session_count(fleet.store) == 0
    inv = await fleet.store.inventory.get(rdev.serial)
    assert inv.state is InventoryState.EXPECTED and inv.idevid_fp is None
    await assert_nothing_issued(fleet, rdev.serial)


async def test_cloned_identity_from_an_untrusted_ca_is_refused(tmp_path, fleet):
    """A rogue CA certifies its own key under the serial and URN of a real, claimed device."""
    dev = await fleet.make()
    rogue = Manufacturer(tmp_path / "rogue", name=fleet.manufacturer.name)   # same name, other key
    key = generate_p256()
    clone_cert = cert_der(rogue.ca.issue_device(key.public_key(), serial=dev.serial, urn=dev.urn,
                                                org=fleet.manufacturer.name))
    signer = cose.SoftwareSigner(key)
    now = int(time.time())
    find = cose.sign1(FindOwner(serial=dev.serial, nonce=os.urandom(16), time=now).encode(), signer,
                      x5chain=[clone_cert])
    hello = cose.sign1(Hello(serial=dev.serial, nonce=os.urandom(16), time=now).encode(), signer,
                       x5chain=[clone_cert])
    with pytest.raises(NotAuthorized):
        await fleet.rendezvous.find_owner(find)
    with pytest.raises(NotAuthorized):
        await fleet.gateway.hello(hello)
    assert await session_count(fleet.store) == 0
    inv = await fleet.store.inventory.get(dev.serial)
    assert inv.state is InventoryState.EXPECTED and inv.idevid_fp is None
    rv = await fleet.store.rendezvous.get(dev.serial)
    assert rv.status is RendezvousStatus.MAPPED
    await assert_nothing_issued(fleet, dev.serial)


async def test_device_not_in_inventory_gets_no_session(fleet):
    dev = await fleet.make(inventory=False)
    core = fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    with pytest.raises(NotAuthorized) as err:
        await fleet.gateway.hello(core.hello_request())
    assert err.value.status == 403 and err.value.code == "not_in_inventory"
    assert await session_count(fleet.store) == 0
    assert await fleet.store.inventory.get(dev.serial) is None
    assert not await fleet.vault.has_device_secret(dev.serial)
    await assert_nothing_issued(fleet, dev.serial)


# --- claims at the rendezvous ----------------------------------------------------------------
async def test_reused_otp_is_a_conflict_and_keeps_the_first_mapping(fleet):
    dev = await fleet.make()
    before = await fleet.store.rendezvous.get(dev.serial)
    with pytest.raises(Conflict) as err:
        await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.serial, cip="203.0.113.9",
                                     cport=443, cfingerprint="ab" * 32)
    assert err.value.status == 409
    after = await fleet.store.rendezvous.get(dev.serial)
    assert after.status is RendezvousStatus.MAPPED
    assert after.gateway_url == before.gateway_url == "https://127.0.0.1:8444"
    assert after.owner_fp == before.owner_fp == fleet.vault.owner_fingerprint
    assert after.claimed_at == before.claimed_at
    assert after.failed_claims == 0
    # and the device is still sent to the first owner
    core = fleet.core(dev)
    redirect = core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    assert (redirect.gateway_url, redirect.owner_fp) == (before.gateway_url, before.owner_fp)


async def test_wrong_otps_are_counted_and_then_lock_the_device(fleet):
    dev = await fleet.make(claim=False, inventory=False)
    wrong = format(int(dev.label.otp, 16) ^ 1, "016x")
    for attempt in range(1, 11):
        with pytest.raises(NotAuthorized):
            await fleet.rendezvous.claim(otp_hex=wrong, devid_hex=dev.serial, cip="203.0.113.9",
                                         cport=443, cfingerprint="ab" * 32)
        rec = await fleet.store.rendezvous.get(dev.serial)
        assert rec.failed_claims == attempt
        assert rec.status is RendezvousStatus.NOT_MAPPED and rec.gateway_url is None
    with pytest.raises(ProtocolError) as err:            # now even the right OTP is refused
        await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.serial, cip="127.0.0.1",
                                     cport=8444, cfingerprint=fleet.owner_fp_hex)
    assert err.value.status == 429
    with pytest.raises(ProtocolError) as err:
        await fleet.rendezvous.status(otp_hex=dev.label.otp, devid_hex=dev.serial)
    assert err.value.status == 429
    rec = await fleet.store.rendezvous.get(dev.serial)
    assert rec.status is RendezvousStatus.NOT_MAPPED
    assert rec.gateway_url is None and rec.owner_fp is None and rec.claimed_at is None


# --- phase 5: credentials ---------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["flipped_byte", "other_key"])
async def test_tampered_config_bundle_is_refused(fleet, attack):
    dev = await fleet.make()
    core, _ = await to_challenge(fleet, dev)
    genuine = await fleet.gateway.prove(core.prove_request())
    creds = Credentials.decode(payload_of(genuine))
    bundle = cose.parse_sign1(creds.bundle, max_size=MAX_MESSAGE)
    if attack == "flipped_byte":
        # a same-length change keeps the CBOR valid: only the bundle's own signature stops it
        at = bundle.payload.index(b"127.0.0.1") + len("127.0.0.")
        bad_payload = flip(bundle.payload, at)
        assert Bundle.decode(bad_payload).terminus_host == "127.0.0.0"
        bad_bundle = cbor2.dumps(cbor2.CBORTag(cose.COSE_SIGN1_TAG, [
            bundle.protected_raw, {}, bad_payload, bundle.signature]))
    else:
        attacker = Bundle(**{**dataclasses.asdict(Bundle.decode(bundle.payload)),
                             "terminus_host": "203.0.113.66"})
        bad_bundle = cose.sign1(attacker.encode(), cose.SoftwareSigner(generate_p256()),
                                x5chain=[await fleet.vault.owner_ca_der()])
    # a relay that can get Credentials signed by the owner key but cannot forge the bundle
    relayed = await fleet.vault.sign(dataclasses.replace(creds, bundle=bad_bundle).encode())
    with pytest.raises(BadSignature):
        core.receive_credentials(relayed)
    assert core.state is DeviceState.PROVE_SENT and core.result is None
    # the genuine answer is still taken afterwards: the refusal left nothing half-stored
    result = core.receive_credentials(genuine)
    assert result.bundle.terminus_host == "127.0.0.1"


async def test_replayed_prove_and_done_are_conflicts(fleet):
    dev = await fleet.make()
    core, challenge = await to_challenge(fleet, dev)
    prove = core.prove_request()
    creds = await fleet.gateway.prove(prove)
    secret = await fleet.vault.channel_secret(dev.serial)
    with pytest.raises(Conflict):
        await fleet.gateway.prove(prove)
    assert len(await fleet.store.certs.for_device(dev.serial)) == 1
    assert await fleet.vault.channel_secret(dev.serial) == secret       # not replaced
    sess = await fleet.store.sessions.get(challenge.session)
    assert sess.state is SessionState.CREDENTIALED
    result = core.receive_credentials(creds)
    assert result.channel_secret == secret
    done = core.done_request()
    core.receive_done_ack(await fleet.gateway.done(done))
    with pytest.raises(Conflict):
        await fleet.gateway.done(done)
    with pytest.raises(Conflict):
        await fleet.gateway.prove(prove)
    assert (await fleet.store.sessions.get(challenge.session)).state is SessionState.DONE
    assert len(await fleet.store.certs.for_device(dev.serial)) == 1
    assert (await fleet.store.inventory.get(dev.serial)).state is InventoryState.ONBOARDED


async def test_prove_with_wrong_challenge_is_refused_and_session_survives(fleet):
    dev = await fleet.make()
    core, challenge = await to_challenge(fleet, dev)
    ident = SoftwareIdentity(dev.device_dir)
    wrong = Prove(session=challenge.session, challenge=flip(challenge.challenge, 0),
                  csr=ident.create_ldevid_csr(dev.serial, dev.urn), seal_key=ident.new_seal_key())
    with pytest.raises(BadSignature):
        await fleet.gateway.prove(device_signed(ident, wrong))
    assert (await fleet.store.sessions.get(challenge.session)).state is SessionState.CHALLENGED
    await assert_nothing_issued(fleet, dev.serial)
    # the device's real answer still works
    core.receive_credentials(await fleet.gateway.prove(core.prove_request()))
    assert len(await fleet.store.certs.for_device(dev.serial)) == 1


async def test_prove_by_another_device_for_this_session_is_refused(fleet):
    dev_a, dev_b = await fleet.make(), await fleet.make()
    core_a, chal_a = await to_challenge(fleet, dev_a)
    _core_b, chal_b = await to_challenge(fleet, dev_b)
    ident_b = SoftwareIdentity(dev_b.device_dir)
    hijack = Prove(session=chal_a.session, challenge=chal_a.challenge,
                   csr=ident_b.create_ldevid_csr(dev_b.serial, dev_b.urn),
                   seal_key=ident_b.new_seal_key())
    with pytest.raises(NotAuthorized):
        await fleet.gateway.prove(device_signed(ident_b, hijack))
    for chal in (chal_a, chal_b):
        assert (await fleet.store.sessions.get(chal.session)).state is SessionState.CHALLENGED
    await assert_nothing_issued(fleet, dev_a.serial)
    await assert_nothing_issued(fleet, dev_b.serial)
    core_a.receive_credentials(await fleet.gateway.prove(core_a.prove_request()))
    assert len(await fleet.store.certs.for_device(dev_a.serial)) == 1


async def test_sealed_secret_opens_only_for_its_device_and_nonce(fleet):
    dev_a, dev_b = await fleet.make(), await fleet.make()
    ident_a, ident_b = SoftwareIdentity(dev_a.device_dir), SoftwareIdentity(dev_b.device_dir)
    n_a = bytes.fromhex((dev_a.device_dir / SECRET_FILE).read_text())
    n_b = bytes.fromhex((dev_b.device_dir / SECRET_FILE).read_text())
    session, nonce = os.urandom(16), os.urandom(16)
    blob = await fleet.vault.seal_channel_secret(dev_a.serial, seal_key=ident_a.new_seal_key(),
                                                 session=session, nonce=nonce)
    ident_b.new_seal_key()
    with pytest.raises(BadSignature):       # another device's key
        ident_b.open_sealed(blob, serial=dev_a.serial, session=session, nonce=nonce, n_device=n_a)
    with pytest.raises(BadSignature):       # H(M|N) with another nonce M
        ident_a.open_sealed(blob, serial=dev_a.serial, session=session, nonce=os.urandom(16),
                            n_device=n_a)
    with pytest.raises(BadSignature):       # H(M|N) with another N_device
        ident_a.open_sealed(blob, serial=dev_a.serial, session=session, nonce=nonce, n_device=n_b)
    with pytest.raises(BadSignature):       # another onboarding session (HPKE info)
        ident_a.open_sealed(blob, serial=dev_a.serial, session=os.urandom(16), nonce=nonce,
                            n_device=n_a)
    secret = ident_a.open_sealed(blob, serial=dev_a.serial, session=session, nonce=nonce, n_device=n_a)
    assert secret == await fleet.vault.channel_secret(dev_a.serial) and len(secret) == 32
    assert await fleet.vault.channel_secret(dev_b.serial) is None


# --- freshness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [-3600, 3600])
async def test_stale_find_owner_and_hello_are_refused(fleet, offset):
    dev = await fleet.make()
    skewed = fleet.core(dev, clock=lambda: time.time() + offset)
    with pytest.raises(StaleMessage):
        await fleet.rendezvous.find_owner(skewed.find_owner_request())
    # a stale hello is refused too, before any session exists
    ident = SoftwareIdentity(dev.device_dir)
    hello = Hello(serial=dev.serial, nonce=os.urandom(16), time=int(time.time() + offset))
    with pytest.raises(StaleMessage):
        await fleet.gateway.hello(device_signed(ident, hello))
    assert await session_count(fleet.store) == 0
    assert (await fleet.store.rendezvous.get(dev.serial)).status is RendezvousStatus.MAPPED
    assert (await fleet.store.inventory.get(dev.serial)).state is InventoryState.EXPECTED
    # within the allowed skew the same device is served
    ok = fleet.core(dev, clock=lambda: time.time() + offset / 30)
    ok.receive_redirect(await fleet.rendezvous.find_owner(ok.find_owner_request()))
    assert ok.state is DeviceState.REDIRECTED


# --- bugs found while writing these tests ----------------------------------------------------
async def test_replayed_hello_does_not_change_an_onboarded_device(fleet):
    dev = await fleet.make()
    core = fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    hello = core.hello_request()
    core.receive_challenge(await fleet.gateway.hello(hello))
    core.receive_credentials(await fleet.gateway.prove(core.prove_request()))
    core.receive_done_ack(await fleet.gateway.done(core.done_request()))
    assert (await fleet.store.inventory.get(dev.serial)).state is InventoryState.ONBOARDED
    sessions = await session_count(fleet.store)
    try:
        await fleet.gateway.hello(hello)     # an eavesdropper replays it within the freshness window
    except ProtocolError:
        pass
    assert (await fleet.store.inventory.get(dev.serial)).state is InventoryState.ONBOARDED
    assert await session_count(fleet.store) == sessions


async def test_prove_with_unusable_seal_key_issues_nothing(fleet):
    dev = await fleet.make()
    _core, challenge = await to_challenge(fleet, dev)
    ident = SoftwareIdentity(dev.device_dir)
    bad = Prove(session=challenge.session, challenge=challenge.challenge,
                csr=ident.create_ldevid_csr(dev.serial, dev.urn),
                seal_key=b"\x04" * 33)                      # not an X25519 public key
    with pytest.raises(MalformedMessage):
        await fleet.gateway.prove(device_signed(ident, bad))
    assert await fleet.store.certs.for_device(dev.serial) == []
    assert (await fleet.store.sessions.get(challenge.session)).state is SessionState.CHALLENGED


async def test_concurrent_forged_registration_cannot_replace_n_device(fleet):
    dev = await fleet.make(inventory=False)
    legit_n = dev.label.otp_bytes
    forged = Label(rendezvous=dev.label.rendezvous, devid=dev.serial,
                   otp=bytes(b ^ 0x55 for b in legit_n).hex())
    # Force one real interleaving of two requests on two replicas: both see "not in inventory";
    # the legitimate one stores its secret and row, the forged one's secret lands in between.
    # (Every wait gives up after a moment, so a fixed implementation that orders things
    # differently cannot deadlock here.)
    inv, vault = fleet.store.inventory, fleet.vault
    real_get, real_add, real_put = inv.get, inv.add, vault.put_device_secret
    both_checked, legit_put = asyncio.Event(), asyncio.Event()
    forged_put, legit_added = asyncio.Event(), asyncio.Event()
    checked = 0

    async def soft_wait(event: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(event.wait(), 0.5)
        except TimeoutError:
            pass

    async def get(serial):
        nonlocal checked
        rec = await real_get(serial)
        checked += 1
        if checked >= 2:
            both_checked.set()
        await soft_wait(both_checked)
        return rec

    async def put(serial, n_device):
        if n_device != legit_n:
            await soft_wait(legit_put)
        await real_put(serial, n_device)
        (legit_put if n_device == legit_n else forged_put).set()

    async def add(rec):
        if rec.description == "legit":
            await soft_wait(forged_put)
            try:
                return await real_add(rec)
            finally:
                legit_added.set()
        await soft_wait(legit_added)
        return await real_add(rec)

    inv.get, inv.add, vault.put_device_secret = get, add, put
    try:
        results = await asyncio.gather(fleet.gateway.register_label(dev.label.url, "legit"),
                                       fleet.gateway.register_label(forged.url, "forged"),
                                       return_exceptions=True)
    finally:
        del inv.get, inv.add, vault.put_device_secret
    assert not isinstance(results[0], BaseException)
    assert isinstance(results[1], Conflict)
    assert (await fleet.store.inventory.get(dev.serial)).description == "legit"
    nonce = os.urandom(16)
    assert await fleet.vault.owner_proof(dev.serial, nonce) == owner_proof(legit_n, nonce)


# --- prove/done name the IDevID by kid (smaller messages): the kid cannot be borrowed -------
async def _challenged(fleet):
    dev = await fleet.make()
    core = fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    core.receive_challenge(await fleet.gateway.hello(core.hello_request()))
    return dev, core


async def test_prove_naming_the_right_kid_but_signed_by_another_key_is_refused(fleet):
    import hashlib as _hl
    from zerotouch.protocol import cose as _cose
    from zerotouch.protocol.messages import Prove as _Prove
    from zerotouch.pki.keys import generate_p256 as _gen
    dev, core = await _challenged(fleet)
    real = _cose.parse_sign1(core.prove_request(), max_size=65536)
    assert not real.x5chain and real.kid == _hl.sha256(core._id.idevid_cert_der()).digest()
    forged = _cose.sign1(real.payload, _cose.SoftwareSigner(_gen()), kid=real.kid)
    with pytest.raises(BadSignature):
        await fleet.gateway.prove(forged)
    assert await fleet.store.certs.for_device(dev.serial) == []
    assert (await fleet.store.sessions.get(_Prove.decode(real.payload).session)).state.value == "challenged"


async def test_prove_with_another_devices_kid_is_refused(fleet):
    from zerotouch.protocol import cose as _cose
    dev_a, core_a = await _challenged(fleet)
    dev_b, core_b = await _challenged(fleet)
    # B signs A's session with its own key and kid: the session's IDevID is A's
    a_payload = _cose.parse_sign1(core_a.prove_request(), max_size=65536).payload
    b_kid = _cose.parse_sign1(core_b.prove_request(), max_size=65536).kid
    forged = _cose.sign1(a_payload, core_b._id.idevid_signer(), kid=b_kid)
    with pytest.raises(NotAuthorized):
        await fleet.gateway.prove(forged)
    assert await fleet.store.certs.for_device(dev_a.serial) == []


async def test_prove_carrying_its_certificate_is_still_accepted(fleet):
    """Devices that keep sending x5chain (older agents) still onboard."""
    from zerotouch.protocol import cose as _cose
    dev, core = await _challenged(fleet)
    payload = _cose.parse_sign1(core.prove_request(), max_size=65536).payload
    with_cert = _cose.sign1(payload, core._id.idevid_signer(), x5chain=[core._id.idevid_cert_der()])
    core.receive_credentials(await fleet.gateway.prove(with_cert))
    core.receive_done_ack(await fleet.gateway.done(core.done_request()))
    assert core.state.value == "onboarded"
