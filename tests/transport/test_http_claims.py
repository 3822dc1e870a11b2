"""The TTE claim endpoint `/.well-known/tte` of the real rendezvous app over HTTPS.

GET renders the claim form (or, asked for JSON with the right OTP, the device's status);
POST claims the device once, as JSON or as the HTML form posts it. Every refusal names what
was wrong and leaves the store as it was (a wrong OTP only counts one failed claim).
"""
from __future__ import annotations

import html
import json

import pytest

from zerotouch.pki.ca import load_der_cert
from zerotouch.pki.keys import cert_fingerprint
from zerotouch.protocol.states import RendezvousStatus

from http_harness import snapshot

TTE = "/.well-known/tte"






def _label_url(s, dev) -> str:
    return f"{s.rv_url}{TTE}?otp={dev.label.otp}&devid={dev.label.devid}"


def _claim(s, port: int | None = None, **over) -> dict:
    body = {"cip": "127.0.0.1", "cport": port or s.gw_port, "cfingerprint": s.fleet.owner_fp_hex}
    body.update(over)
    return body


def _form(d: dict) -> dict:
    return {k: str(v) for k, v in d.items()}


def _message(body: bytes) -> str:
    data = json.loads(body)
    assert set(data) == {"error", "message"} and data["message"], data
    return data["message"]


async def _fresh(s):
    return await s.fleet.make(claim=False, inventory=False)


# --- GET ----------------------------------------------------------------------------------
async def test_get_renders_the_claim_form_and_changes_nothing(servers):
    s = servers
    dev = await _fresh(s)
    before = await snapshot(s.store)
    status, headers, body = await s.request("GET", _label_url(s, dev))
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert f'name="otp" value="{dev.label.otp}"' in page
    assert f'name="devid" value="{dev.label.devid}"' in page
    for field in ("cip", "cport", "cfingerprint"):
        assert f'name="{field}"' in page
    assert f'action="{TTE}"' in page and 'method="post"' in page
    assert await snapshot(s.store) == before


@pytest.mark.parametrize("otp, devid", [
    ("<script>alert(1)</script>", "x"),
    ("0011223344556677", '"><svg onload=alert(1)>'[:16]),
    ("\"'><img src=x onerror=alert(1)>", "00000001"),
    ("a" * 40, "<script>"),                                   # too long: refused
    ("0011223344556677", "<script>alert(1)</script>"),        # too long: refused
])
async def test_get_never_reflects_markup_raw(sq_servers, otp, devid):
    s = sq_servers
    before = await snapshot(s.store)
    for accept in ("text/html", "application/json"):
        status, headers, body = await s.request("GET", f"{s.rv_url}{TTE}",
                                                params={"otp": otp, "devid": devid},
                                                headers={"Accept": accept})
        text = body.decode()
        for raw in (otp, devid):
            if any(ch in raw for ch in "<>\"'"):
                assert raw not in text, (accept, status, text[:300])
        assert "<script" not in text and "<svg" not in text and "<img" not in text
        if status == 200:
            assert accept == "text/html" and headers["Content-Type"].startswith("text/html")
            assert html.escape(otp) in text and html.escape(devid) in text
        else:
            assert status == 400, (accept, status, text)
            msg = _message(body)
            assert "otp" in msg or "devid" in msg
    assert await snapshot(s.store) == before


async def test_get_json_status_with_the_right_otp(servers):
    s = servers
    dev = await _fresh(s)
    before = await snapshot(s.store)
    for how in ({"headers": {"Accept": "application/json"}}, {"params": {"format": "json"}}):
        url = _label_url(s, dev) if "params" not in how else f"{s.rv_url}{TTE}"
        params = {"otp": dev.label.otp, "devid": dev.label.devid, **how.get("params", {})}
        status, headers, body = await s.request("GET", url.split("?")[0], params=params,
                                                headers=how.get("headers"))
        assert status == 200 and headers["Content-Type"].startswith("application/json"), body
        data = json.loads(body)
        assert data["urn"] == dev.urn and data["serial"] == dev.serial
        assert data["status"] == "not_mapped" and "gateway_url" not in data
        rec = await s.store.rendezvous.get(dev.serial)
        assert data["fingerprint"] == cert_fingerprint(load_der_cert(rec.idevid_der)).hex()
    assert await snapshot(s.store) == before


async def test_get_json_status_refusals(servers):
    s = servers
    dev = await _fresh(s)
    wrong_otp = ("f" if dev.label.otp[0] != "f" else "e") + dev.label.otp[1:]
    json_hdr = {"Accept": "application/json"}
    before = await snapshot(s.store)
    for params, code, words in [
        ({"otp": dev.label.otp, "devid": "zzzzzzzz"}, 400, "devid"),
        ({"otp": "xyz", "devid": dev.label.devid}, 400, "otp"),
        ({"devid": dev.label.devid}, 400, "otp"),
        ({"otp": dev.label.otp, "devid": "00000000"}, 404, "no device"),
    ]:
        status, _h, body = await s.request("GET", f"{s.rv_url}{TTE}", params=params, headers=json_hdr)
        assert status == code, (params, status, body)
        assert words in _message(body)
    assert await snapshot(s.store) == before
    # a wrong OTP is refused and counted (guessing protection), nothing else changes
    status, _h, body = await s.request("GET", f"{s.rv_url}{TTE}", headers=json_hdr,
                                       params={"otp": wrong_otp, "devid": dev.label.devid})
    assert status == 403 and "OTP does not match" in _message(body)
    rec = await s.store.rendezvous.get(dev.serial)
    assert rec.failed_claims == 1 and rec.status is RendezvousStatus.NOT_MAPPED


# --- POST -----------------------------------------------------------------------------------
async def test_claim_as_json_once_then_409_with_first_mapping_intact(servers):
    s = servers
    dev = await _fresh(s)
    status, headers, body = await s.request("POST", _label_url(s, dev), json=_claim(s))
    assert status == 200 and headers["Content-Type"].startswith("application/json"), body
    data = json.loads(body)
    rec = await s.store.rendezvous.get(dev.serial)
    assert data["urn"] == dev.urn
    assert data["fingerprint"] == cert_fingerprint(load_der_cert(rec.idevid_der)).hex()
    assert data["status"] == "mapped" and data["gateway_url"] == s.gw_url
    assert rec.status is RendezvousStatus.MAPPED and rec.gateway_url == s.gw_url
    assert rec.owner_fp == bytes.fromhex(s.fleet.owner_fp_hex)

    before = await snapshot(s.store)
    thief = _claim(s, port=9999, cip="evil.example.com", cfingerprint="ab" * 32)
    for send in ({"json": thief}, {"data": _form(thief)}):   # JSON, then as the HTML form
        status, _h, body = await s.request("POST", _label_url(s, dev), **send)
        assert status == 409, (send, status, body)
        msg = _message(body)
        assert "OTP was already used" in msg and "claimed" in msg
    assert await snapshot(s.store) == before
    rec = await s.store.rendezvous.get(dev.serial)
    assert rec.gateway_url == s.gw_url and rec.owner_fp == bytes.fromhex(s.fleet.owner_fp_hex)


async def test_claim_as_html_form_with_ids_in_fields(servers):
    """What the rendered form posts: otp/devid as hidden fields, to the bare TTE path."""
    s = servers
    dev = await _fresh(s)
    form = {"otp": dev.label.otp, "devid": dev.label.devid, "cip": "127.0.0.1",
            "cport": str(s.gw_port), "cfingerprint": ":".join(
                s.fleet.owner_fp_hex[i:i + 2] for i in range(0, 64, 2)).upper()}
    status, headers, body = await s.request("POST", f"{s.rv_url}{TTE}", data=form)
    assert status == 200 and headers["Content-Type"].startswith("application/json"), body
    data = json.loads(body)
    assert data["urn"] == dev.urn and len(data["fingerprint"]) == 64 and data["status"] == "mapped"
    rec = await s.store.rendezvous.get(dev.serial)
    assert rec.gateway_url == s.gw_url and rec.owner_fp == bytes.fromhex(s.fleet.owner_fp_hex)


BAD_FIELDS = [
    ({"cport": "abc"}, "cport"), ({"cport": "0"}, "cport"), ({"cport": 65536}, "cport"),
    ({"cport": ""}, "cport"), ({"cport": -1}, "cport"), ({"cport": [8444]}, "cport"),
    ({"cip": ""}, "cip"), ({"cip": "bad host!"}, "cip"), ({"cip": "a" * 300}, "cip"),
    ({"cip": "-leading.dash"}, "cip"), ({"cip": "host/path"}, "cip"),
    ({"cfingerprint": "xyz"}, "cfingerprint"), ({"cfingerprint": "ab" * 31}, "cfingerprint"),
    ({"cfingerprint": "g" * 64}, "cfingerprint"), ({"cfingerprint": ""}, "cfingerprint"),
]


async def test_bad_claim_fields_are_400s_naming_the_field(servers):
    s = servers
    dev = await _fresh(s)
    before = await snapshot(s.store)
    for over, field in BAD_FIELDS:
        for send in ("json", "data"):
            payload = _claim(s, **over)
            if send == "data":
                if isinstance(over.get("cport"), list):
                    continue
                payload = _form(payload)
            status, _h, body = await s.request("POST", _label_url(s, dev), **{send: payload})
            assert status == 400, (over, send, status, body)
            assert field in _message(body), (over, _message(body))
    # the label ids, in the URL or in the body
    for params, field in [({"otp": "zz" * 8, "devid": dev.label.devid}, "otp"),
                          ({"otp": dev.label.otp[:-2], "devid": dev.label.devid}, "otp"),
                          ({"otp": dev.label.otp, "devid": "xyz"}, "devid"),
                          ({"otp": dev.label.otp}, "devid"), ({}, "devid")]:
        status, _h, body = await s.request("POST", f"{s.rv_url}{TTE}", params=params, json=_claim(s))
        assert status == 400 and field in _message(body), (params, status, body)
        status, _h, body = await s.request("POST", f"{s.rv_url}{TTE}", data=_form({**params, **_claim(s)}))
        assert status == 400 and field in _message(body), (params, status, body)
    assert await snapshot(s.store) == before


async def test_non_json_and_oversized_claims(servers):
    s = servers
    dev = await _fresh(s)
    url = _label_url(s, dev)
    before = await snapshot(s.store)
    for raw, words in [(b"cip=127.0.0.1", "not JSON"), (b"{\"cip\": ", "not JSON"), (b"", "not JSON"),
                       (b"\xff\xfe{}", "not JSON"), (b"[1, 2]", "JSON object"), (b"\"x\"", "JSON object"),
                       (b"null", "JSON object")]:
        status, _h, body = await s.request("POST", url, data=raw,
                                           headers={"Content-Type": "application/json"})
        assert status == 400, (raw, status, body)
        assert words in _message(body), (raw, body)
    big = json.dumps({**_claim(s), "pad": "x" * 5000}).encode()
    for ctype in ("application/json", "application/x-www-form-urlencoded"):
        status, _h, body = await s.request("POST", url, data=big, headers={"Content-Type": ctype})
        assert 400 <= status < 500 and "too large" in _message(body), (ctype, status, body)
    assert await snapshot(s.store) == before
    assert await s.healthy()


# --- bugs ---------------------------------------------------------------------------------
async def test_chunked_claim_over_4k_is_refused(sq_servers):
    s = sq_servers
    dev = await _fresh(s)
    big = json.dumps({**_claim(s), "pad": "x" * 6000}).encode()

    async def chunks():
        yield big

    before = await snapshot(s.store)
    status, _h, body = await s.request("POST", _label_url(s, dev), data=chunks(),
                                       headers={"Content-Type": "application/json"})
    assert 400 <= status < 500 and "too large" in _message(body), (status, body)
    assert await snapshot(s.store) == before


@pytest.mark.parametrize("over, field", [
    ({"cport": True}, "cport"),         # JSON true -> int(True) == 1: mapped to port 1
    ({"cport": 8444.7}, "cport"),       # silently truncated to 8444
    ({"cip": None}, "cip"),             # str(None) == "None": mapped to https://none:<port>
], ids=["cport-true", "cport-float", "cip-null"])
async def test_claim_json_values_of_the_wrong_type_are_400(sq_servers, over, field):
    s = sq_servers
    dev = await _fresh(s)
    before = await snapshot(s.store)
    status, _h, body = await s.request("POST", _label_url(s, dev), json=_claim(s, **over))
    assert status == 400 and field in _message(body), (status, body)
    assert await snapshot(s.store) == before


@pytest.mark.parametrize("ctype, raw", [
    ("application/json; charset=no-such-codec", b"{}"),
    ("application/x-www-form-urlencoded", b"cip=\xff\xfe&cport=1"),
    ("application/x-www-form-urlencoded; charset=no-such-codec", b"cip=x"),
    ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n"),
], ids=["json-unknown-charset", "form-not-utf8", "form-unknown-charset", "multipart-nameless-part"])
async def test_undecodable_claim_bodies_are_400(sq_servers, ctype, raw):
    s = sq_servers
    dev = await _fresh(s)
    before = await snapshot(s.store)
    status, _h, body = await s.request("POST", _label_url(s, dev), data=raw,
                                       headers={"Content-Type": ctype})
    assert 400 <= status < 500, (ctype, status, body)
    _message(body)
    assert await snapshot(s.store) == before
