"""IDevIDs at manufacturing over EST: a provisioning station relays the device's CSR."""
from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from zerotouch.pki.ca import DEVICE_URN_PREFIX, device_identity, verify_device_chain
from zerotouch.pki.keys import load_cert, load_private_key, public_key_der
from zerotouch.protocol import est as codec
from zerotouch.protocol.errors import Conflict
from zerotouch.protocol.states import DeviceState, InventoryState
from zerotouch.services.factory_est import (ISSUED_FILE, FactoryEstService, IssuedSerials,
                                            enroll_idevid, idevid_via_est, provisioning_ca)
from zerotouch.services.manufacturer import MadeDevice

from factory_harness import EST, device_csr


async def make_via(fleet, via) -> MadeDevice:
    """Fleet.make, with the IDevID from `via` (make_device blocks: run it off the loop)."""
    dev = await asyncio.to_thread(fleet.manufacturer.make_device, fleet.tmp / "factory",
                                  fleet.info, idevid_via=via)
    await fleet.rendezvous.register(dev.registration)
    await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip="127.0.0.1",
                                 cport=8444, cfingerprint=fleet.owner_fp_hex)
    await fleet.gateway.register_label(dev.label.url, "made on the factory line")
    return dev


def station_der(factory) -> bytes:
    return load_cert(factory.station.cert_file).public_bytes(Encoding.DER)


async def test_station_enrolls_an_idevid_over_tls(factory):
    csr, key = device_csr("0a1b2c3d")
    cert = await enroll_idevid(factory.url, station_cert=factory.station.cert_file,
                               station_key=factory.station.key_file, ca_pem=factory.ca_pem,
                               csr_der=csr)
    verify_device_chain(cert, [factory.manufacturer.ca.cert])
    assert device_identity(cert) == ("0a1b2c3d", DEVICE_URN_PREFIX + "0a1b2c3d")
    assert public_key_der(cert.public_key()) == public_key_der(key.public_key())
    # the subject is the service's, not the CSR's (CN=device is gone)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "0a1b2c3d"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 365 * 20
    [rec] = factory.service.issued.records()
    assert rec["serial"] == "0a1b2c3d" and rec["station"] == "line-1"
    assert rec["cert_serial"] == format(cert.serial_number, "x")

    # cacerts: the manufacturer CA; csrattrs: our key type and the serialNumber we need
    status, body = await factory.call("GET", EST + "/cacerts")
    assert status == 200
    assert codec.parse_certs_only(codec.decode_body(body.encode())) == [factory.manufacturer.ca.cert]
    status, body = await factory.call("GET", "/.well-known/est/csrattrs")   # the unlabeled path
    oids = [a.oid for a in codec.decode_csr_attrs(codec.decode_body(body.encode()))]
    assert status == 200 and NameOID.SERIAL_NUMBER.dotted_string in oids
    assert codec.OID_EC_PUBLIC_KEY in oids


async def test_upper_case_serial_is_the_same_serial(factory):
    status, _ = await factory.enroll(device_csr("ABCDEF01")[0])
    assert status == 200
    status, text = await factory.enroll(device_csr("abcdef01")[0])
    assert status == 409 and "abcdef01" in text


async def test_device_made_with_the_factory_est_onboards_end_to_end(factory, fleet):
    assert fleet.manufacturer.dir == factory.manufacturer.dir     # one manufacturer, one CA
    via = idevid_via_est(factory.url, station_cert=factory.station.cert_file,
                         station_key=factory.station.key_file, ca_pem=factory.ca_pem)
    dev = await make_via(fleet, via)
    # the key never left the device directory; the certificate came from the EST service
    key = load_private_key(dev.device_dir / "idevid.key")
    idevid = load_cert(dev.device_dir / "idevid.pem")
    assert stat.S_IMODE(os.stat(dev.device_dir / "idevid.key").st_mode) == 0o600
    assert public_key_der(idevid.public_key()) == public_key_der(key.public_key())
    assert factory.service.issued.get(dev.serial)["cert_serial"] == format(idevid.serial_number, "x")

    core = fleet.core(dev)
    await fleet.onboard(core)
    assert core.state is DeviceState.ONBOARDED
    assert (await fleet.store.inventory.get(dev.serial)).state is InventoryState.ONBOARDED


async def test_in_memory_idevid_via_and_default_unchanged(factory, fleet):
    """idevid_via can be any callable (here the service, no sockets); without it, nothing changes."""
    dev = await make_via(fleet, lambda csr: factory.service.issue(csr, (station_der(factory),)))
    core = fleet.core(dev)
    await fleet.onboard(core)
    assert core.state is DeviceState.ONBOARDED
    plain = await fleet.make()
    assert factory.service.issued.get(plain.serial) is None     # in-process CA, as before
    assert [r["serial"] for r in factory.service.issued.records()] == [dev.serial]


async def test_a_refused_idevid_leaves_no_half_made_device(factory, fleet):
    other, _ = device_csr("12345678")
    status, _ = await factory.enroll(other)
    assert status == 200
    devices = fleet.tmp / "factory" / "devices"

    def wrong_key(csr):         # certifies another key: make_device must notice
        return factory.service.issue(device_csr("87654321")[0], (station_der(factory),))
    with pytest.raises(ValueError, match="another key"):
        await asyncio.to_thread(fleet.manufacturer.make_device, fleet.tmp / "factory", fleet.info,
                                idevid_via=wrong_key)
    assert not devices.exists() or not any(devices.iterdir())


def test_issued_record_is_shared_and_survives_a_torn_line(tmp_path):
    path = tmp_path / ISSUED_FILE
    a, b = IssuedSerials(path), IssuedSerials(path)    # two processes on one directory
    a.record("00000001", lambda: (None, {"serial": "00000001", "cert_serial": "1", "station": "s",
                                         "issued_at": 0}))
    with pytest.raises(Conflict) as err:
        b.record("00000001", lambda: pytest.fail("must not issue twice"))
    assert err.value.status == 409 and "00000001" in err.value.message
    with open(path, "ab") as fh:            # power loss in the middle of an append
        fh.write(b'{"serial": "00000002", "cert')
    b.record("00000003", lambda: (None, {"serial": "00000003", "cert_serial": "3", "station": "s",
                                         "issued_at": 0}))
    lines = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert [r["serial"] for r in lines] == ["00000001", "00000003"]
    assert IssuedSerials(path).get("00000002") is None


def test_stations_need_a_ca_of_their_own(factory):
    m = factory.manufacturer
    with pytest.raises(ValueError, match="CA of their own"):
        FactoryEstService(m, provisioning_ca=m.ca)
    assert provisioning_ca(m).cert == factory.service.provisioning_ca.cert   # made once, reloaded
    assert stat.S_IMODE(os.stat(m.dir / "provisioning-ca.key").st_mode) == 0o600
