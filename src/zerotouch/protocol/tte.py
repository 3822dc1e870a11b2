"""Transitive Trust Enrollment label URL and MotherShip host names.

Label URL (draft §2): ``https://<rendezvous>/.well-known/tte?otp=<16 hex>&devid=<8 hex>``.
`parse_label` also accepts the spelling of the draft's own example, which prints the URL broken
over two lines right after the ``?``, separates the parameters with a comma and spells the
parameter ``DevID``::

    https://tte-000000.net/.well-known/tte?
    otp=123456789abcdef0,DevID=abcdef01

MotherShip ID <-> host name (draft §3.4): for an ID whose high-order byte is 0x00 the host is
``"tte-"`` + the low 24 bits as 6 upper-case hex digits + ``"." + domain`` (``.net`` in the draft;
the domain is configurable here). IDs with another high byte are reserved for future
specifications and refused; ID 0 is reserved for examples and refused unless ``examples=True``.
The draft requires the label to use the default HTTPS port; `parse_label` still accepts an explicit
port (the loopback demo and tests run the rendezvous on other ports).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_plus, urlencode, urlsplit

from .errors import MalformedMessage

TTE_PATH = "/.well-known/tte"
MOTHERSHIP_DOMAIN = "net"
_HEX = re.compile(r"[0-9a-f]+")
# A printed/scanned URL broken over lines: drop each line break and the blanks around it.
_LINE_BREAK = re.compile(r"[ \t]*(?:\r\n|\r|\n)[ \t]*")
# Parameter separators: "&" (RFC 3986 convention) and "," (the draft's example).
_SEPARATORS = re.compile(r"[&,]")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_MS_HOST = re.compile(r"tte-([0-9A-Fa-f]{6})", re.IGNORECASE)


@dataclass(frozen=True)
class Label:
    rendezvous: str   # scheme://host[:port]
    devid: str        # 8 lowercase hex digits
    otp: str          # 16 lowercase hex digits (64 random bits)

    @property
    def url(self) -> str:
        return f"{self.rendezvous}{TTE_PATH}?{urlencode({'otp': self.otp, 'devid': self.devid})}"

    @property
    def otp_bytes(self) -> bytes:
        return bytes.fromhex(self.otp)


def _query_params(query: str) -> dict[str, list[str]]:
    """Like parse_qs(keep_blank_values=True) but with "," as a separator too and
    case-insensitive parameter names (the draft's example spells ``DevID``)."""
    params: dict[str, list[str]] = {}
    for piece in _SEPARATORS.split(query):
        if not piece:
            continue
        name, _, value = piece.partition("=")
        params.setdefault(unquote_plus(name).lower(), []).append(unquote_plus(value))
    return params


def parse_label(url: str) -> Label:
    """Strictly parse a label URL; raises MalformedMessage with a readable reason."""
    if not isinstance(url, str) or len(url) > 512:
        raise MalformedMessage("label URL is missing or too long")
    parts = urlsplit(_LINE_BREAK.sub("", url.strip()))
    if parts.scheme != "https" or not parts.netloc:
        raise MalformedMessage("label URL must be an https:// URL")
    if parts.path.rstrip("/") != TTE_PATH:
        raise MalformedMessage(f"label URL path must be {TTE_PATH}")
    query = _query_params(parts.query)
    otp = query.get("otp", [""])
    devid = query.get("devid", [""])
    if len(otp) != 1 or len(devid) != 1:
        raise MalformedMessage("label URL must have exactly one otp and one devid")
    otp_s, devid_s = otp[0].lower(), devid[0].lower()
    if len(otp_s) != 16 or not _HEX.fullmatch(otp_s):
        raise MalformedMessage("otp must be 16 hex digits")
    if len(devid_s) != 8 or not _HEX.fullmatch(devid_s):
        raise MalformedMessage("devid must be 8 hex digits")
    return Label(rendezvous=f"{parts.scheme}://{parts.netloc}", devid=devid_s, otp=otp_s)


# --- MotherShip ID <-> host name (draft §3.4) ---------------------------------------------------

def _check_domain(domain: str) -> str:
    if not isinstance(domain, str):
        raise MalformedMessage("MotherShip domain must be text")
    d = domain.strip().strip(".")
    if not d or len(d) > 240 or not all(_DNS_LABEL.fullmatch(p) for p in d.split(".")):
        raise MalformedMessage(f"not a valid MotherShip domain: {domain!r}")
    return d


def _check_msid(msid: int, examples: bool) -> int:
    if isinstance(msid, bool) or not isinstance(msid, int) or not 0 <= msid <= 0xFFFFFFFF:
        raise MalformedMessage("MotherShip ID must be a 32-bit unsigned integer")
    if msid >> 24:
        raise MalformedMessage(
            f"MotherShip ID 0x{msid:08X} has a high-order byte other than 0x00 (reserved)")
    if msid == 0 and not examples:
        raise MalformedMessage("MotherShip ID 0 is reserved for examples")
    return msid


def mothership_host(msid: int, domain: str = MOTHERSHIP_DOMAIN, *, examples: bool = False) -> str:
    """MotherShip ID -> DNS host name, e.g. 10 -> ``"tte-00000A.net"``."""
    _check_msid(msid, examples)
    return f"tte-{msid & 0xFFFFFF:06X}.{_check_domain(domain)}"


def mothership_id(host: str, domain: str = MOTHERSHIP_DOMAIN, *, examples: bool = False) -> int:
    """DNS host name -> MotherShip ID, e.g. ``"tte-00000A.net"`` -> 10.

    Host names are case-insensitive (``tte-00000a.NET`` is accepted) and a trailing root dot is
    allowed; the host must be exactly ``tte-`` + 6 hex digits directly under `domain`."""
    if not isinstance(host, str):
        raise MalformedMessage("MotherShip host must be text")
    d = _check_domain(domain).lower()
    h = host.strip()
    h = h[:-1] if h.endswith(".") else h
    first, dot, rest = h.partition(".")
    m = _MS_HOST.fullmatch(first)
    if not dot or rest.lower() != d or m is None:
        raise MalformedMessage(f"{host!r} is not a MotherShip host name under .{d}")
    return _check_msid(int(m.group(1), 16), examples)


def mothership_url(msid: int, domain: str = MOTHERSHIP_DOMAIN, *, examples: bool = False) -> str:
    """``https://`` origin of the MotherShip (default HTTPS port, as the draft requires)."""
    return f"https://{mothership_host(msid, domain, examples=examples)}"
