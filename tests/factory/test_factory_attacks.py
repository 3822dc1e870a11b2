"""Who may not get an IDevID, and which CSRs are refused — each refusal records nothing."""
from __future__ import annotations

import datetime as dt
import time

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from zerotouch.pki.ca import DEVICE_URN_PREFIX, CertificateAuthority, make_root
from zerotouch.pki.keys import generate_p256, load_cert, save_cert, save_private_key
from zerotouch.protocol import est as codec
from zerotouch.protocol.errors import ProtocolError
from zerotouch.services.est import ClientIdentity
from zerotouch.services.factory_est import FactoryEstService, issue_station

from factory_harness import EST, device_csr


def foreign_station(tmp, name="rogue") -> tuple:
    """A station-shaped credential from a CA that is not the manufacturer's provisioning CA."""
    key = generate_p256()
    ca = CertificateAuthority(key, make_root(key, "someone else's CA"))
    leaf_key = generate_p256()
    cert = ca.issue_server(leaf_key.public_key(), common_name=name, hosts=["127.0.0.1"])
    save_cert(tmp / f"{name}.pem", cert)
    save_private_key(tmp / f"{name}.key", leaf_key)
    return tmp / f"{name}.pem", tmp / f"{name}.key", cert


def idevid_files(factory, tmp, serial="5eed5eed"):
    """A genuine IDevID from this manufacturer's CA, with its key."""
    key = generate_p256()
    cert = factory.manufacturer.ca.issue_device(key.public_key(), serial=serial,
                                                urn=DEVICE_URN_PREFIX + serial)
    save_cert(tmp / "idevid.pem", cert)
    save_private_key(tmp / "idevid.key", key)
    return tmp / "idevid.pem", tmp / "idevid.key", cert


async def assert_tls_refused(factory, **kw):
    with pytest.raises((aiohttp.ClientError, ConnectionError)):
        await factory.enroll(device_csr("0badc0de")[0], **kw)
    assert factory.service.issued.records() == []


# --- TLS: no handshake without a provisioning-CA certificate -----------------------------------
async def test_no_client_certificate_is_refused_by_tls(factory):
    await assert_tls_refused(factory, station=False)


async def test_a_certificate_from_another_ca_is_refused_by_tls(factory, tmp_path):
    cert, key, _ = foreign_station(tmp_path)
    await assert_tls_refused(factory, cert=cert, key=key)


async def test_an_idevid_as_station_is_refused_by_tls(factory, tmp_path):
    cert, key, _ = idevid_files(factory, tmp_path)
    await assert_tls_refused(factory, cert=cert, key=key)


# --- the service itself (behind any TLS set-up) ------------------------------------------------
async def refused(service, chain, csr=None) -> ProtocolError:
    csr = csr or device_csr("0badc0de")[0]
    with pytest.raises(ProtocolError) as err:
        await service.enroll("simpleenroll", "idevid", csr, ClientIdentity(chain=chain))
    assert service.issued.records() == []
    return err.value


async def test_service_refuses_without_a_station(factory, fleet, tmp_path):
    svc = factory.service
    err = await refused(svc, ())
    assert (err.status, err.code) == (403, "unauthenticated")
    err = await refused(svc, (foreign_station(tmp_path)[2].public_bytes(Encoding.DER),))
    assert (err.status, err.code) == (403, "unknown_station")
    # a device certificate, even one this manufacturer issued, is never a station
    err = await refused(svc, (idevid_files(factory, tmp_path)[2].public_bytes(Encoding.DER),))
    assert (err.status, err.code) == (403, "not_a_station") and "device certificate" in err.message
    dev = await fleet.make()
    core = fleet.core(dev)
    await fleet.onboard(core)
    err = await refused(svc, (core.result.ldevid_der,))          # an LDevID from the owner CA
    assert (err.status, err.code) == (403, "not_a_station")
    err = await refused(svc, (b"\x30\x03garbage",))
    assert err.status == 400


async def test_an_expired_station_is_refused(factory, tmp_path):
    cred = issue_station(factory.manufacturer, "old-line", tmp_path / "old", days=1)
    later = FactoryEstService(factory.manufacturer, provisioning_ca=factory.service.provisioning_ca,
                              clock=lambda: time.time() + 2 * 86400)
    err = await refused(later, (load_cert(cred.cert_file).public_bytes(Encoding.DER),))
    assert (err.status, err.code) == (403, "unknown_station")


def test_station_names_are_checked(factory, tmp_path):
    for bad in ("", "a/b", "../x", "x" * 65):
        with pytest.raises(ValueError):
            issue_station(factory.manufacturer, bad, tmp_path / "s")


# --- over HTTP: serials and CSRs ---------------------------------------------------------------
async def test_duplicate_serial_is_409_and_the_first_stays(factory):
    status, first = await factory.enroll(device_csr("c0ffee00")[0])
    assert status == 200
    [rec] = factory.service.issued.records()
    status, text = await factory.enroll(device_csr("c0ffee00")[0])
    assert status == 409 and "c0ffee00 already has an IDevID" in text and "line-1" in text
    assert factory.service.issued.records() == [rec]
    cert = codec.parse_certs_only(codec.decode_body(first.encode()))[0]
    assert rec["cert_serial"] == format(cert.serial_number, "x")


def weak_rsa_csr() -> bytes:
    return device_csr("0badc0de", rsa.generate_private_key(65537, 1024))[0]


def bad_signature_csr() -> bytes:
    der = bytearray(device_csr("0badc0de")[0])
    der[-5] ^= 0x01                          # inside the signature
    return bytes(der)


@pytest.mark.parametrize("csr, status, words", [
    (lambda: device_csr("00000000")[0], 400, "reserved"),
    (lambda: device_csr(None)[0], 400, "serialNumber"),
    (lambda: device_csr("0badc0d")[0], 400, "8 hex digits"),
    (lambda: device_csr("0badc0dz")[0], 400, "8 hex digits"),
    (lambda: device_csr("0badc0de0")[0], 400, "8 hex digits"),
    (lambda: b"\x30\x82\x01\x00not a csr", 400, "PKCS#10"),
    (bad_signature_csr, 400, "signature"),
    (weak_rsa_csr, 400, "RSA of 1024 bits"),
    (lambda: device_csr("0badc0de", extensions=[x509.BasicConstraints(ca=True, path_length=None)])[0],
     400, "CA certificate"),
    (lambda: device_csr("0badc0de", san=DEVICE_URN_PREFIX + "11111111")[0], 400, "subjectAltName"),
], ids=["zero", "missing", "short", "not-hex", "long", "not-der", "bad-sig", "rsa-1024", "ca",
        "other-urn"])
async def test_bad_csr_is_refused_and_nothing_recorded(factory, csr, status, words):
    got, text = await factory.enroll(csr())
    assert (got, words in text) == (status, True), text
    assert factory.service.issued.records() == []


async def test_body_operation_and_label_errors(factory):
    csr = device_csr("0badc0de")[0]
    cases = [
        (await factory.call("POST", EST + "/simpleenroll", body=csr, ctype=codec.PKCS10), 400, "base64"),
        (await factory.call("POST", EST + "/simpleenroll", body=codec.encode_body(csr),
                            ctype="application/json"), 415, "pkcs10"),
        (await factory.enroll(csr, EST + "/simplereenroll"), 404, "never renewed"),
        (await factory.enroll(csr, EST + "/serverkeygen"), 404, "made on the device"),
        (await factory.enroll(csr, codec.WELL_KNOWN + "/ldevid/simpleenroll"), 404, "idevid"),
        (await factory.call("GET", EST + "/simpleenroll"), 405, "POST"),
        (await factory.call("GET", EST + "/fullcmc"), 404, "offered"),
    ]
    for (got, text), status, words in cases:
        assert got == status and words in text, (got, text)
    assert factory.service.issued.records() == []
    # and the well-formed request still works afterwards
    assert (await factory.enroll(csr))[0] == 200


def test_station_certificate_is_a_client_certificate(factory):
    cert = load_cert(factory.station.cert_file)
    assert cert.issuer == factory.service.provisioning_ca.cert.subject
    assert cert.issuer != factory.manufacturer.ca.cert.subject
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) < dt.timedelta(days=731)
