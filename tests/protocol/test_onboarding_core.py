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
