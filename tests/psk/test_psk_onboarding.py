"""The PSK profile end to end on the server cores: a device with only HMAC/HKDF/AES onboards,
and what each party stores and sees."""
from __future__ import annotations

import pytest

from zerotouch.protocol import psk
from zerotouch.protocol.states import DeviceState, InventoryState, RendezvousStatus
from zerotouch.services.gateway_psk import PSK_LDEVID_SERIAL


async def test_psk_device_onboards_with_macs_only(pskf):
    f = pskf.f
    dev = await pskf.make()
    core = pskf.core(dev)
    await pskf.onboard(core)
    assert core.state is DeviceState.ONBOARDED
    res = core.result
    assert res.bundle.psk_identity == dev.serial and res.bundle.terminus_port == 8884
    assert res.bundle.topic_prefix == f"devices/{dev.serial}"
    # the owner's copy of the channel secret is the device's
    assert await f.vault.channel_secret(dev.serial) == res.channel_secret
    inv = await f.store.inventory.get(dev.serial)
    assert inv.state is InventoryState.ONBOARDED and inv.ldevid_serial == PSK_LDEVID_SERIAL
    assert (await f.store.rendezvous.get(dev.serial)).status is RendezvousStatus.REGISTERED
    # nothing a certificate would have produced
    assert await f.store.certs.for_device(dev.serial) == []


async def test_every_device_message_is_a_mac0_and_small(pskf):
    dev = await pskf.make()
    core = pskf.core(dev)
    f = pskf.f
    sizes = {}
    req = core.find_owner_request(); sizes["find-owner"] = len(req)
    ans = await f.rendezvous.find_owner(req); sizes["redirect"] = len(ans)
    core.receive_redirect(ans)
    req = core.hello_request(); sizes["hello"] = len(req)
    ans = await f.gateway.hello(req); sizes["challenge"] = len(ans)
    core.receive_challenge(ans)
    req = core.prove_request(); sizes["prove"] = len(req)
    ans = await f.gateway.prove(req); sizes["credentials"] = len(ans)
    core.receive_credentials(ans)
    req = core.done_request(); sizes["done"] = len(req)
    ans = await f.gateway.done(req); sizes["ack"] = len(ans)
    core.receive_done_ack(ans)
    for name in ("find-owner", "hello", "prove", "done"):
        assert sizes[name] < 200, sizes
    assert max(sizes.values()) < 512, sizes
    print("PSK message sizes:", sizes, "up", sum(sizes[k] for k in ("find-owner", "hello", "prove", "done")),
          "down", sum(sizes[k] for k in ("redirect", "challenge", "credentials", "ack")))


async def test_rendezvous_holds_only_the_encrypted_rendezvous_key(pskf):
    from sqlalchemy import select
    from zerotouch.storage.schema import vault_secrets
    from zerotouch.identity.psk import PskIdentity
    dev = await pskf.make()
    key = PskIdentity(dev.device_dir).psk()
    k_rv = psk.rendezvous_key(key, dev.serial)
    async with pskf.f.store.engine.connect() as c:
        rows = (await c.execute(select(vault_secrets))).all()
    blob = b"".join(r.ciphertext for r in rows)
    assert key not in blob and k_rv not in blob        # neither in the clear
    assert await pskf.f.rendezvous.psk_keys.key(dev.serial) == k_rv
    await pskf.f.rendezvous.revoke(dev.serial)           # revoked: K_rv is forgotten
    assert await pskf.f.rendezvous.psk_keys.key(dev.serial) is None


async def test_claim_of_a_psk_device_needs_its_rendezvous_key(pskf):
    from zerotouch.protocol.errors import MalformedMessage, NotAuthorized
    f = pskf.f
    dev = await pskf.make(claim=False)
    kw = dict(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip="127.0.0.1", cport=8444,
              cfingerprint=f.owner_fp_hex)
    with pytest.raises(MalformedMessage, match="cpsk"):
        await f.rendezvous.claim(**kw)
    with pytest.raises(NotAuthorized, match="commitment"):
        await f.rendezvous.claim(**kw, cpsk="ab" * 32)
    assert (await f.store.rendezvous.get(dev.serial)).status is RendezvousStatus.NOT_MAPPED
    # before a claim the device is told to wait, and nothing is redirected
    from zerotouch.protocol.errors import TryLater
    with pytest.raises(TryLater):
        await f.rendezvous.find_owner(pskf.core(dev).find_owner_request())
    k_rv = psk.rendezvous_key(pskf.psks.get(dev.serial) or
                              __import__("zerotouch.identity.psk", fromlist=["x"]).PskIdentity(dev.device_dir).psk(),
                              dev.serial)
    result = await f.rendezvous.claim(**kw, cpsk=k_rv.hex())
    assert result.status == "mapped"
    assert result.fingerprint == psk.psk_commitment(k_rv, dev.serial).hex()


async def test_mac0_round_trip_and_strict_parsing():
    from zerotouch.protocol.errors import BadSignature, MalformedMessage
    key = bytes(32)
    m = psk.mac0(b"payload", key, kid=b"0a000001")
    parsed = psk.parse_mac0(m)
    assert parsed.verify(key) == b"payload" and parsed.kid == b"0a000001"
    with pytest.raises(BadSignature):
        parsed.verify(bytes([1]) * 32)
    import cbor2
    tampered = cbor2.loads(m)
    tampered.value[2] = b"payloaX"
    with pytest.raises(BadSignature):
        psk.parse_mac0(cbor2.dumps(tampered)).verify(key)
    with pytest.raises(MalformedMessage):
        psk.parse_mac0(cbor2.dumps(cbor2.CBORTag(18, tampered.value)))   # a Sign1 tag
    # distinct keys per direction and purpose
    g = psk.GatewayLegKeys.from_psk(bytes(range(32)), "0a000001")
    r = psk.RendezvousLegKeys.from_rv_key(psk.rendezvous_key(bytes(range(32)), "0a000001"), "0a000001")
    assert len({g.up, g.down, g.bundle, r.up, r.down}) == 5
