"""Introducer: claims a device at its rendezvous for an owner, then tells the owner about it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ..protocol.errors import ProtocolError
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


def _norm_fp(fp: str) -> str:
    return (fp or "").replace(":", "").strip().lower()


async def claim_device(label_url: str, owner: Owner, *, rendezvous_ca_pem: str | None,
                       description: str = "") -> dict:
    """Claim at the rendezvous (TTE POST), then tell the owner gateway (message 6, notice).

    `label_url` may also be the path of a photo of the label. An OTP that was already used
    raises ClaimRefused with a warning that says whether the device is mapped to this same
    owner (code "already_claimed_by_you": claimed before) or to another one (code
    "already_claimed": a copied label, a stolen OTP)."""
    label = parse_label(resolve_label(label_url))
    status, body = await post_json(
        f"{label.rendezvous}{TTE_PATH}?otp={label.otp}&devid={label.devid}",
        json_body={"cip": owner.address, "cport": owner.port, "cfingerprint": owner.fingerprint,
                   **({"cedhoc": owner.edhoc_fingerprint} if owner.edhoc_fingerprint else {})},
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
        raise ClaimRefused(f"rendezvous refused the claim: {msg}", status=status)
    result: dict = {"claim": body}
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
