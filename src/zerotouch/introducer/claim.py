"""Introducer: claims a device at its rendezvous for an owner, then tells the owner about it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ..protocol.errors import MalformedMessage, ProtocolError
from ..protocol.tte import TTE_PATH, parse_label
from ..transport.http.client import client_ssl_context, post_json


@dataclass
class Owner:
    address: str          # cip
    port: int             # cport
    fingerprint: str      # cfingerprint (hex SHA-256 of the owner key)
    gateway_url: str | None = None
    admin_token: str | None = None
    gateway_ca_pem: str | None = None
    edhoc_fingerprint: str | None = None  # cedhoc: the gateway's EDHOC key (CoAP devices pin it)


class ClaimRefused(ProtocolError):
    pass


def resolve_label(label_or_photo: str) -> str:
    """A label URL as given, or the URL read from the QR code of a photo file (PNG/JPEG)."""
    text = str(label_or_photo).strip()
    if text.lower().startswith("https://") or text.lower().startswith("http://"):
        return parse_label(text).url
    path = Path(text)
    if path.is_file():
        from .photo import decode_label_photo
        return decode_label_photo(path)
    return parse_label(text).url  # its error names what a label URL must look like


async def label_status(label_url: str, *, rendezvous_ca_pem: str | None) -> dict:
    """The device's status at its rendezvous, asked with the label's OTP (TTE §3.2):
    not_mapped, mapped, registered or revoked, with URN and IDevID fingerprint."""
    label = parse_label(label_url)
    url = f"{label.rendezvous}{TTE_PATH}?otp={label.otp}&devid={label.devid}"
    ctx = client_ssl_context(rendezvous_ca_pem)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
        async with s.get(url, headers={"Accept": "application/json"}, ssl=ctx) as resp:
            try:
                body = await resp.json(content_type=None)
            except Exception:
                body = {"message": (await resp.text())[:200]}
            if resp.status != 200:
                msg = body.get("message") if isinstance(body, dict) else str(body)
                raise ClaimRefused(f"rendezvous refused the status query: {msg}", status=resp.status,
                                   code=body.get("error", "refused") if isinstance(body, dict) else "refused")
            return body


def read_device_psk(value: str) -> bytes:
    """A PSK-profile device's PSK for `introducer claim --device-psk`: the path of its
    `psk.secret` (hex), or the hex itself. Errors never repeat what was given."""
    text = str(value or "").strip()
    raw = None
    if len(text) in (32, 64, 96, 128) and all(c in "0123456789abcdefABCDEF" for c in text):
        raw = bytes.fromhex(text)
    else:
        path = Path(text)
        if not path.is_file():
            raise MalformedMessage("--device-psk is neither a readable file nor a PSK in hex "
                                   "(64 hex digits)")
        try:
            content = path.read_text().strip()
            raw = bytes.fromhex(content)
        except (OSError, UnicodeError, ValueError):
            raise MalformedMessage(f"{path} does not hold a PSK in hex (like a device's "
                                   "psk.secret)") from None
    if not 16 <= len(raw) <= 64:
        raise MalformedMessage("a device PSK is 16 to 64 bytes (32 for zerotouch devices)")
    return raw


def rendezvous_key_hex(device_psk: bytes, devid: str) -> str:
    """K_rv for the claim's `cpsk`, derived here: the PSK itself never leaves the introducer."""
    from ..protocol.psk import rendezvous_key
    return rendezvous_key(device_psk, devid).hex()


def _norm_fp(fp: str) -> str:
    return (fp or "").replace(":", "").strip().lower()


async def claim_device(label_url: str, owner: Owner, *, rendezvous_ca_pem: str | None,
                       description: str = "", device_psk: bytes | None = None) -> dict:
    """Claim at the rendezvous (TTE POST), then tell the owner gateway (message 6, notice).

    `device_psk`: for a PSK-profile device, its PSK; the claim carries only K_rv = HKDF(PSK,
    "rendezvous-leg|devid") as `cpsk` (the rendezvous checks it against the manufacturer's
    commitment), never the PSK.

    `label_url` may also be the path of a photo of the label. An OTP that was already used
    raises ClaimRefused with a warning that says whether the device is mapped to this same
    owner (code "already_claimed_by_you": claimed before) or to another one (code
    "already_claimed": a copied label, a stolen OTP)."""
    label = parse_label(resolve_label(label_url))
    status, body = await post_json(
        f"{label.rendezvous}{TTE_PATH}?otp={label.otp}&devid={label.devid}",
        json_body={"cip": owner.address, "cport": owner.port, "cfingerprint": owner.fingerprint,
                   **({"cedhoc": owner.edhoc_fingerprint} if owner.edhoc_fingerprint else {}),
                   **({"cpsk": rendezvous_key_hex(device_psk, label.devid)}
                      if device_psk is not None else {})},
        ca_pem=rendezvous_ca_pem)
    if status == 409:
        current = await label_status(label.url, rendezvous_ca_pem=rendezvous_ca_pem)
        if _norm_fp(current.get("owner_fingerprint", "")) == _norm_fp(owner.fingerprint):
            raise ClaimRefused(
                "WARNING: this OTP was already used — the device is already claimed for THIS "
                f"owner (status {current.get('status')}); you or a colleague claimed it before. "
                "Nothing changed.", status=409, code="already_claimed_by_you")
        raise ClaimRefused(
            "WARNING: this OTP was already used — the device is claimed by ANOTHER owner "
            f"(status {current.get('status')}, controller {current.get('gateway_url', '?')}). "
            "If that was not you, its label may have been copied (stolen OTP): do not "
            "install the device; return it to the manufacturer.",
            status=409, code="already_claimed")
    elif status != 200:
        msg = body.get("message") if isinstance(body, dict) else str(body)
        if device_psk is not None and "cpsk" in str(msg):
            msg = (f"{msg} — the PSK given with --device-psk is not this device's (nothing was "
                   "claimed)")
        raise ClaimRefused(f"rendezvous refused the claim: {msg}", status=status)
    result: dict = {"devid": label.devid, "claim": body}
    if owner.gateway_url and owner.admin_token:
        gstatus, gbody = await post_json(
            f"{owner.gateway_url}/zt/v1/notice",
            json_body={"urn": body.get("urn"), "fingerprint": body.get("fingerprint"),
                       "otp": label.otp, "devid": label.devid, "description": description},
            token=owner.admin_token, ca_pem=owner.gateway_ca_pem)
        if gstatus not in (201, 409):
            msg = gbody.get("message") if isinstance(gbody, dict) else str(gbody)
            raise ClaimRefused(f"owner gateway refused the device: {msg}", status=gstatus)
        result["inventory"] = gbody
    return result
