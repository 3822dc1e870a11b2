"""RevocationService on both databases: what gets revoked, what the CRL says, what never changes."""
from __future__ import annotations

import time

import pytest
from cryptography import x509

from zerotouch.protocol.errors import MalformedMessage, NotAuthorized, NotFound
from zerotouch.protocol.states import InventoryState
from zerotouch.services.revocation import (REFRESH_FRACTION, RevocationService,
                                           normalise_cert_serial)

from revocation_harness import crl_entries, make_csr, onboard, owner_ca


class Clock:
    def __init__(self):
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


async def _state(fleet, serial: str) -> InventoryState:
    return (await fleet.store.inventory.get(serial)).state


async def test_revoke_device_revokes_all_its_certificates_and_only_those(any_fleet):
    fl = any_fleet
    a, b = await onboard(fl), await onboard(fl)
    op = x509.load_der_x509_certificate(await fl.vault.issue_certificate(
        make_csr(a.serial), a.serial, a.urn, 1, "operational"))  # a second certificate of A
    svc = RevocationService(fl.store, fl.vault)
    assert crl_entries(await svc.current_crl()) == {}

    result = await svc.revoke_device(a.serial)
    assert result.changed and result.state_changed
    assert sorted(result.revoked) == sorted([a.cert_serial, format(op.serial_number, "x")])
    assert await _state(fl, a.serial) is InventoryState.REVOKED

    der = await svc.current_crl()
    crl = x509.load_der_x509_crl(der)
    ca = owner_ca(fl)
    assert crl.issuer == ca.cert.subject and crl.is_signature_valid(ca.cert.public_key())
    assert crl.next_update_utc.timestamp() > time.time() + 3000
    assert set(crl_entries(der)) == {a.ldevid.serial_number, op.serial_number}
    assert (await fl.store.certs.get(a.cert_serial)).reason == "cessationOfOperation"
    # B is untouched: its record, its inventory state, and it is not on the list
    assert (await fl.store.certs.get(b.cert_serial)).revoked_at is None
    assert await _state(fl, b.serial) is InventoryState.ONBOARDED


async def test_revoking_twice_changes_nothing(any_fleet):
    fl = any_fleet
    a = await onboard(fl)
    svc = RevocationService(fl.store, fl.vault)
    assert (await svc.revoke_device(a.serial, "keyCompromise")).changed
    first = await fl.store.certs.get(a.cert_serial)
    crl_before = crl_entries(await svc.current_crl())

    again = await svc.revoke_device(a.serial, "superseded")
    assert not again.changed and again.already == [a.cert_serial]
    assert "already revoked, nothing changed" in again.describe()
    cert_again = await svc.revoke_certificate(a.cert_serial, "unspecified")
    assert not cert_again.changed and "already revoked" in cert_again.describe()
    rec = await fl.store.certs.get(a.cert_serial)
    assert (rec.revoked_at, rec.reason) == (first.revoked_at, "keyCompromise")  # first one stands
    assert crl_entries(await svc.current_crl()) == crl_before
    assert set(crl_before) == {a.ldevid.serial_number}


async def test_bad_reason_is_refused_and_changes_nothing(any_fleet):
    fl = any_fleet
    a = await onboard(fl)
    svc = RevocationService(fl.store, fl.vault)
    for call in (lambda: svc.revoke_device(a.serial, "stolen"),
                 lambda: svc.revoke_certificate(a.cert_serial, "certificateHold"),
                 lambda: svc.revoke_device("no-such-device", "KeyCompromise")):
        with pytest.raises(MalformedMessage, match="unknown revocation reason .*keyCompromise"):
            await call()
    assert (await fl.store.certs.get(a.cert_serial)).revoked_at is None
    assert await _state(fl, a.serial) is InventoryState.ONBOARDED
    assert crl_entries(await svc.current_crl()) == {}


async def test_unknown_device_or_certificate_is_not_found(any_fleet):
    svc = RevocationService(any_fleet.store, any_fleet.vault)
    with pytest.raises(NotFound, match="device SN-NOPE is not in the inventory"):
        await svc.revoke_device("SN-NOPE")
    with pytest.raises(NotFound, match="no certificate with serial abc"):
        await svc.revoke_certificate("0ABC")
    for bad in ("", "xyz", "12 34", "f" * 65):
        with pytest.raises(MalformedMessage, match="not a hexadecimal number"):
            await svc.revoke_certificate(bad)


def test_certificate_serials_are_normalised():
    assert normalise_cert_serial("0x00AB:CD") == "abcd"
    assert normalise_cert_serial(" 0a:1B ") == "a1b"


async def test_revoke_one_certificate_keeps_the_device(any_fleet):
    fl = any_fleet
    a, b = await onboard(fl), await onboard(fl)
    svc = RevocationService(fl.store, fl.vault)
    colon_hex = ":".join(f"{x:02X}" for x in a.ldevid.serial_number.to_bytes(20, "big"))
    result = await svc.revoke_certificate(colon_hex, "keyCompromise")
    assert result.revoked == [a.cert_serial] and f"device {a.serial}" in result.target
    assert await _state(fl, a.serial) is InventoryState.ONBOARDED
    assert set(crl_entries(await svc.current_crl())) == {a.ldevid.serial_number}
    assert (await fl.store.certs.get(a.cert_serial)).reason == "keyCompromise"
    assert (await fl.store.certs.get(b.cert_serial)).revoked_at is None


# pki/ca.py keys its REASONS by Python enum names (`key_compromise`) while the store and the
# CLI use RFC 5280 names (`keyCompromise`), so make_crl drops every reason. The one-line fix
# there: `REASONS = {r.value: r for r in x509.ReasonFlags}`. Strict: passes → remove the mark.
async def test_crl_entries_carry_their_reasons(fleet):
    a, b, c = await onboard(fleet), await onboard(fleet), await onboard(fleet)
    svc = RevocationService(fleet.store, fleet.vault)
    await svc.revoke_device(a.serial)
    await svc.revoke_certificate(b.cert_serial, "keyCompromise")
    await svc.revoke_certificate(c.cert_serial, "unspecified")
    assert crl_entries(await svc.current_crl()) == {
        a.ldevid.serial_number: "cessation_of_operation",
        b.ldevid.serial_number: "key_compromise",
        c.ldevid.serial_number: "unspecified"}  # RFC 5280: no reason code for unspecified


async def test_a_revoked_device_cannot_onboard_again(any_fleet):
    fl = any_fleet
    a = await onboard(fl)
    await RevocationService(fl.store, fl.vault).revoke_device(a.serial)
    with pytest.raises(NotAuthorized, match="revoked"):
        await fl.onboard(fl.core(a.made))
    assert len(await fl.store.certs.records_for_device(a.serial)) == 1  # no new LDevID


async def test_crl_cache_is_rebuilt_on_revocation_on_age_and_for_other_replicas(any_fleet):
    fl = any_fleet
    a, b = await onboard(fl), await onboard(fl)
    clock = Clock()
    svc = RevocationService(fl.store, fl.vault, clock=clock, recheck_s=5)
    replica = RevocationService(fl.store, fl.vault, clock=clock)
    first = await svc.current_crl()
    assert await svc.current_crl() == first  # cached: same bytes, no new signature

    await svc.revoke_device(a.serial)  # this process revoked: rebuilt at once
    second = await svc.current_crl()
    assert set(crl_entries(second)) == {a.ldevid.serial_number}

    await replica.revoke_device(b.serial)  # another replica: seen after the recheck interval
    assert await svc.current_crl() == second
    clock.t += 5
    third = await svc.current_crl()
    assert set(crl_entries(third)) == {a.ldevid.serial_number, b.ldevid.serial_number}

    clock.t += 3600 * REFRESH_FRACTION  # old enough: re-signed although nothing changed
    fourth = await svc.current_crl()
    assert fourth != third and crl_entries(fourth) == crl_entries(third)
    assert x509.load_der_x509_crl(fourth).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number \
        >= x509.load_der_x509_crl(third).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


async def test_write_crl_file_only_when_it_changed(any_fleet, tmp_path):
    fl = any_fleet
    a = await onboard(fl)
    svc = RevocationService(fl.store, fl.vault)
    path = tmp_path / "out" / "crl.pem"
    assert await svc.write_crl_file(path) is True
    assert path.read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    mtime = path.stat().st_mtime_ns
    assert await svc.write_crl_file(path) is False and path.stat().st_mtime_ns == mtime
    await svc.revoke_device(a.serial)
    assert await svc.write_crl_file(path) is True
    assert [r.serial_number for r in x509.load_pem_x509_crl(path.read_bytes())] == [a.ldevid.serial_number]


def test_validity_is_bounded(fleet):
    for bad in (10, 31 * 86400):
        with pytest.raises(ValueError, match="between 60 s and 30 days"):
            RevocationService(fleet.store, fleet.vault, crl_validity_s=bad)


async def test_device_revoked_while_onboarding_gets_nothing_more(fleet):
    """Revoked between hello and prove: prove is refused, nothing is issued, it stays revoked."""
    from zerotouch.protocol.errors import NotAuthorized
    from zerotouch.protocol.states import InventoryState
    dev = await fleet.make()
    core = fleet.core(dev)
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    core.receive_challenge(await fleet.gateway.hello(core.hello_request()))
    await RevocationService(fleet.store, fleet.vault).revoke_device(dev.serial)
    with pytest.raises(NotAuthorized):
        await fleet.gateway.prove(core.prove_request())
    assert await fleet.store.certs.for_device(dev.serial) == []
    assert (await fleet.store.inventory.get(dev.serial)).state is InventoryState.REVOKED
