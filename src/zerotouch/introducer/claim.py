"""Introducer: claims a device at its rendezvous for an owner, then tells the owner about it."""
from __future__ import annotations

from dataclasses import dataclass

from ..protocol.errors import ProtocolError
from ..protocol.tte import TTE_PATH, parse_label
from ..transport.http.client import post_json


@dataclass
class Owner:
    address: str          # cip
    port: int             # cport
    fingerprint: str      # cfingerprint (hex SHA-256 of the owner key)
    gateway_url: str | None = None
    admin_token: str | None = None
    gateway_ca_pem: str | None = None


class ClaimRefused(ProtocolError):
    pass


async def claim_device(label_url: str, owner: Owner, *, rendezvous_ca_pem: str | None,
                       description: str = "") -> dict:
    """Claim at the rendezvous (TTE POST), then register the label in the owner's inventory."""
    label = parse_label(label_url)
    status, body = await post_json(
        f"{label.rendezvous}{TTE_PATH}?otp={label.otp}&devid={label.devid}",
        json_body={"cip": owner.address, "cport": owner.port, "cfingerprint": owner.fingerprint},
        ca_pem=rendezvous_ca_pem)
    if status == 409:
        raise ClaimRefused("WARNING: this OTP was already used — the device is claimed by someone. "
                           "If that was not you, its label may have been copied (stolen OTP).",
                           status=409, code="already_claimed")
    if status != 200:
        msg = body.get("message") if isinstance(body, dict) else str(body)
        raise ClaimRefused(f"rendezvous refused the claim: {msg}", status=status)
    result = {"claim": body}
    if owner.gateway_url and owner.admin_token:
        gstatus, gbody = await post_json(
            f"{owner.gateway_url}/zt/v1/inventory",
            json_body={"label_url": label.url, "description": description},
            token=owner.admin_token, ca_pem=owner.gateway_ca_pem)
        if gstatus not in (201, 409):
            msg = gbody.get("message") if isinstance(gbody, dict) else str(gbody)
            raise ClaimRefused(f"owner gateway refused the device: {msg}", status=gstatus)
        result["inventory"] = gbody
    return result
