"""EST through the gateway app on real TLS, authenticated by real client certificates."""
from __future__ import annotations

import asyncio
import base64
import time
import urllib.parse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AttributeOID, NameOID

from zerotouch.pki.keys import cert_pem
from zerotouch.protocol import est as codec
from zerotouch.services.est import EnrollmentPolicy, EstPolicy, hash_password

from est_harness import HOST, make_csr, make_env, start_est_server

WK = codec.WELL_KNOWN


def issued(status: int, headers: dict, body: bytes) -> x509.Certificate:
    assert status == 200, body
    assert headers["Content-Type"] == codec.PKCS7_CERTS
    assert headers["Content-Transfer-Encoding"] == "base64"
    [cert] = codec.parse_certs_only(codec.decode_body(body))
    return cert


def text_error(resp, status: int, *words: str) -> None:
    got, headers, body = resp
    assert got == status, (got, body)
    assert headers["Content-Type"].startswith("text/plain")
    for w in words:
        assert w.lower() in body.decode().lower(), body


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def serial_of(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value


async def test_cacerts_and_csrattrs(server, fleet):
    status, headers, body = await server.call("GET", WK + "/cacerts")
    [ca] = codec.parse_certs_only(codec.decode_body(body))
    assert status == 200 and headers["Content-Type"] == codec.PKCS7_CERTS
    assert ca == fleet.vault._ca.cert
    status, headers, body = await server.call("GET", WK + "/ldevid/csrattrs")
    assert status == 200 and headers["Content-Type"] == codec.CSRATTRS
    assert codec.decode_csr_attrs(codec.decode_body(body))[0].oid == codec.OID_EC_PUBLIC_KEY


async def test_three_stages_over_tls(server, env):
    dev, idevid, ikey = await env.device()
    lcsr, lkey = make_csr(subject="ignored")
    ldevid = issued(*await server.enroll("/simpleenroll", lcsr, idevid, ikey))
    assert serial_of(ldevid) == dev.serial
    op = issued(*await server.enroll("/operational/simpleenroll", make_csr()[0], der(ldevid), lkey))
    assert (op.not_valid_after_utc - op.not_valid_before_utc).days == 1
    renew_csr, _ = make_csr(lkey, subject=ldevid.subject)
    renewed = issued(*await server.enroll("/simplereenroll", renew_csr, der(ldevid), lkey))
    assert renewed.serial_number != ldevid.serial_number and renewed.subject == ldevid.subject
    text_error(await server.enroll("/simplereenroll", make_csr()[0], der(ldevid), lkey), 400,
               "subject")
    text_error(await server.enroll("/operational/simpleenroll", make_csr()[0], idevid, ikey), 403,
               "ldevid")
    assert len(await env.certs_of(dev.serial)) == 3


async def test_refusals_are_text_with_reasons(server, env):
    dev, idevid, ikey = await env.device()
    weak, _ = make_csr(rsa.generate_private_key(65537, 1024))
    text_error(await server.enroll("/simpleenroll", weak, idevid, ikey), 400, "RSA of 1024 bits")
    text_error(await server.enroll("/simpleenroll", make_csr()[0]), 403, "client certificate")
    text_error(await server.call("POST", WK + "/simpleenroll", cert=idevid, key=ikey,
                                 body=make_csr()[0], ctype=codec.PKCS10), 400, "base64")
    text_error(await server.enroll("/simpleenroll", make_csr()[0], idevid, ikey,
                                   ctype="application/octet-stream"), 415, codec.PKCS10)
    status, headers, _ = await server.call("GET", WK + "/simpleenroll")
    assert status == 405 and headers["Allow"] == "POST"
    text_error(await server.call("GET", WK + "/fullcmc"), 404, "operation")
    text_error(await server.call("GET", WK + "/nope/csrattrs"), 404, "label")
    text_error(await server.enroll("/nope/simpleenroll", make_csr()[0], idevid, ikey), 404, "label")
    text_error(await server.call("GET", WK + "/a%20b/cacerts"), 400, "label")
    text_error(await server.call("POST", WK + "/simpleenroll", cert=idevid, key=ikey,
                                 body=b"A" * (codec.MAX_BODY + 100)), 413, "exceeds")
    assert await env.certs_of(dev.serial) == []


async def test_revoked_ldevid_refused(server, env):
    dev, idevid, ikey = await env.device()
    ldevid, lkey = await env.ldevid(idevid)
    cert = x509.load_der_x509_certificate(ldevid)
    await env.store.certs.revoke(format(cert.serial_number, "x"), time.time(), "keyCompromise")
    text_error(await server.enroll("/operational/simpleenroll", make_csr()[0], ldevid, lkey), 403,
               "revoked")
    text_error(await server.enroll("/simplereenroll", make_csr(subject=cert.subject)[0], ldevid,
                                   lkey), 403, "revoked")


async def test_approval_202_then_issued(server, env):
    dev, idevid, ikey = await env.device()
    env.policy.devices[dev.serial] = EnrollmentPolicy(manual_approval=True)
    csr, _ = make_csr()
    resp = await server.enroll("/simpleenroll", csr, idevid, ikey)
    text_error(resp, 202, "approval")
    assert resp[1]["Retry-After"] == "60"
    [req] = await env.est.pending()
    await env.est.approve(req.id)
    cert = issued(*await server.enroll("/simpleenroll", csr, idevid, ikey))
    assert issued(*await server.enroll("/simpleenroll", csr, idevid, ikey)) == cert
    assert len(await env.certs_of(dev.serial)) == 1


async def test_serverkeygen_multipart(server, env):
    dev, idevid, ikey = await env.device()
    status, headers, body = await server.enroll("/serverkeygen", make_csr()[0], idevid, ikey)
    assert status == 200 and headers["Content-Type"].startswith("multipart/mixed; boundary=")
    pkcs8, [cert] = codec.parse_serverkeygen(headers["Content-Type"], body)
    key = serialization.load_der_private_key(pkcs8, None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert serial_of(cert) == dev.serial


async def test_no_client_certificate_still_onboards(server):
    """CERT_OPTIONAL: the CBOR onboarding endpoints serve clients without certificates."""
    status, _h, body = await server.call("GET", "/healthz")
    assert status == 200 and b"true" in body


async def test_basic_auth_challenge(fleet, tmp_path):
    dev = await fleet.make()
    env = make_env(fleet, EstPolicy.from_config({"basic": {
        "boot": {"device": dev.serial, "password": hash_password("pw")}}}))
    server = await start_est_server(env, tmp_path / "srv")
    try:
        resp = await server.enroll("/simpleenroll", make_csr()[0])
        text_error(resp, 401, "basic")
        assert resp[1]["WWW-Authenticate"].startswith('Basic realm="zerotouch"')
        auth = "Basic " + base64.b64encode(b"boot:pw").decode()
        cert = issued(*await server.enroll("/simpleenroll", make_csr()[0],
                                           headers={"Authorization": auth}))
        assert serial_of(cert) == dev.serial
        bad = "Basic " + base64.b64encode(b"boot:nope").decode()
        text_error(await server.enroll("/simpleenroll", make_csr()[0],
                                       headers={"Authorization": bad}), 401, "password")
    finally:
        await server.close()


@pytest.mark.parametrize("trusted", [True, False])
async def test_forwarded_certificate_only_from_trusted_proxy(env, tmp_path, trusted):
    server = await start_est_server(env, tmp_path / "srv",
                                    trusted_proxies=[HOST] if trusted else ["10.9.8.7/32"])
    try:
        dev, idevid, _ = await env.device()
        pem = cert_pem(x509.load_der_x509_certificate(idevid)).decode()
        header = {"X-SSL-Client-Cert": urllib.parse.quote(pem, safe="")}
        resp = await server.enroll("/simpleenroll", make_csr()[0], headers=header)
        if trusted:
            assert serial_of(issued(*resp)) == dev.serial
            text_error(await server.enroll("/simpleenroll", make_csr()[0],
                                           headers={"X-SSL-Client-Cert": "garbage"}), 400, "PEM")
        else:  # the forged header from a non-proxy address is ignored: no credential at all
            text_error(resp, 403, "client certificate")
            assert await env.certs_of(dev.serial) == []
    finally:
        await server.close()


async def _raw_enroll_tls12(server, cert_der_: bytes, key, make_body) -> tuple[int, bytes]:
    """A hand-made request on a TLS 1.2 connection; `make_body(tls_unique)` builds the CSR."""
    reader, writer = await asyncio.open_connection(HOST, server.port,
                                                   ssl=server.ssl(cert_der_, key, tls12=True))
    try:
        sslobj = writer.get_extra_info("ssl_object")
        assert sslobj.version() == "TLSv1.2"
        body = codec.encode_body(make_body(sslobj.get_channel_binding("tls-unique")))
        writer.write(f"POST {WK}/simpleenroll HTTP/1.1\r\nHost: {HOST}\r\n"
                     f"Content-Type: {codec.PKCS10}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


async def test_tls12_tls_unique_in_challenge_password(server, env):
    _dev, idevid, ikey = await env.device()

    def csr_with(value: bytes) -> bytes:
        return make_csr(attrs={AttributeOID.CHALLENGE_PASSWORD: value})[0]
    status, body = await _raw_enroll_tls12(server, idevid, ikey,
                                           lambda tu: csr_with(base64.b64encode(tu)))
    assert status == 200, body
    status, body = await _raw_enroll_tls12(server, idevid, ikey,
                                           lambda tu: csr_with(base64.b64encode(b"\x00" * len(tu))))
    assert status == 403 and b"tls-unique" in body
