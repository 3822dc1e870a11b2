"""Device core driven against the server cores in memory, without sockets."""
from __future__ import annotations

import pytest

from zerotouch.protocol.states import DeviceState, InventoryState, RendezvousStatus
from zerotouch.protocol.errors import TryLater
from fleet import make_fleet


async def test_device_onboards_end_to_end(tmp_path, db_url):
    fleet = await make_fleet(tmp_path, db_url)
    dev = await fleet.make()
    core = fleet.core(dev)
    await fleet.onboard(core)
    assert core.state is DeviceState.ONBOARDED
    result = core.result
    assert result.bundle.serial == dev.serial
    assert result.bundle.topic_prefix == f"devices/{dev.serial}"
    # the vault stored the same channel secret the device unsealed
    assert await fleet.vault.channel_secret(dev.serial) == result.channel_secret
    inv = await fleet.store.inventory.get(dev.serial)
    assert inv.state is InventoryState.ONBOARDED and inv.ldevid_serial
    rv = await fleet.store.rendezvous.get(dev.serial)
    assert rv.status is RendezvousStatus.REGISTERED
    await fleet.store.close()


async def test_unclaimed_device_is_told_to_retry_later(tmp_path, sqlite_url):
    fleet = await make_fleet(tmp_path, sqlite_url)
    dev = await fleet.make(claim=False)
    core = fleet.core(dev)
    with pytest.raises(TryLater) as err:
        await fleet.rendezvous.find_owner(core.find_owner_request())
    assert err.value.status == 503 and err.value.retry_after > 0
    await fleet.store.close()


async def test_revoked_device_is_never_redirected_and_cannot_be_claimed(tmp_path, sqlite_url):
    from zerotouch.protocol.errors import ProtocolError
    fleet = await make_fleet(tmp_path, sqlite_url)
    dev = await fleet.make()
    rec = await fleet.rendezvous.revoke(dev.serial)
    assert rec.status is RendezvousStatus.REVOKED
    core = fleet.core(dev)
    with pytest.raises(ProtocolError) as err:
        await fleet.rendezvous.find_owner(core.find_owner_request())
    assert err.value.status == 410
    other = await fleet.make(claim=False)
    await fleet.rendezvous.revoke(other.serial)
    with pytest.raises(ProtocolError) as err:
        await fleet.rendezvous.claim(otp_hex=other.label.otp, devid_hex=other.label.devid,
                                     cip="127.0.0.1", cport=8444, cfingerprint=fleet.owner_fp_hex)
    assert err.value.status == 410
    assert (await fleet.store.rendezvous.get(other.serial)).gateway_url is None
    await fleet.store.close()


async def test_session_steps_follow_the_transition_table(tmp_path, sqlite_url):
    """done before prove is refused (CHALLENGED cannot go to DONE) and changes nothing."""
    from zerotouch.protocol.errors import Conflict
    from zerotouch.protocol.messages import Done
    from zerotouch.protocol import cose
    fleet = await make_fleet(tmp_path, sqlite_url)
    dev = await fleet.make()
    core = fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    challenge = core.receive_challenge(await fleet.gateway.hello(core.hello_request()))
    early = cose.sign1(Done(session=challenge.session, serial=dev.serial, ldevid_fp=bytes(32)).encode(),
                       core._id.idevid_signer(), x5chain=[core._id.idevid_cert_der()])
    with pytest.raises(Conflict):
        await fleet.gateway.done(early)
    assert (await fleet.store.sessions.get(challenge.session)).state.value == "challenged"
    assert (await fleet.store.inventory.get(dev.serial)).state is InventoryState.ONBOARDING
    await fleet.store.close()
