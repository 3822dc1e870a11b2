"""TTE §3.4 MotherShip ID <-> host name, and the draft's own example label URL (§2)."""
from __future__ import annotations

import pytest

from zerotouch.protocol.errors import MalformedMessage
from zerotouch.protocol.tte import (Label, mothership_host, mothership_id, mothership_url,
                                    parse_label)


def test_draft_example_id_10():
    assert mothership_host(10) == "tte-00000A.net"
    assert mothership_id("tte-00000A.net") == 10


@pytest.mark.parametrize("msid", [1, 10, 0xABCDEF, 0xFFFFFF, 0x000100])
def test_round_trip(msid):
    host = mothership_host(msid)
    assert host.startswith("tte-") and len(host) == len("tte-XXXXXX.net")
    assert host[4:10] == f"{msid:06X}"
    assert mothership_id(host) == msid


def test_domain_is_configurable():
    assert mothership_host(0xAB, "example.org") == "tte-0000AB.example.org"
    assert mothership_id("tte-0000AB.example.org", domain="example.org") == 0xAB
    with pytest.raises(MalformedMessage):
        mothership_id("tte-0000AB.example.org")            # not under .net
    with pytest.raises(MalformedMessage):
        mothership_host(1, "bad domain")


def test_host_is_case_insensitive_and_may_end_with_a_dot():
    assert mothership_id("TTE-00000a.NET.") == 10


@pytest.mark.parametrize("msid", [0x01000000, 0xFF000001, 0x80FFFFFF])
def test_reserved_high_byte_is_refused(msid):
    with pytest.raises(MalformedMessage, match="reserved"):
        mothership_host(msid)


def test_id_zero_only_for_examples():
    with pytest.raises(MalformedMessage, match="examples"):
        mothership_host(0)
    with pytest.raises(MalformedMessage, match="examples"):
        mothership_id("tte-000000.net")
    assert mothership_host(0, examples=True) == "tte-000000.net"
    assert mothership_id("tte-000000.net", examples=True) == 0
    assert mothership_url(10) == "https://tte-00000A.net"


@pytest.mark.parametrize("value", [-1, 1 << 32, True, "10", 1.0])
def test_not_a_32_bit_id(value):
    with pytest.raises(MalformedMessage):
        mothership_host(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", [
    "tte-00000A", "tte-0000A.net", "tte-00000AA.net", "tte-00000G.net", "tte00000A.net",
    "x.tte-00000A.net", "tte-00000A.net.evil", "", "tte-00000A..net",
])
def test_bad_hosts_are_refused(host):
    with pytest.raises(MalformedMessage):
        mothership_id(host)


# The draft's example (§2) exactly as printed: the URL broken after "?" (with trailing blanks),
# a comma between the parameters, and the parameter spelled "DevID".
DRAFT_EXAMPLE = "https://tte-000000.net/.well-known/tte?  \notp=123456789abcdef0,DevID=abcdef01"


def test_draft_example_url_parses():
    label = parse_label(DRAFT_EXAMPLE)
    assert label == Label(rendezvous="https://tte-000000.net", devid="abcdef01",
                          otp="123456789abcdef0")
    assert mothership_id("tte-000000.net", examples=True) == 0
    assert parse_label(label.url) == label                 # canonical form round-trips


@pytest.mark.parametrize("url", [
    "https://tte-000000.net/.well-known/tte?otp=123456789ABCDEF0,DevID=ABCDEF01",
    "https://tte-000000.net/.well-known/tte?\r\notp=123456789abcdef0&devid=abcdef01",
    "https://tte-000000.net/.well-known/tte?OTP=123456789abcdef0&DEVID=abcdef01",
])
def test_draft_spelling_variants(url):
    label = parse_label(url)
    assert (label.otp, label.devid) == ("123456789abcdef0", "abcdef01")


@pytest.mark.parametrize("url", [
    "https://tte-000000.net/.well-known/tte?otp=123456789abcdef0,devid=abcdef01,DevID=abcdef02",
    "https://tte-000000.net/.well-known/tte?otp=123456789abcdef0 ,DevID=abcdef01",
    "https://tte-000000.net/.well-known/tte?otp=12345678 9abcdef0,DevID=abcdef01",
])
def test_draft_spelling_does_not_loosen_the_checks(url):
    with pytest.raises(MalformedMessage):
        parse_label(url)
