"""The sans-IO EST codec: strict base64 bodies, certs-only PKCS#7, CsrAttrs, serverkeygen multipart."""
from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization

from zerotouch.pki.ca import CertificateAuthority, make_root
from zerotouch.pki.keys import generate_p256
from zerotouch.protocol import est as codec
from zerotouch.protocol.errors import MalformedMessage, MessageTooLarge


def test_body_base64_with_line_breaks_only():
    der = bytes(range(256)) * 3
    text = codec.encode_body(der)
    lines = text.split(b"\n")
    assert lines[-1] == b"" and all(len(x) == 64 for x in lines[:-2]) and 0 < len(lines[-2]) <= 64
    assert codec.decode_body(text) == der
    assert codec.decode_body(text.replace(b"\n", b"\r\n")) == der
    assert codec.decode_body(base64.b64encode(der)) == der      # one line is fine too
    assert codec.decode_body(base64.encodebytes(der)) == der    # 76-column MIME lines


@pytest.mark.parametrize("body", [
    b"", b"\r\n", b"\x30\x82\x01\x00" + b"\x00" * 10,           # raw DER sent by mistake
    b"QUJD REVG", b"QUJD\tREVG", b"QUJDRA", b"QUJDRA=", b"QU=D", b"QUJD-_==", b"QUJDRA==\x00",
])
def test_body_refuses_anything_else(body):
    with pytest.raises(MalformedMessage):
        codec.decode_body(body)


def test_body_is_bounded():
    with pytest.raises(MessageTooLarge):
        codec.decode_body(b"A" * (codec.MAX_BODY + 4))


def _ca(name="test CA"):
    key = generate_p256()
    return CertificateAuthority(key, make_root(key, name))


def test_certs_only_round_trip():
    a, b = _ca("a").cert, _ca("b").cert
    got = codec.parse_certs_only(codec.certs_only([a, b]))
    assert sorted(c.subject.rfc4514_string() for c in got) == ["CN=a", "CN=b"]  # DER sorts SET OF
    with pytest.raises(MalformedMessage):
        codec.parse_certs_only(b"\x30\x00")


def test_csr_attrs_rfc7030_example_and_round_trip():
    # RFC 7030 §4.5.2's example, decoded with the RFC's own ASN.1 module
    example = base64.b64decode("MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJ"
                               "BgcrBgEBAQEWBggqhkjOPQQDAw==")
    attrs = codec.decode_csr_attrs(example)
    assert [a.oid for a in attrs] == [codec.OID_CHALLENGE_PASSWORD, codec.OID_EC_PUBLIC_KEY,
                                      "1.2.840.113549.1.9.14", codec.SIGNATURE_OIDS["ecdsa-with-SHA384"]]
    assert attrs[1].values == (codec.oid_value(codec.CURVE_OIDS["secp384r1"]),)
    assert codec.encode_csr_attrs(attrs) == example
    for types in (["P-256"], ["P-384", "RSA"], ["RSA"]):
        ours = codec.csr_attrs_for(types)
        assert codec.decode_csr_attrs(codec.encode_csr_attrs(ours)) == ours
    with pytest.raises(MalformedMessage):
        codec.decode_csr_attrs(example + b"\x00")
    with pytest.raises(MalformedMessage):
        codec.decode_csr_attrs(b"\x04\x00")


def test_serverkeygen_multipart_round_trip():
    key = generate_p256()
    cert = _ca().issue_device(key.public_key(), serial="s1", urn="urn:dev:zerotouch:s1")
    pkcs8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    ctype, body = codec.serverkeygen_body(pkcs8, [cert])
    assert ctype.startswith("multipart/mixed; boundary=est-")
    assert b"Content-Type: application/pkcs8\r\n" in body
    assert b"Content-Type: application/pkcs7-mime; smime-type=certs-only\r\n" in body
    assert body.endswith(b"--\r\n")
    got_key, got_certs = codec.parse_serverkeygen(ctype, body)
    assert got_key == pkcs8 and got_certs == [cert]
    with pytest.raises(MalformedMessage):
        codec.parse_serverkeygen("multipart/mixed; boundary=x", b"--x\r\n\r\nhello\r\n--x--\r\n")


@pytest.mark.parametrize("label,ok", [("ldevid", True), ("a.b-c_9", True), ("", False),
                                      ("..", False), ("a/b", False), ("x" * 65, False)])
def test_labels(label, ok):
    if ok:
        assert codec.check_label(label) == label
    else:
        with pytest.raises(MalformedMessage):
            codec.check_label(label)
