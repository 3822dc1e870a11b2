"""Transitive Trust Enrollment label URL: https://<rendezvous>/.well-known/tte?otp=<16 hex>&devid=<8 hex>."""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit

from .errors import MalformedMessage

TTE_PATH = "/.well-known/tte"
_HEX = re.compile(r"[0-9a-f]+")


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


def parse_label(url: str) -> Label:
    """Strictly parse a label URL; raises MalformedMessage with a readable reason."""
    if not isinstance(url, str) or len(url) > 512:
        raise MalformedMessage("label URL is missing or too long")
    parts = urlsplit(url.strip())
    if parts.scheme != "https" or not parts.netloc:
        raise MalformedMessage("label URL must be an https:// URL")
    if parts.path.rstrip("/") != TTE_PATH:
        raise MalformedMessage(f"label URL path must be {TTE_PATH}")
    query = parse_qs(parts.query, keep_blank_values=True)
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
