"""EstService in memory: the three stages, policy refusals, revocation, approval, serverkeygen."""
from __future__ import annotations

import base64
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID

from zerotouch.pki.ca import DEVICE_URN_PREFIX
from zerotouch.protocol.errors import ProtocolError
from zerotouch.protocol.states import InventoryState
from zerotouch.services.est import (EnrollmentPending, EnrollmentPolicy, EstPolicy, hash_password)

from est_harness import ident, make_csr, make_env


def load(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


def lifetime_days(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / 86400


async def refused(coro, status: int, *words: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        await coro
    exc = info.value
    assert exc.status == status, (exc.status, exc.message)
    for w in words:
        assert w.lower() in exc.message.lower(), exc.message
    return exc


def subject_of(serial: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial),
                      x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])


# --- the three stages -------------------------------------------------------------------------
@pytest.mark.parametrize("label", ["", "ldevid"])
async def test_idevid_gets_ldevid_named_from_records(env, label):
    dev, idevid, _ = await env.device()
    csr, key = make_csr(subject="evil.example", extensions=[
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:dev:zerotouch:someone")])])
    cert = load(await env.est.enroll("simpleenroll", label, csr, ident(idevid)))
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == dev.serial
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [dev.urn]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert 29.9 < lifetime_days(cert) < 30.1
    [rec] = await env.certs_of(dev.serial)
    assert rec.kind == "ldevid" and rec.der == cert.public_bytes(serialization.Encoding.DER)


async def test_ldevid_gets_short_lived_operational(env):
    dev, idevid, _ = await env.device()
    ldevid, lkey = await env.ldevid(idevid)
    csr, _ = make_csr()
    cert = load(await env.est.enroll("simpleenroll", "operational", csr, ident(ldevid)))
    assert 0.9 < lifetime_days(cert) < 1.1
    kinds = sorted(r.kind for r in await env.certs_of(dev.serial))
    assert kinds == ["ldevid", "operational"]


async def test_validity_comes_from_policy(fleet):
    env = make_env(fleet, EstPolicy.from_config(
        {"default": {"ldevid_days": 7, "operational_days": 0.25}}))
    _dev, idevid, _ = await env.device()
    ldevid, _ = await env.ldevid(idevid)
    assert 6.9 < lifetime_days(load(ldevid)) < 7.1
    op = await env.est.enroll("simpleenroll", "operational", make_csr()[0], ident(ldevid))
    assert 0.2 < lifetime_days(load(op)) < 0.3


async def test_each_stage_needs_its_own_credential(env):
    dev, idevid, _ = await env.device()
    ldevid, _ = await env.ldevid(idevid)
    op = await env.est.enroll("simpleenroll", "operational", make_csr()[0], ident(ldevid))
    csr = make_csr()[0]
    await refused(env.est.enroll("simpleenroll", "operational", csr, ident(idevid)), 403, "ldevid")
    await refused(env.est.enroll("simpleenroll", "ldevid", csr, ident(ldevid)), 403, "idevid")
    await refused(env.est.enroll("simpleenroll", "operational", csr, ident(op)), 403)
    await refused(env.est.enroll("simplereenroll", "", csr, ident(idevid)), 403, "renewed")
    await refused(env.est.enroll("simpleenroll", "nope", csr, ident(idevid)), 404, "label")
    await refused(env.est.enroll("simpleenroll", "", csr, ident()), 403, "client certificate")
    assert len(await env.certs_of(dev.serial)) == 2


async def test_reenroll_keeps_kind_and_needs_same_subject(env):
    dev, idevid, _ = await env.device()
    ldevid, lkey = await env.ldevid(idevid)
    op = await env.est.enroll("simpleenroll", "operational", make_csr()[0], ident(ldevid))
    same = subject_of(dev.serial)
    # renewal with the same key, and rekey with a new one
    renewed = load(await env.est.enroll("simplereenroll", "", make_csr(lkey, subject=same)[0],
                                        ident(ldevid)))
    assert 29 < lifetime_days(renewed) < 31 and renewed.subject == load(ldevid).subject
    op2 = load(await env.est.enroll("simplereenroll", "operational", make_csr(subject=same)[0],
                                    ident(op)))
    assert lifetime_days(op2) < 1.1
    before = len(await env.certs_of(dev.serial))
    await refused(env.est.enroll("simplereenroll", "", make_csr(subject="x")[0], ident(ldevid)),
                  400, "subject")
    other_san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(DEVICE_URN_PREFIX + "x")])
    await refused(env.est.enroll("simplereenroll", "", make_csr(subject=same, extensions=[other_san])[0],
                                 ident(ldevid)), 400, "subjectAltName")
    await refused(env.est.enroll("simplereenroll", "operational", make_csr(subject=same)[0],
                                 ident(ldevid)), 403, "label")
    assert len(await env.certs_of(dev.serial)) == before


# --- policy -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make_key,words", [
    (lambda: rsa.generate_private_key(65537, 1024), ["RSA of 1024 bits", "RSA >= 2048"]),
    (lambda: ec.generate_private_key(ec.SECP521R1()), ["secp521r1", "P-256"]),
    (ed25519.Ed25519PrivateKey.generate, ["Ed25519", "allowed"]),
])
async def test_policy_refuses_key_types_and_stores_nothing(env, make_key, words):
    dev, idevid, _ = await env.device()
    csr, _ = make_csr(make_key())
    exc = await refused(env.est.enroll("simpleenroll", "", csr, ident(idevid)), 400, *words)
    assert exc.code == "policy"
    assert await env.certs_of(dev.serial) == []


async def test_bad_csr_signature_and_garbage_refused(env):
    dev, idevid, _ = await env.device()
    csr, _ = make_csr()
    broken = bytearray(csr)
    broken[-5] ^= 0x01                      # inside the signature
    await refused(env.est.enroll("simpleenroll", "", bytes(broken), ident(idevid)), 400,
                  "proof of possession")
    await refused(env.est.enroll("simpleenroll", "", b"\x30\x03\x02\x01\x00", ident(idevid)), 400,
                  "PKCS#10")
    server_eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    await refused(env.est.enroll("simpleenroll", "", make_csr(extensions=[server_eku])[0],
                                 ident(idevid)), 400, "clientAuth")
    assert await env.certs_of(dev.serial) == []


async def test_per_device_policy_and_rsa_2048(fleet):
    env = make_env(fleet)
    dev, idevid, _ = await env.device()
    rsa_csr, _ = make_csr(rsa.generate_private_key(65537, 2048))
    assert await env.est.enroll("simpleenroll", "", rsa_csr, ident(idevid))
    env.policy.devices[dev.serial] = EnrollmentPolicy.from_dict({"key_types": ["P-384"]})
    await refused(env.est.enroll("simpleenroll", "", make_csr()[0], ident(idevid)), 400,
                  "secp256r1", "allowed: P-384")
    p384, _ = make_csr(ec.generate_private_key(ec.SECP384R1()))
    assert await env.est.enroll("simpleenroll", "", p384, ident(idevid))


@pytest.mark.parametrize("bad", [{"default": {"rsa_min_bits": 1024}},
                                 {"default": {"key_types": ["Ed25519"]}},
                                 {"default": {"ldevid_days": 0}}, {"defaults": {}},
                                 {"default": {"eku": ["serverAuth"]}},
                                 {"basic": {"u": {"device": "d", "password": "plain"}}},
                                 {"basic": {"u": {"password": "scrypt$1"}}}])
def test_policy_config_is_strict(bad):
    with pytest.raises(ValueError):
        EstPolicy.from_config(bad)


# --- who may enroll ---------------------------------------------------------------------------
async def test_revoked_and_expired_certificates_refused(env, fleet):
    dev, idevid, _ = await env.device()
    ldevid, _ = await env.ldevid(idevid)
    serial = format(load(ldevid).serial_number, "x")
    assert await env.store.certs.revoke(serial, time.time(), "keyCompromise")
    csr = make_csr(subject=subject_of(dev.serial))[0]
    await refused(env.est.enroll("simpleenroll", "operational", csr, ident(ldevid)), 403, "revoked")
    await refused(env.est.enroll("simplereenroll", "", csr, ident(ldevid)), 403, "revoked")
    fresh, _ = await env.ldevid(idevid)
    later = make_env(fleet, clock=lambda: time.time() + 31 * 86400)
    await refused(later.est.enroll("simplereenroll", "", csr, ident(fresh)), 403, "not trusted")


async def test_device_must_be_in_inventory_and_not_revoked(env):
    _dev, stranger, _ = await env.device(inventory=False)
    await refused(env.est.enroll("simpleenroll", "", make_csr()[0], ident(stranger)), 403,
                  "inventory")
    dev, idevid, _ = await env.device()
    await env.store.inventory.update(dev.serial, state=InventoryState.REVOKED)
    await refused(env.est.enroll("simpleenroll", "", make_csr()[0], ident(idevid)), 403, "revoked")


async def test_foreign_certificates_refused(env, fleet):
    from zerotouch.pki.ca import CertificateAuthority, make_root
    from zerotouch.pki.keys import cert_der, generate_p256
    k = generate_p256()
    rogue = CertificateAuthority(k, make_root(k, "rogue manufacturer"))
    dev, _idevid, _ = await env.device()
    fake = rogue.issue_device(generate_p256().public_key(), serial=dev.serial, urn=dev.urn)
    await refused(env.est.enroll("simpleenroll", "", make_csr()[0], ident(cert_der(fake))), 403,
                  "not trusted")
    # an owner-CA certificate that is no device certificate (e.g. a server's) is refused too
    from zerotouch.services.vault import load_owner_ca
    owner = load_owner_ca(fleet.tmp / "vault")
    server = owner.issue_device(generate_p256().public_key(), serial=dev.serial, urn=dev.urn)
    await refused(env.est.enroll("simplereenroll", "", make_csr()[0], ident(cert_der(server))), 403,
                  "not a device certificate")


async def test_basic_auth(fleet):
    dev = await fleet.make()
    env = make_env(fleet, EstPolicy.from_config({"basic": {
        "boot-1": {"device": dev.serial, "password": hash_password("s3cret")}}}))
    cert = load(await env.est.enroll("simpleenroll", "", make_csr()[0],
                                     ident(username="boot-1", password="s3cret")))
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == dev.serial
    for user, pw in (("boot-1", "wrong"), ("nobody", "s3cret")):
        exc = await refused(env.est.enroll("simpleenroll", "", make_csr()[0],
                                           ident(username=user, password=pw)), 401, "password")
        assert exc.code == "unauthenticated"
    await refused(env.est.enroll("simpleenroll", "", make_csr()[0], ident()), 401, "Basic")
    await refused(env.est.enroll("simpleenroll", "operational", make_csr()[0],
                                 ident(username="boot-1", password="s3cret")), 403)


async def test_tls_unique_links_csr_to_connection(env):
    _dev, idevid, _ = await env.device()
    binding = bytes(range(12))
    good = make_csr(attrs={AttributeOID.CHALLENGE_PASSWORD: base64.b64encode(binding)})[0]
    assert await env.est.enroll("simpleenroll", "", good, ident(idevid, tls_unique=binding))
    bad = make_csr(attrs={AttributeOID.CHALLENGE_PASSWORD: base64.b64encode(b"x" * 12)})[0]
    await refused(env.est.enroll("simpleenroll", "", bad, ident(idevid, tls_unique=binding)), 403,
                  "tls-unique")
    # no tls-unique (TLS 1.3): the attribute cannot be checked and the identity stands in
    assert await env.est.enroll("simpleenroll", "", bad, ident(idevid))


# --- manual approval --------------------------------------------------------------------------
async def test_approval_issues_exactly_once(fleet):
    env = make_env(fleet, EstPolicy.from_config({"default": {"manual_approval": True},
                                                 "retry_after": 30}))
    dev, idevid, _ = await env.device()
    csr, _ = make_csr()
    with pytest.raises(EnrollmentPending) as info:
        await env.est.enroll("simpleenroll", "", csr, ident(idevid))
    assert info.value.status == 202 and info.value.retry_after == 30
    [req] = await env.est.pending()
    assert req.device_serial == dev.serial and req.label == "ldevid" and req.csr_der == csr
    with pytest.raises(EnrollmentPending):
        await env.est.enroll("simpleenroll", "", csr, ident(idevid))
    assert await env.certs_of(dev.serial) == []
    assert (await env.est.approve(req.id)).state == "approved"
    await refused(env.est.approve(req.id), 409, "approved")
    first = await env.est.enroll("simpleenroll", "", csr, ident(idevid))
    again = await env.est.enroll("simpleenroll", "", csr, ident(idevid))
    assert first == again and len(await env.certs_of(dev.serial)) == 1
    rec = await env.store.enroll_requests.get(req.id)
    assert rec.state == "issued" and rec.cert_serial == format(load(first).serial_number, "x")
    assert await env.est.pending() == []


async def test_rejected_request_gets_403(fleet):
    env = make_env(fleet, EstPolicy.from_config({"default": {"manual_approval": True}}))
    dev, idevid, _ = await env.device()
    csr, _ = make_csr()
    with pytest.raises(EnrollmentPending):
        await env.est.enroll("simpleenroll", "", csr, ident(idevid))
    [req] = await env.est.pending()
    await env.est.reject(req.id)
    await refused(env.est.enroll("simpleenroll", "", csr, ident(idevid)), 403, "rejected")
    await refused(env.est.approve(req.id), 409, "rejected")
    await refused(env.est.reject("00" * 32), 404)
    assert await env.certs_of(dev.serial) == []


# --- serverkeygen and the rest ----------------------------------------------------------------
async def test_serverkeygen_key_matches_certificate(env):
    dev, idevid, _ = await env.device()
    pkcs8, der = await env.est.serverkeygen("", make_csr()[0], ident(idevid))
    key = serialization.load_der_private_key(pkcs8, password=None)
    cert = load(der)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == dev.serial
    env.policy.devices[dev.serial] = EnrollmentPolicy(key_types=("RSA",))
    await refused(env.est.serverkeygen("", make_csr()[0], ident(idevid)), 400, "P-256")


async def test_cacerts_and_csrattrs(env, fleet):
    from zerotouch.protocol import est as codec
    [ca] = codec.parse_certs_only(await env.est.cacerts())
    assert ca.public_key().public_numbers() == \
        fleet.vault._ca.cert.public_key().public_numbers()
    attrs = codec.decode_csr_attrs(await env.est.csrattrs(""))
    assert attrs == [codec.CsrAttr(codec.OID_EC_PUBLIC_KEY, (codec.oid_value(codec.CURVE_OIDS["secp256r1"]),)),
                     codec.CsrAttr(codec.SIGNATURE_OIDS["ecdsa-with-SHA256"])]
    dev, idevid, _ = await env.device()
    env.policy.devices[dev.serial] = EnrollmentPolicy(key_types=("P-384",))
    mine = codec.decode_csr_attrs(await env.est.csrattrs("operational", ident(idevid)))
    assert mine[0].values == (codec.oid_value(codec.CURVE_OIDS["secp384r1"]),)
    await refused(env.est.csrattrs("other"), 404)
