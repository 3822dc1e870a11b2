"""Bulk boxes (TTE §5.2): one label for a box of devices, and per-device keys for PSK mode (§5.3).

A box is a master secret (128 random bits or more) and a Device ID range [first, last]. Each
device's OTP is HMAC-SHA256(master, "zt-box-otp|" || devid as 4 bytes big-endian)[:8]; its PSK is
HKDF-SHA256(master, info "zt-box-psk|" || devid, 32 bytes). The rendezvous still stores only a
salted hash of each OTP; claiming the box claims every device in it in one step.

Box label URL: https://<rendezvous>/.well-known/tte/box?master=<hex>&first=<8 hex>&last=<8 hex>
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import segno
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..protocol.errors import (Conflict, MalformedMessage, NotAuthorized, NotFound,
                               ProtocolError)
from ..protocol.psk import rendezvous_key
from ..protocol.tte import TTE_PATH, Label
from ..util.files import atomic_write
from .manufacturer import MadeDevice, Manufacturer, RendezvousInfo
from .rendezvous import RendezvousService, parse_edhoc_fingerprint, parse_owner_address

DEVICE_PSK_FILE = "psk.secret"   # = transport.coap.security.DEVICE_PSK_FILE (no aiocoap import here)

BOX_PATH = f"{TTE_PATH}/box"
MAX_BOX = 10_000                 # devices in one box
MIN_MASTER = 16                  # bytes (128 bits)
MAX_MASTER = 64
OTP_INFO = b"zt-box-otp|"
PSK_INFO = b"zt-box-psk|"
PSK_LEN = 32
_HEX = re.compile(r"[0-9a-f]+")


def _devid_bytes(devid: str | int) -> bytes:
    if isinstance(devid, str):
        if len(devid) != 8 or not _HEX.fullmatch(devid.lower()):
            raise MalformedMessage("devid must be 8 hex digits")
        devid = int(devid, 16)
    if not isinstance(devid, int) or isinstance(devid, bool) or not 0 <= devid <= 0xFFFFFFFF:
        raise MalformedMessage("devid must be a 32-bit number")
    return devid.to_bytes(4, "big")


def derive_otp(master: bytes, devid: str | int) -> bytes:
    """The device's 8-byte OTP (N_device): HMAC-SHA256(master, "zt-box-otp|" || devid)[:8]."""
    return hmac.new(master, OTP_INFO + _devid_bytes(devid), hashlib.sha256).digest()[:8]


def derive_psk(master: bytes, devid: str | int) -> bytes:
    """The device's 32-byte pre-shared key for PSK mode: HKDF-SHA256, its own info string."""
    return HKDF(algorithm=hashes.SHA256(), length=PSK_LEN, salt=None,
                info=PSK_INFO + _devid_bytes(devid)).derive(master)


@dataclass(frozen=True)
class BoxLabel:
    rendezvous: str   # scheme://host[:port]
    master: str       # lowercase hex, 32..128 digits
    first: str        # 8 lowercase hex digits
    last: str         # 8 lowercase hex digits

    @property
    def url(self) -> str:
        return f"{self.rendezvous}{BOX_PATH}?" + urlencode(
            {"master": self.master, "first": self.first, "last": self.last})

    @property
    def master_bytes(self) -> bytes:
        return bytes.fromhex(self.master)

    @property
    def count(self) -> int:
        return int(self.last, 16) - int(self.first, 16) + 1

    def devids(self) -> list[str]:
        return [f"{i:08x}" for i in range(int(self.first, 16), int(self.last, 16) + 1)]

    def otp(self, devid: str) -> str:
        return derive_otp(self.master_bytes, devid).hex()

    def device_label(self, devid: str) -> Label:
        """The single-device TTE label of one device of the box."""
        return Label(rendezvous=self.rendezvous, devid=devid, otp=self.otp(devid))


def box_from_fields(master, first, last, rendezvous: str = "") -> BoxLabel:
    """Validate a box's fields (from a URL, a form or JSON); MalformedMessage says what is wrong."""
    for name, value in (("master", master), ("first", first), ("last", last)):
        if not isinstance(value, str):
            raise MalformedMessage(f"box {name} must be a string")
    master, first, last = master.strip().lower(), first.strip().lower(), last.strip().lower()
    if (len(master) % 2 or not MIN_MASTER * 2 <= len(master) <= MAX_MASTER * 2
            or not _HEX.fullmatch(master)):
        raise MalformedMessage(f"box master must be {MIN_MASTER * 2} to {MAX_MASTER * 2} hex digits "
                               "(an even number)")
    for name, value in (("first", first), ("last", last)):
        if len(value) != 8 or not _HEX.fullmatch(value):
            raise MalformedMessage(f"box {name} must be 8 hex digits")
    lo, hi = int(first, 16), int(last, 16)
    if lo > hi:
        raise MalformedMessage("box first Device ID is greater than its last")
    if lo == 0:
        raise MalformedMessage("Device ID 00000000 is reserved for examples")
    if hi - lo + 1 > MAX_BOX:
        raise MalformedMessage(f"a box holds at most {MAX_BOX} devices, not {hi - lo + 1}")
    return BoxLabel(rendezvous=rendezvous, master=master, first=first, last=last)


def parse_box_label(url: str) -> BoxLabel:
    """Strictly parse a box label URL; raises MalformedMessage with a readable reason."""
    if not isinstance(url, str) or len(url) > 512:
        raise MalformedMessage("box label URL is missing or too long")
    parts = urlsplit(url.strip())
    if parts.scheme != "https" or not parts.netloc:
        raise MalformedMessage("box label URL must be an https:// URL")
    if parts.path.rstrip("/") != BOX_PATH:
        raise MalformedMessage(f"box label URL path must be {BOX_PATH}")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True, max_num_fields=8)
    except ValueError:
        raise MalformedMessage("box label URL query is malformed") from None
    if set(query) != {"master", "first", "last"} or any(len(v) != 1 for v in query.values()):
        raise MalformedMessage("box label URL must have exactly one master, first and last")
    return box_from_fields(query["master"][0], query["first"][0], query["last"][0],
                           rendezvous=f"{parts.scheme}://{parts.netloc}")


def write_box_label(box: BoxLabel, labels_dir: Path) -> dict[str, Path]:
    """The box label as text, PNG and SVG QR codes with error correction H."""
    labels_dir = Path(labels_dir)
    labels_dir.mkdir(parents=True, exist_ok=True)
    stem = f"box-{box.first}-{box.last}"
    qr = segno.make(box.url, error="h", micro=False)
    paths = {ext: labels_dir / f"{stem}.{ext}" for ext in ("txt", "png", "svg")}
    atomic_write(paths["txt"], (box.url + "\n").encode(), mode=0o600)
    qr.save(str(paths["png"]), scale=6, border=4)
    qr.save(str(paths["svg"]), scale=4, border=4)
    return paths


# --- the manufacturer's side ------------------------------------------------------------------
@dataclass
class MadeBox:
    label: BoxLabel
    devices: list[MadeDevice]
    paths: dict[str, Path]


def _free_range(devices_dir: Path, count: int) -> int:
    """A random start of `count` consecutive Device IDs, none of them made here before."""
    for _ in range(1000):
        start = int.from_bytes(os.urandom(4), "big")
        if start == 0 or start + count - 1 > 0xFFFFFFFF:
            continue
        if not any((devices_dir / f"{i:08x}").exists() for i in range(start, start + count)):
            return start
    raise RuntimeError("no free Device ID range found")


def make_box(manufacturer: Manufacturer, out_dir: Path, rendezvous_info: RendezvousInfo,
             count: int, *, identity: str = "software", master: bytes | None = None) -> MadeBox:
    """Make `count` devices with consecutive Device IDs and derived OTPs; print one box label
    (in OUT_DIR/labels/box-<first>-<last>.*). Registrations are in `devices[i].registration`."""
    if not 1 <= count <= MAX_BOX:
        raise ValueError(f"a box holds 1 to {MAX_BOX} devices")
    master = master if master is not None else os.urandom(MIN_MASTER)
    if not MIN_MASTER <= len(master) <= MAX_MASTER:
        raise ValueError(f"master secret must be {MIN_MASTER} to {MAX_MASTER} bytes")
    out_dir = Path(out_dir)
    devices_dir = out_dir / "devices"
    devices_dir.mkdir(parents=True, exist_ok=True)
    start = _free_range(devices_dir, count)
    box = BoxLabel(rendezvous=rendezvous_info.url, master=master.hex(), first=f"{start:08x}",
                   last=f"{start + count - 1:08x}")
    if identity == "psk":   # the PSK profile: no IDevID, symmetric crypto only
        devices = [manufacturer.make_psk_device(out_dir, rendezvous_info, devid=devid,
                                                otp=derive_otp(master, devid),
                                                psk=derive_psk(master, devid))
                   for devid in box.devids()]
    else:
        devices = [manufacturer.make_device(out_dir, rendezvous_info, identity=identity,
                                            devid=devid, otp=derive_otp(master, devid))
                   for devid in box.devids()]
    for dev in devices:   # PSK mode (`--coap-security oscore-psk`): the box's derived key
        atomic_write(dev.device_dir / DEVICE_PSK_FILE, derive_psk(master, dev.serial).hex().encode(),
                     mode=0o600)
    return MadeBox(label=box, devices=devices, paths=write_box_label(box, out_dir / "labels"))


async def make_box_cli(directory: Path, rendezvous_info: Path, *, count: int, identity: str,
                       register: bool) -> int:
    """`zerotouch box make`: make the box, register its devices, print the box label URL."""
    from .admin import register_devices
    info = RendezvousInfo.load(rendezvous_info)
    made = make_box(Manufacturer(directory), directory, info, count, identity=identity)
    failed = 0
    if register:
        results = await register_devices(info, [d.registration for d in made.devices])
        for dev, (status, body) in zip(made.devices, results):
            if status != 201:
                failed += 1
                print(f"{dev.serial}: rendezvous refused registration ({status}): {body[:200]!r}")
    print(f"box {made.label.first}-{made.label.last} ({made.label.count} devices): "
          f"{made.paths['png']}")
    print(made.label.url)
    return 1 if failed else 0


# --- the rendezvous' side ---------------------------------------------------------------------
@dataclass
class DeviceOutcome:
    devid: str
    status: int          # 200 claimed; 409 already claimed; 410 revoked; 429 locked ...
    outcome: str         # "claimed" or the error code
    urn: str = ""
    fingerprint: str = ""
    message: str = ""


@dataclass
class BoxClaimResult:
    first: str
    last: str
    devices: list[DeviceOutcome] = field(default_factory=list)

    @property
    def claimed(self) -> list[str]:
        return [d.devid for d in self.devices if d.status == 200]

    @property
    def conflicts(self) -> list[str]:
        return [d.devid for d in self.devices if d.status == 409]

    def to_json(self) -> dict:
        return {"first": self.first, "last": self.last, "count": len(self.devices),
                "claimed": len(self.claimed), "conflicts": len(self.conflicts),
                "failed": len(self.devices) - len(self.claimed),
                "devices": [d.__dict__ for d in self.devices]}


async def claim_box(rendezvous: RendezvousService, box: BoxLabel | str, cip: str, cport,
                    cfingerprint: str, *, source: str | None = None,
                    cedhoc: str | None = None) -> BoxClaimResult:
    """Claim every device of the box for one owner in one step.

    First, for all devices, check (without claiming) that each is registered and that the
    derived OTP matches; any failure refuses the whole box and claims nothing (a wrong OTP
    counts as a failed attempt for that device, as a single claim does). Then claim each one:
    a device already claimed (409), revoked (410) or locked (429) is reported, the others are
    claimed. `source`: the client address, for the rendezvous' per-source limit on wrong OTPs
    (passed on only when given). `cedhoc`: the gateway's EDHOC key fingerprint, as in a single
    claim, signed into every device's redirect."""
    if isinstance(box, str):
        box = parse_box_label(box)
    parse_owner_address(cip, cport, cfingerprint)   # a bad owner address claims nothing
    parse_edhoc_fingerprint(cedhoc)                  # nor does a bad cedhoc
    edhoc = {"cedhoc": cedhoc} if cedhoc else {}
    master = box.master_bytes
    otps = {devid: derive_otp(master, devid).hex() for devid in box.devids()}
    src = {"source": source} if source is not None else {}
    locked: dict[str, ProtocolError] = {}
    for devid, otp in otps.items():
        try:
            await rendezvous.status(otp_hex=otp, devid_hex=devid, **src)
        except NotFound:
            raise NotFound(f"device {devid} of box {box.first}-{box.last} is not registered "
                           "here: nothing was claimed") from None
        except NotAuthorized:
            raise NotAuthorized(f"the box master does not match device {devid}: nothing was "
                                "claimed") from None
        except ProtocolError as exc:
            if exc.code != "locked":
                raise   # e.g. this source is rate-limited: the whole box waits
            locked[devid] = exc   # too many wrong guesses on it: report it, claim the rest
    result = BoxClaimResult(first=box.first, last=box.last)
    for devid, otp in otps.items():
        if devid in locked:
            exc = locked[devid]
            result.devices.append(DeviceOutcome(devid, exc.status, exc.code, message=exc.message))
            continue
        # PSK devices: the rendezvous gets K_rv (derived, never the PSK); others ignore it.
        k_rv = rendezvous_key(derive_psk(master, devid), devid).hex()
        try:
            r = await rendezvous.claim(otp_hex=otp, devid_hex=devid, cip=cip, cport=cport,
                                       cfingerprint=cfingerprint, cpsk=k_rv, **src, **edhoc)
        except Conflict as exc:
            result.devices.append(DeviceOutcome(devid, 409, "already_claimed", message=exc.message))
        except ProtocolError as exc:
            result.devices.append(DeviceOutcome(devid, exc.status, exc.code, message=exc.message))
        else:
            result.devices.append(DeviceOutcome(devid, 200, "claimed", urn=r.urn,
                                                fingerprint=r.fingerprint))
    return result


def box_psks(box: BoxLabel, devids) -> dict[str, bytes]:
    """The PSKs of some devices of a box (for the owner gateway's psk.json)."""
    master = box.master_bytes
    return {d: derive_psk(master, d) for d in devids}


# --- the introducer's side --------------------------------------------------------------------
async def claim_box_remote(box_url: str, owner, *, rendezvous_ca_pem: str | None,
                           description: str = "", concurrency: int = 16) -> dict:
    """POST the box claim to its rendezvous; with the owner's admin access (`introducer.claim.Owner`
    with gateway_url and admin_token), also add each claimed device's label to the inventory."""
    import aiohttp

    from ..introducer.claim import ClaimRefused
    from ..transport.http.client import client_ssl_context, post_json
    box = parse_box_label(box_url)
    status, body = await post_json(
        f"{box.rendezvous}{BOX_PATH}",
        json_body={"master": box.master, "first": box.first, "last": box.last,
                   "cip": owner.address, "cport": owner.port, "cfingerprint": owner.fingerprint,
                   **({"cedhoc": owner.edhoc_fingerprint} if owner.edhoc_fingerprint else {})},
        ca_pem=rendezvous_ca_pem, timeout=120.0)
    if status != 200 or not isinstance(body, dict):
        msg = body.get("message") if isinstance(body, dict) else str(body)
        raise ClaimRefused(f"rendezvous refused the box claim: {msg}", status=status)
    result = {"claim": body}
    if owner.gateway_url and owner.admin_token:
        claimed = [d["devid"] for d in body.get("devices", []) if d.get("status") == 200]
        sem = asyncio.Semaphore(concurrency)
        ctx = client_ssl_context(owner.gateway_ca_pem)
        desc = description or f"box {box.first}-{box.last}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async def one(devid: str) -> tuple[str, int]:
                async with sem:
                    async with s.post(f"{owner.gateway_url}/zt/v1/inventory", ssl=ctx,
                                      json={"label_url": box.device_label(devid).url,
                                            "description": desc},
                                      headers={"Authorization": f"Bearer {owner.admin_token}"}) as r:
                        return devid, r.status
            statuses = await asyncio.gather(*(one(d) for d in claimed))
        refused = {d: st for d, st in statuses if st not in (201, 409)}
        result["inventory"] = {"added": sum(1 for _d, st in statuses if st == 201),
                               "already_present": sum(1 for _d, st in statuses if st == 409),
                               "refused": refused}
        if refused:
            raise ClaimRefused(f"owner gateway refused {len(refused)} device(s) of the box: "
                               f"{sorted(refused)[:5]}", status=502)
    return result
