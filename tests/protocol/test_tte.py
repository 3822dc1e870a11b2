"""The TTE label URL: https://<rendezvous>/.well-known/tte?otp=<16 hex>&devid=<8 hex>."""
from __future__ import annotations

import pytest

from zerotouch.protocol.errors import MalformedMessage, ProtocolError
from zerotouch.protocol.tte import TTE_PATH, Label, parse_label

RV = "https://tte-000000.net"
OTP = "123456789abcdef0"
DEVID = "0000abcd"
VALID = f"{RV}{TTE_PATH}?otp={OTP}&devid={DEVID}"


def test_valid_label_parses():
    label = parse_label(VALID)
    assert label == Label(rendezvous=RV, devid=DEVID, otp=OTP)
    assert label.otp_bytes == bytes.fromhex(OTP) and len(label.otp_bytes) == 8
    assert parse_label(label.url) == label                      # url round-trips


@pytest.mark.parametrize("url", [
    f"{RV}{TTE_PATH}?devid={DEVID}&otp={OTP}",                  # parameter order
    f"{RV}{TTE_PATH}/?otp={OTP}&devid={DEVID}",                 # trailing slash
    f"  {VALID}\n",                                             # whitespace around a scan
    f"https://rv.example:8443{TTE_PATH}?otp={OTP}&devid={DEVID}",
    f"https://[2001:db8::1]{TTE_PATH}?otp={OTP}&devid={DEVID}",
])
def test_valid_variants_parse_to_the_same_ids(url):
    label = parse_label(url)
    assert (label.otp, label.devid) == (OTP, DEVID)
    assert label.rendezvous.startswith("https://")


def test_uppercase_hex_is_accepted_and_normalised():
    label = parse_label(f"{RV}{TTE_PATH}?otp={OTP.upper()}&devid={DEVID.upper()}")
    assert label.otp == OTP and label.devid == DEVID
    assert label.url == VALID


BAD = {
    "otp_15": f"{RV}{TTE_PATH}?otp={OTP[:15]}&devid={DEVID}",
    "otp_17": f"{RV}{TTE_PATH}?otp={OTP}0&devid={DEVID}",
    "otp_32": f"{RV}{TTE_PATH}?otp={OTP * 2}&devid={DEVID}",
    "devid_7": f"{RV}{TTE_PATH}?otp={OTP}&devid={DEVID[:7]}",
    "devid_9": f"{RV}{TTE_PATH}?otp={OTP}&devid={DEVID}0",
    "otp_not_hex": f"{RV}{TTE_PATH}?otp={OTP[:15]}g&devid={DEVID}",
    "devid_not_hex": f"{RV}{TTE_PATH}?otp={OTP}&devid=0000abcz",
    "otp_0x_prefix": f"{RV}{TTE_PATH}?otp=0x{OTP[:14]}&devid={DEVID}",
    "otp_with_space": f"{RV}{TTE_PATH}?otp={OTP[:8]}+{OTP[9:]}&devid={DEVID}",
    "otp_empty": f"{RV}{TTE_PATH}?otp=&devid={DEVID}",
    "missing_otp": f"{RV}{TTE_PATH}?devid={DEVID}",
    "missing_devid": f"{RV}{TTE_PATH}?otp={OTP}",
    "no_query": f"{RV}{TTE_PATH}",
    "duplicated_otp": f"{RV}{TTE_PATH}?otp={OTP}&otp={OTP}&devid={DEVID}",
    "duplicated_devid": f"{RV}{TTE_PATH}?otp={OTP}&devid={DEVID}&devid=0000ffff",
    "wrong_path": f"{RV}/tte?otp={OTP}&devid={DEVID}",
    "path_prefix": f"{RV}/x{TTE_PATH}?otp={OTP}&devid={DEVID}",
    "path_suffix": f"{RV}{TTE_PATH}/extra?otp={OTP}&devid={DEVID}",
    "no_path": f"{RV}?otp={OTP}&devid={DEVID}",
    "ftp": f"ftp://tte-000000.net{TTE_PATH}?otp={OTP}&devid={DEVID}",
    "no_scheme": f"tte-000000.net{TTE_PATH}?otp={OTP}&devid={DEVID}",
    "javascript": f"javascript:alert(1)//{TTE_PATH}?otp={OTP}&devid={DEVID}",
    "no_host": f"https://{TTE_PATH}?otp={OTP}&devid={DEVID}",
    "empty": "",
    "too_long": f"{VALID}&pad={'x' * 600}",
}


@pytest.mark.parametrize("name", BAD)
def test_bad_labels_are_refused(name):
    with pytest.raises(MalformedMessage) as err:
        parse_label(BAD[name])
    assert err.value.status == 400


@pytest.mark.parametrize("value", [None, b"https://x/.well-known/tte", 42])
def test_non_text_is_refused(value):
    with pytest.raises(MalformedMessage):
        parse_label(value)  # type: ignore[arg-type]


def test_plain_http_label_is_refused():
    with pytest.raises(MalformedMessage):
        parse_label(f"http://tte-000000.net{TTE_PATH}?otp={OTP}&devid={DEVID}")


@pytest.mark.parametrize("url", [
    f"{RV}{TTE_PATH}?otp={OTP[:15]}%0A&devid={DEVID}",
    f"{RV}{TTE_PATH}?otp={OTP}&devid={DEVID[:7]}%0A",
], ids=["otp", "devid"])
def test_trailing_newline_in_ids_is_refused(url):
    try:
        label = parse_label(url)
    except MalformedMessage:
        return
    pytest.fail(f"accepted {label!r}")


def test_refusals_are_protocol_errors_not_crashes():
    """Every refusal above is a 4xx ProtocolError, so an HTTP adapter can answer it as such."""
    for url in BAD.values():
        try:
            parse_label(url)
        except ProtocolError as exc:
            assert 400 <= exc.status < 500
        else:  # pragma: no cover - would be caught by test_bad_labels_are_refused too
            pytest.fail(f"accepted {url}")
