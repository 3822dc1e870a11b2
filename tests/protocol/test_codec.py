"""The strict codec and COSE_Sign1: every bad input is a ProtocolError with a 4xx status.

Ends with a seeded fuzz loop over the two parsers that face the network first on each side:
`verify_device_signed` (servers) and `DeviceOnboarding.receive_redirect` (device).
"""
from __future__ import annotations

import datetime as dt
import random
import time
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from zerotouch.identity.software import SoftwareIdentity
from zerotouch.pki.ca import DEVICE_URN_PREFIX
from zerotouch.pki.keys import cert_der, generate_p256, save_cert, save_private_key
from zerotouch.protocol import cose
from zerotouch.protocol.codec import MAX_MESSAGE, TYPE_KEY, loads_bounded
from zerotouch.protocol.device import DeviceOnboarding
from zerotouch.protocol.errors import (BadSignature, MalformedMessage, MessageTooLarge,
                                       NotAuthorized, ProtocolError)
from zerotouch.protocol.messages import Bundle, Challenge, FindOwner, Hello, Redirect
from zerotouch.protocol.states import DeviceState
from zerotouch.protocol.verify import verify_device_signed
from zerotouch.services.manufacturer import Manufacturer

NONCE = bytes(range(16))


def assert_4xx(exc: BaseException) -> None:
    assert isinstance(exc, ProtocolError), f"{type(exc).__name__}: {exc}"
    assert 400 <= exc.status < 500, f"{type(exc).__name__} has status {exc.status}"


def hello_map(override: dict | None = None) -> dict:
    m = Hello(serial="0a1b2c3d", nonce=NONCE, time=1_700_000_000).to_map()
    m.update(override or {})
    return m


# --- messages --------------------------------------------------------------------------------
def test_valid_message_round_trips_canonically():
    msg = Hello(serial="0a1b2c3d", nonce=NONCE, time=1_700_000_000)
    data = msg.encode()
    assert Hello.decode(data) == msg
    assert data == cbor2.dumps(cbor2.loads(data), canonical=True)
    bundle = Bundle(serial="s", terminus_host="h", terminus_port=8883, owner_ca=b"x",
                    topic_prefix="devices/s", settings={"a": 1, "b": "x", "c": True}, issued=1)
    assert Bundle.decode(bundle.encode()) == bundle


BAD_MAPS = {
    "unknown_field": hello_map({99: b"x"}),
    "missing_field": {k: v for k, v in hello_map().items() if k != 3},
    "serial_is_bytes": hello_map({1: b"0a1b2c3d"}),
    "nonce_is_text": hello_map({2: "0" * 16}),
    "time_is_text": hello_map({3: "1700000000"}),
    "time_is_bool": hello_map({3: True}),
    "time_is_float": hello_map({3: 1.7e9}),
    "time_is_null": hello_map({3: None}),
    "time_out_of_range": hello_map({3: 2**64}),
    "nonce_too_short": hello_map({2: NONCE[:15]}),
    "nonce_too_long": hello_map({2: NONCE + b"!"}),
    "serial_empty": hello_map({1: ""}),
    "serial_too_long": hello_map({1: "x" * 65}),
    "wrong_type": hello_map({TYPE_KEY: FindOwner.TYPE}),
    "no_type": {k: v for k, v in hello_map().items() if k != TYPE_KEY},
    "type_is_text": hello_map({TYPE_KEY: "3"}),
}


@pytest.mark.parametrize("name", BAD_MAPS)
def test_bad_message_maps_are_refused(name):
    with pytest.raises(MalformedMessage) as err:
        Hello.decode(cbor2.dumps(BAD_MAPS[name]))
    assert_4xx(err.value)


@pytest.mark.parametrize("data", [
    b"", b"\xff", b"\x1c", b"\x5f\x41",            # empty, break, reserved, unterminated
    b"\xa3\x00\x03\x01",                             # a map cut short
    cbor2.dumps([0, 3, "0a1b2c3d"]),                 # an array, not a map
    cbor2.dumps("hello"), cbor2.dumps(3),
    bytes(range(256)),
], ids=["empty", "break", "reserved", "unterminated", "truncated", "array", "text", "int", "junk"])
def test_not_a_message_is_refused(data):
    with pytest.raises(MalformedMessage) as err:
        Hello.decode(data)
    assert_4xx(err.value)


def test_trailing_bytes_are_refused():
    data = Hello(serial="0a1b2c3d", nonce=NONCE, time=1).encode()
    for tail in (b"\x00", b"\xf6", cbor2.dumps({})):
        with pytest.raises(MalformedMessage, match="trailing") as err:
            Hello.decode(data + tail)
        assert_4xx(err.value)


def test_oversized_message_is_refused_before_parsing():
    big = cbor2.dumps(hello_map({1: "x" * MAX_MESSAGE}))
    with pytest.raises(MessageTooLarge) as err:
        Hello.decode(big)
    assert err.value.status == 413
    with pytest.raises(MessageTooLarge):
        loads_bounded(b"\xff" * (MAX_MESSAGE + 1))        # not even looked at
    with pytest.raises(MessageTooLarge):
        Hello.decode(Hello(serial="0a1b2c3d", nonce=NONCE, time=1).encode(), max_size=10)


def test_non_bytes_input_is_refused():
    for data in ("text", None, 42, [1, 2]):
        with pytest.raises(MalformedMessage):
            Hello.decode(data)  # type: ignore[arg-type]


def test_map_field_accepts_only_text_to_scalars():
    base = Bundle(serial="s", terminus_host="h", terminus_port=1, owner_ca=b"x", topic_prefix="t",
                  settings={}, issued=1).to_map()
    for settings in ({"a": [1]}, {"a": {"b": 1}}, {1: "a"}, {"a": None}, ["a"]):
        with pytest.raises(MalformedMessage):
            Bundle.decode(cbor2.dumps({**base, 6: settings}))
    with pytest.raises(MalformedMessage):                      # more than 64 entries
        Bundle.decode(cbor2.dumps({**base, 6: {str(i): i for i in range(65)}}))


def test_building_a_bad_message_in_code_fails_too():
    with pytest.raises(MalformedMessage):
        Hello(serial="0a1b2c3d", nonce=b"short", time=1)
    with pytest.raises(MalformedMessage):
        Hello(serial="0a1b2c3d", nonce=NONCE, time="1")  # type: ignore[arg-type]


# Each decodes to a map Python finds equal to a valid message, but neither is the message the
# declarations describe (integer keys, integer TYPE): the codec should refuse them as it
# refuses unknown keys and wrongly typed values.
NON_INTEGER = {
    "type_is_bool": (FindOwner, FindOwner(serial="0a1b2c3d", nonce=NONCE, time=1).to_map()
                     | {TYPE_KEY: True}),                       # FindOwner.TYPE == 1 == True
    "type_is_float": (Hello, hello_map({TYPE_KEY: 3.0})),
    "key_is_float": (Hello, {(3.0 if k == 3 else k): v for k, v in hello_map().items()}),
}


@pytest.mark.parametrize("name", NON_INTEGER)
def test_non_integer_keys_and_type_are_refused(name):
    cls, m = NON_INTEGER[name]
    with pytest.raises(MalformedMessage):
        cls.decode(cbor2.dumps(m))


def test_duplicate_map_keys_are_refused():
    # {0: 3, 1: "0a1b2c3d", 1: "ffffffff", 2: h'..', 3: 1}
    data = (b"\xa5" + b"\x00\x03" + b"\x01\x680a1b2c3d" + b"\x01\x68ffffffff"
            + b"\x02\x50" + NONCE + b"\x03\x01")
    assert cbor2.loads(data)[1] == "ffffffff"
    with pytest.raises(MalformedMessage):
        Hello.decode(data)


# --- COSE_Sign1 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def key():
    return generate_p256()


def cose_parts(signed: bytes) -> list:
    obj = cbor2.loads(signed)
    assert isinstance(obj, cbor2.CBORTag) and obj.tag == cose.COSE_SIGN1_TAG
    return list(obj.value)


def rebuild(parts: list, tag: int | None = cose.COSE_SIGN1_TAG) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(tag, parts) if tag is not None else parts)


def parse_and_verify(data: bytes, public_key) -> bytes:
    return cose.parse_sign1(data, max_size=MAX_MESSAGE).verify(public_key)


def test_cose_sign1_round_trip_tagged_and_untagged(key):
    signed = cose.sign1(b"payload", cose.SoftwareSigner(key), kid=b"k1", x5chain=[b"c1", b"c2"])
    parsed = cose.parse_sign1(signed, max_size=MAX_MESSAGE)
    assert parsed.verify(key.public_key()) == b"payload"
    assert parsed.kid == b"k1" and parsed.x5chain == [b"c1", b"c2"]
    assert len(parsed.signature) == cose.ES256_SIG_LEN
    assert parse_and_verify(rebuild(cose_parts(signed), tag=None), key.public_key()) == b"payload"


def _tampered_payload(parts):
    parts[2] = parts[2][:-1] + bytes([parts[2][-1] ^ 1])


def _tampered_protected(parts):
    parts[0] = cbor2.dumps({cose.HDR_ALG: cose.ALG_ES256, cose.HDR_KID: b"evil"})


def _flipped_signature(parts):
    parts[3] = bytes([parts[3][0] ^ 1]) + parts[3][1:]


BAD_SIGNATURE = {
    "tampered_payload": _tampered_payload,
    "tampered_protected": _tampered_protected,
    "flipped_signature": _flipped_signature,
    "signature_63_bytes": lambda p: p.__setitem__(3, p[3][:63]),
    "signature_65_bytes": lambda p: p.__setitem__(3, p[3] + b"\0"),
    "signature_empty": lambda p: p.__setitem__(3, b""),
    "signature_der": lambda p: p.__setitem__(3, b"\x30\x06\x02\x01\x01\x02\x01\x01"),
    "signature_zero": lambda p: p.__setitem__(3, bytes(64)),
}


@pytest.mark.parametrize("name", BAD_SIGNATURE)
def test_cose_bad_signature_is_refused(key, name):
    parts = cose_parts(cose.sign1(b"payload", cose.SoftwareSigner(key)))
    BAD_SIGNATURE[name](parts)
    with pytest.raises(BadSignature) as err:
        parse_and_verify(rebuild(parts), key.public_key())
    assert_4xx(err.value)


def test_cose_wrong_key_wrong_curve_and_aad_are_refused(key):
    signed = cose.sign1(b"payload", cose.SoftwareSigner(key), external_aad=b"aad")
    parsed = cose.parse_sign1(signed, max_size=MAX_MESSAGE)
    assert parsed.verify(key.public_key(), external_aad=b"aad") == b"payload"
    for bad_key, aad in ((generate_p256().public_key(), b"aad"), (key.public_key(), b""),
                         (ec.generate_private_key(ec.SECP384R1()).public_key(), b"aad")):
        with pytest.raises(BadSignature) as err:
            parsed.verify(bad_key, external_aad=aad)
        assert_4xx(err.value)


MALFORMED_COSE = {
    "alg_es384": lambda p: p.__setitem__(0, cbor2.dumps({cose.HDR_ALG: -35})),
    "alg_eddsa": lambda p: p.__setitem__(0, cbor2.dumps({cose.HDR_ALG: -8})),
    "alg_as_text": lambda p: p.__setitem__(0, cbor2.dumps({cose.HDR_ALG: "ES256"})),
    "no_alg": lambda p: p.__setitem__(0, cbor2.dumps({})),
    "empty_protected": lambda p: p.__setitem__(0, b""),
    "protected_not_cbor": lambda p: p.__setitem__(0, b"\xff\xff"),
    "protected_not_a_map": lambda p: p.__setitem__(0, cbor2.dumps([1, -7])),
    "protected_is_map_not_bstr": lambda p: p.__setitem__(0, {cose.HDR_ALG: cose.ALG_ES256}),
    "unprotected_is_list": lambda p: p.__setitem__(1, []),
    "payload_is_text": lambda p: p.__setitem__(2, "payload"),
    "payload_detached": lambda p: p.__setitem__(2, None),
    "signature_is_text": lambda p: p.__setitem__(3, "sig"),
    "three_items": lambda p: p.pop(),
    "five_items": lambda p: p.append(b""),
}


@pytest.mark.parametrize("name", MALFORMED_COSE)
def test_cose_malformed_envelope_is_refused(key, name):
    parts = cose_parts(cose.sign1(b"payload", cose.SoftwareSigner(key)))
    MALFORMED_COSE[name](parts)
    with pytest.raises(MalformedMessage) as err:
        parse_and_verify(rebuild(parts), key.public_key())
    assert_4xx(err.value)


@pytest.mark.parametrize("data", [
    cbor2.dumps({"protected": b""}), cbor2.dumps(b"bytes"), cbor2.dumps(7),
    cbor2.dumps(cbor2.CBORTag(98, [b"", {}, b"", b""])),          # COSE_Sign, not COSE_Sign1
    cbor2.dumps(cbor2.CBORTag(cose.COSE_SIGN1_TAG, {"a": 1})),
    b"", b"\xd2", b"\xd2\x84",
], ids=["map", "bytes", "int", "wrong_tag", "tag_on_map", "empty", "tag_only", "array_cut"])
def test_cose_non_array_is_refused(key, data):
    with pytest.raises(MalformedMessage) as err:
        parse_and_verify(data, key.public_key())
    assert_4xx(err.value)


def test_cose_x5chain_header_must_be_certificates(key):
    for chain in (5, "cert", [b"a", 1], [b"c"] * 5):
        prot = cbor2.dumps({cose.HDR_ALG: cose.ALG_ES256, cose.HDR_X5CHAIN: chain})
        parsed = cose.Sign1(prot, cbor2.loads(prot), b"p", bytes(64))
        with pytest.raises(MalformedMessage):
            parsed.x5chain


def test_cose_oversized_is_too_large(key):
    signed = cose.sign1(b"x" * (MAX_MESSAGE + 10), cose.SoftwareSigner(key))
    with pytest.raises(MessageTooLarge) as err:
        cose.parse_sign1(signed, max_size=MAX_MESSAGE)
    assert err.value.status == 413


# --- device-signed messages and the fuzz loop ------------------------------------------------
# Everything here is deterministic (fixed keys, RFC 6979 signatures, fixed times, seeded
# mutations), so a fuzz finding reproduces on every run.
FIXED_NOW = 1_750_000_000                      # 2025-06-15, inside the certificates' validity
NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
NOT_AFTER = dt.datetime(2044, 1, 1, tzinfo=dt.timezone.utc)
DEVICE_SERIAL = "0a1b2c3d"
DEVICE_URN = f"{DEVICE_URN_PREFIX}{DEVICE_SERIAL}"


class DeterministicSigner(cose.SoftwareSigner):
    def __init__(self, key):
        super().__init__(key)
        self.key = key

    def sign_der(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def _fixed_key(n: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(n, ec.SECP256R1())


def _fixed_certs(ca_key, device_key) -> tuple[x509.Certificate, x509.Certificate]:
    """A manufacturer CA and an IDevID with the profile CertificateAuthority.issue_device uses."""
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz manufacturer CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1001)
          .not_valid_before(NOT_BEFORE).not_valid_after(NOT_AFTER)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256(), ecdsa_deterministic=True))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_SERIAL),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fuzz manufacturer"),
                         x509.NameAttribute(NameOID.SERIAL_NUMBER, DEVICE_SERIAL)])
    leaf = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
            .public_key(device_key.public_key()).serial_number(2002)
            .not_valid_before(NOT_BEFORE).not_valid_after(NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(device_key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(DEVICE_URN)]),
                           critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256(), ecdsa_deterministic=True))
    return ca, leaf


@dataclass
class Kit:
    anchors: list[x509.Certificate]
    device_dir: Path
    device_signer: DeterministicSigner
    idevid_der: bytes
    rv_signer: DeterministicSigner
    n_device: bytes = b"\x11" * 8
    serial: str = DEVICE_SERIAL
    urn: str = DEVICE_URN

    def hello_map(self) -> dict:
        return Hello(serial=self.serial, nonce=NONCE, time=FIXED_NOW).to_map()

    def signed_hello(self, m: dict | None = None, *, x5chain=None) -> bytes:
        payload = cbor2.dumps(m if m is not None else self.hello_map(), canonical=True)
        return cose.sign1(payload, self.device_signer,
                          x5chain=x5chain if x5chain is not None else [self.idevid_der])

    def core(self) -> DeviceOnboarding:
        """A device core waiting for the redirect to a request with nonce NONCE."""
        core = DeviceOnboarding(serial=self.serial, urn=self.urn,
                                rendezvous_key=self.rv_signer.public_key(), n_device=self.n_device,
                                identity=SoftwareIdentity(self.device_dir), clock=lambda: FIXED_NOW,
                                rng=lambda n: NONCE[:n])
        core.find_owner_request()
        return core

    def redirect_map(self) -> dict:
        return Redirect(serial=self.serial, nonce=NONCE, gateway_url="https://gw.example:8444",
                        owner_fp=bytes(32), issued=FIXED_NOW, expires=FIXED_NOW + 300).to_map()

    def signed_redirect(self, m: dict | None = None) -> bytes:
        payload = cbor2.dumps(m if m is not None else self.redirect_map(), canonical=True)
        return cose.sign1(payload, self.rv_signer)


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Kit:
    ca_key, device_key, rv_key = _fixed_key(0xC0FFEE), _fixed_key(0xDEC1CE), _fixed_key(0x5EED)
    ca, idevid = _fixed_certs(ca_key, device_key)
    device_dir = tmp_path_factory.mktemp("fuzz-device")
    save_private_key(device_dir / "idevid.key", device_key)
    save_cert(device_dir / "idevid.pem", idevid)
    return Kit(anchors=[ca], device_dir=device_dir, device_signer=DeterministicSigner(device_key),
               idevid_der=cert_der(idevid), rv_signer=DeterministicSigner(rv_key))


def test_kit_is_deterministic(kit):
    assert kit.signed_hello() == kit.signed_hello()
    assert kit.signed_redirect() == kit.signed_redirect()


def test_verify_device_signed_accepts_a_valid_hello(kit):
    msg, cert = verify_device_signed(kit.signed_hello(), Hello, kit.anchors, FIXED_NOW)
    assert msg.serial == kit.serial and msg.nonce == NONCE
    assert cert_der(cert) == kit.idevid_der


def test_verify_device_signed_refusals(kit, tmp_path):
    cases = [
        (BadSignature, kit.signed_hello(x5chain=[])),                       # no certificate
        (MalformedMessage, kit.signed_hello(x5chain=[b"not a certificate"])),
        (NotAuthorized, kit.signed_hello(                                   # names another device
            Hello(serial="ffffffff", nonce=NONCE, time=FIXED_NOW).to_map())),
        (BadSignature, cose.sign1(cbor2.dumps(kit.hello_map()),
                                  cose.SoftwareSigner(generate_p256()),
                                  x5chain=[kit.idevid_der])),                # another key
        (MalformedMessage, kit.signed_hello(                                # wrong TYPE
            FindOwner(serial=kit.serial, nonce=NONCE, time=FIXED_NOW).to_map())),
    ]
    for exc, data in cases:
        with pytest.raises(exc) as err:
            verify_device_signed(data, Hello, kit.anchors, FIXED_NOW)
        assert_4xx(err.value)
    other_ca = Manufacturer(tmp_path / "other-mfr").ca.cert
    for anchors, now in (([other_ca], FIXED_NOW), ([], FIXED_NOW),        # untrusted / none
                         (kit.anchors, NOT_BEFORE.timestamp() - 86400),      # not yet valid
                         (kit.anchors, NOT_AFTER.timestamp() + 86400)):      # expired
        with pytest.raises(NotAuthorized):
            verify_device_signed(kit.signed_hello(), Hello, anchors, now)


def test_receive_redirect_accepts_valid_and_refuses_wrong_state(kit):
    core = kit.core()
    assert core.receive_redirect(kit.signed_redirect()).gateway_url == "https://gw.example:8444"
    assert core.state is DeviceState.REDIRECTED
    with pytest.raises(MalformedMessage):
        core.receive_redirect(kit.signed_redirect())


def _corrupt_version(der: bytes) -> bytes:
    """X.509 version field `[0] INTEGER 2` (v3) → 5, which no X.509 version has."""
    at = der.index(b"\xa0\x03\x02\x01\x02")
    return der[:at] + b"\xa0\x03\x02\x01\x05" + der[at + 5:]


def _corrupt_subject(der: bytes) -> bytes:
    """serialNumber attribute (PrintableString) with a character PrintableString forbids."""
    marker = b"\x06\x03\x55\x04\x05\x13\x08"
    at = der.index(marker) + len(marker)
    return der[:at] + b"*" + der[at + 1:]


def test_certificate_with_unknown_version_is_malformed_at_the_server(kit):
    data = kit.signed_hello(x5chain=[_corrupt_version(kit.idevid_der)])
    with pytest.raises(MalformedMessage):
        verify_device_signed(data, Hello, kit.anchors, FIXED_NOW)


def test_certificate_with_unparsable_subject_is_refused_at_the_server(kit):
    corrupt = _corrupt_subject(kit.idevid_der)
    with pytest.raises(ProtocolError) as err:
        verify_device_signed(kit.signed_hello(x5chain=[corrupt]), Hello, kit.anchors, FIXED_NOW)
    assert_4xx(err.value)


def test_device_refuses_owner_certificate_with_unknown_version(kit):
    core = kit.core()
    core.receive_redirect(kit.signed_redirect())
    hello = Hello.decode(cose.parse_sign1(core.hello_request(), max_size=MAX_MESSAGE).payload)
    challenge = Challenge(session=bytes(16), nonce=hello.nonce, challenge=bytes(16),
                          owner_proof=bytes(32), expires=FIXED_NOW + 60)
    data = cose.sign1(challenge.encode(), kit.rv_signer, x5chain=[_corrupt_version(kit.anchors[0]
                                                                                  .public_bytes(Encoding.DER))])
    with pytest.raises(MalformedMessage):
        core.receive_challenge(data)
    assert core.state is DeviceState.HELLO_SENT


def _random_value(rng: random.Random):
    return rng.choice([
        None, True, False, 0, -1, 2**63, -(2**64), 1.5, "", "x" * rng.randint(1, 300),
        b"", rng.randbytes(rng.randint(1, 64)), [], [1, b"x"], {}, {"a": 1}, {1: {2: 3}},
        cbor2.CBORTag(1, 0), cbor2.CBORTag(24, b"\xa0"), cbor2.CBORSimpleValue(99),
    ])


def _mutate_map(m: dict, rng: random.Random) -> dict:
    m = dict(m)
    op = rng.randrange(4)
    keys = list(m)
    if op == 0:
        m[rng.choice(keys)] = _random_value(rng)
    elif op == 1:
        del m[rng.choice(keys)]
    elif op == 2:
        m[rng.choice([7, -1, 100, "1", b"\x01", 2**40])] = _random_value(rng)
    else:
        k = rng.choice(keys)
        if isinstance(m[k], (bytes, str)) and m[k]:
            v = m[k]
            m[k] = v[: rng.randrange(len(v))] if rng.random() < 0.5 else v + v[:1]
        else:
            m[k] = _random_value(rng)
    return m


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[i] = rng.randrange(256)
        elif op == 2:
            del b[i:]
        elif op == 3:
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 4 and b:
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randint(1, 16)]
        else:                                # CBOR/DER heads that announce long or odd items
            b[i:i + 1] = bytes([rng.choice([0x18, 0x19, 0x1a, 0x1b, 0x5b, 0x7b, 0x9b, 0xbb,
                                            0x9f, 0xbf, 0xff, 0xc0, 0xd8, 0xf8, 0xfb])])
    return bytes(b)


def _mutated_cose(signed: bytes, rng: random.Random, resign) -> bytes:
    """Mutate the envelope's parts (headers, certificate) rather than random bytes."""
    parts = cose_parts(signed)
    op = rng.randrange(4)
    if op == 0:
        prot = cbor2.loads(parts[0])
        prot[rng.choice([cose.HDR_ALG, cose.HDR_X5CHAIN, cose.HDR_KID, 99])] = _random_value(rng)
        parts[0] = cbor2.dumps(prot)
        return rebuild(parts)
    if op == 1:
        parts[1] = {rng.choice([1, 4, 33]): _random_value(rng)}
        return rebuild(parts)
    if op == 2:
        return resign(parts[2], rng)
    parts[rng.randrange(4)] = _random_value(rng)
    return rebuild(parts)


def _expect_only_4xx(fn, data: bytes, failures: list, outcomes: dict) -> None:
    try:
        fn(data)
        outcomes["accepted"] = outcomes.get("accepted", 0) + 1
    except ProtocolError as exc:
        outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        if not 400 <= exc.status < 500:
            failures.append((data, f"{type(exc).__name__} with status {exc.status}: {exc}"))
    except Exception as exc:  # noqa: BLE001 - catching everything is the point of the loop
        failures.append((data, f"{type(exc).__name__}: {exc}"))


FUZZ_SEED = 20240611
FUZZ_CASES = 2000


def run_fuzz(kit: Kit, target: str, seed: int = FUZZ_SEED, n: int = FUZZ_CASES) -> tuple[list, dict]:
    """Feed n seeded random or mutated inputs to one parser; return (failures, outcome counts)."""
    rng = random.Random(seed)
    if target == "verify_device_signed":
        signed, template, sign = kit.signed_hello(), kit.hello_map(), kit.signed_hello

        def resign(payload, rng):            # validly signed by the device, mutated certificate
            return cose.sign1(payload, kit.device_signer,
                              x5chain=[_mutate_bytes(kit.idevid_der, rng)])

        def check(data):
            verify_device_signed(data, Hello, kit.anchors, FIXED_NOW)
    else:
        signed, template, sign = kit.signed_redirect(), kit.redirect_map(), kit.signed_redirect
        core_box = [kit.core()]

        def resign(payload, rng):            # validly signed by the rendezvous, mutated payload
            return kit.signed_redirect(_mutate_map(kit.redirect_map(), rng))

        def check(data):
            core_box[0].receive_redirect(data)
            core_box[0] = kit.core()         # accepted: a fresh core waits for NONCE again

    failures: list = []
    outcomes: dict = {}
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            data = rng.randbytes(rng.choice([0, 1, 2, 5, 17, 64, 300, 2000]))
        elif kind == 1:
            data = _mutate_bytes(signed, rng)
        elif kind == 2:
            data = sign(_mutate_map(template, rng))     # validly signed, bad content
        elif kind == 3:
            data = _mutated_cose(signed, rng, resign)
        else:
            data = _mutate_bytes(sign(_mutate_map(template, rng)), rng)
        _expect_only_4xx(check, data, failures, outcomes)
    return failures, outcomes


def _check_fuzz(kit: Kit, target: str) -> None:
    started = time.monotonic()
    failures, outcomes = run_fuzz(kit, target)
    elapsed = time.monotonic() - started
    assert not failures, (f"{len(failures)} of {FUZZ_CASES} inputs escaped as non-4xx; first: "
                          f"{failures[0][1]} for {failures[0][0][:64].hex()}...")
    # the loop reached the envelope, the signature and the content checks
    for seen in ("MalformedMessage", "BadSignature"):
        assert outcomes.get(seen, 0) > 50, outcomes
    assert sum(outcomes.values()) == FUZZ_CASES
    assert elapsed < 3.0, f"fuzz loop took {elapsed:.2f} s"


def test_fuzz_receive_redirect_raises_only_4xx_protocol_errors(kit):
    _check_fuzz(kit, "receive_redirect")


def test_fuzz_verify_device_signed_raises_only_4xx_protocol_errors(kit):
    _check_fuzz(kit, "verify_device_signed")
