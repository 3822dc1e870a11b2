"""The owner gateway's inventory and its conversation with the rendezvous (TTE messages 6-8):
devices registered from labels, a CSV or an introducer's notice; status queries for devices
not heard from. Mixed into GatewayService (services/gateway.py), which onboards them."""
from __future__ import annotations

import csv
import io
import json
import logging
import re
import time
from typing import Awaitable, Callable

from ..protocol.errors import Conflict, MalformedMessage, ProtocolError
from ..protocol.states import InventoryState
from ..protocol.tte import parse_label
from ..storage.base import InventoryRecord

log = logging.getLogger(__name__)
MAX_CSV_ROWS = 100_000
STATUS_QUERY_TYPE = "zt-rv-status-query/1"   # the rendezvous' owner status query (messages 7/8)
_HEX = re.compile(r"[0-9a-f]+")

StatusQuery = Callable[[bytes], Awaitable[dict]]   # signed query -> the rendezvous' JSON answer


def rendezvous_status_client(rendezvous_url: str, ca_pem: str | None) -> StatusQuery:
    """Sends a signed owner status query to the rendezvous (POST /rv/v1/status)."""
    async def query(body: bytes) -> dict:
        from ..transport.http.client import post_cbor
        status, raw = await post_cbor(f"{rendezvous_url}/rv/v1/status", body, ca_pem=ca_pem)
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if status != 200 or not isinstance(data, dict):
            msg = data.get("message") if isinstance(data, dict) else raw[:200].decode("utf-8", "replace")
            raise ProtocolError(f"rendezvous refused the status query: HTTP {status} {msg}",
                                status=502, code="rendezvous")
        return data
    return query


class InventoryIntake:
    """Needs self.store, self.vault, self.cfg (GatewayConfig) and self.query_rendezvous."""

    # --- inventory ----------------------------------------------------------------------
    async def register_label(self, label_url: str, description: str = "") -> InventoryRecord:
        label = parse_label(label_url)
        return await self._register(label.devid, label.otp_bytes, description)

    async def notice(self, data: dict) -> InventoryRecord:
        """Message 6, the introducer's controller notice: `{urn, fingerprint, otp, devid,
        description}` or `{label_url, description}`. The OTP is N_device, so the device is
        registered exactly as from its label; the IDevID fingerprint, when given, is kept and
        a device presenting another certificate is refused at hello."""
        if not isinstance(data, dict):
            raise MalformedMessage("notice must be a JSON object")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise MalformedMessage("description must be a string")
        fp = None
        if data.get("label_url") is not None:
            if not isinstance(data["label_url"], str):
                raise MalformedMessage("label_url must be a string")
            label = parse_label(data["label_url"])
            serial, otp = label.devid, label.otp_bytes
        else:
            devid, otp_hex = data.get("devid"), data.get("otp")
            if not isinstance(devid, str) or len(devid) != 8 or not _HEX.fullmatch(devid.lower()):
                raise MalformedMessage("notice needs devid (8 hex digits) or a label_url")
            if not isinstance(otp_hex, str) or len(otp_hex) != 16 or not _HEX.fullmatch(otp_hex.lower()):
                raise MalformedMessage("notice needs otp (16 hex digits) or a label_url")
            serial, otp = devid.lower(), bytes.fromhex(otp_hex)
        if data.get("fingerprint") is not None:
            f = data["fingerprint"]
            f = f.replace(":", "").lower() if isinstance(f, str) else ""
            if len(f) != 64 or not _HEX.fullmatch(f):
                raise MalformedMessage("fingerprint must be the 64-hex-digit SHA-256 of the IDevID")
            fp = bytes.fromhex(f)
        urn = data.get("urn")
        if urn is not None and (not isinstance(urn, str) or len(urn) > 256
                                or not urn.lower().endswith(serial)):
            raise MalformedMessage(f"urn does not name device {serial}")
        return await self._register(serial, otp, description, idevid_fp=fp)

    async def _register(self, serial: str, n_device: bytes, description: str,
                        idevid_fp: bytes | None = None) -> InventoryRecord:
        if len(description) > 256:
            raise MalformedMessage("description is longer than 256 characters")
        rec = InventoryRecord(serial=serial, description=description, idevid_fp=idevid_fp,
                              created_at=self.cfg.clock())
        # The row first: whoever loses a race gets Conflict before touching the vault, so a
        # second registration can never overwrite the N_device of the first.
        if not await self.store.inventory.add(rec):
            raise Conflict(f"device {serial} is already in the inventory")
        try:
            await self.vault.put_device_secret(serial, n_device)
        except BaseException:
            await self.store.inventory.remove(serial)
            raise
        return rec

    async def register_csv(self, text: str) -> list[InventoryRecord]:
        """CSV with a header: `label_url[,description]`. All rows are checked before any is stored."""
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "label_url" not in reader.fieldnames:
            raise MalformedMessage("CSV needs a header row with a label_url column")
        rows, seen = [], set()
        try:
            for count, row in enumerate(reader, start=1):
                lineno = reader.line_num  # the physical line, whatever blank or multi-line rows came before
                if count > MAX_CSV_ROWS:
                    raise MalformedMessage(f"CSV has more than {MAX_CSV_ROWS} rows")
                try:
                    label = parse_label(row.get("label_url") or "")
                except MalformedMessage as exc:
                    raise MalformedMessage(f"CSV line {lineno}: {exc.message}") from None
                desc = (row.get("description") or "").strip()
                if len(desc) > 256:
                    raise MalformedMessage(f"CSV line {lineno}: description is longer than 256 characters")
                if label.devid in seen or await self.store.inventory.get(label.devid):
                    raise Conflict(f"CSV line {lineno}: device {label.devid} is already in the inventory")
                seen.add(label.devid)
                rows.append((label, desc))
        except csv.Error as exc:
            raise MalformedMessage(f"CSV line {reader.line_num}: {exc}") from None
        # Every row is valid; if storing still fails (a race, the vault away), undo the rows
        # already stored so an upload is all or nothing.
        done: list[InventoryRecord] = []
        try:
            for lb, desc in rows:
                done.append(await self._register(lb.devid, lb.otp_bytes, desc))
        except BaseException:
            for rec in done:
                await self.store.inventory.remove(rec.serial)
            raise
        return done

    # --- status at the rendezvous (messages 7/8) -------------------------------------------
    async def query_statuses(self, serials: list[str] | None = None) -> list[dict]:
        """Ask the rendezvous for the status of devices the gateway has not heard from
        (default: every inventory device not onboarded or revoked). The query is signed with
        the owner key; the rendezvous answers only for devices mapped to that key (others come
        back "unknown"). The answer is recorded in the device's last_error column (no status
        column exists) unless that holds a real error, and returned."""
        if self.query_rendezvous is None:
            raise ProtocolError("no rendezvous is configured for this gateway", status=503,
                                code="no_rendezvous")
        inventory = {r.serial: r for r in await self.store.inventory.list(limit=100_000)}
        if serials is None:
            serials = [s for s, r in inventory.items()
                       if r.state in (InventoryState.EXPECTED, InventoryState.ONBOARDING)]
        out: list[dict] = []
        now = self.cfg.clock()
        for i in range(0, len(serials), 1000):
            chunk = serials[i:i + 1000]
            payload = json.dumps({"type": STATUS_QUERY_TYPE, "time": int(now),
                                  "serials": chunk}).encode()
            answer = await self.query_rendezvous(await self.vault.sign(payload))
            found = {d["serial"]: d for d in answer.get("devices", []) if isinstance(d, dict)}
            for serial in chunk:
                status = str(found.get(serial, {}).get("status", "unknown"))
                inv = inventory.get(serial)
                out.append({"serial": serial, "rendezvous_status": status,
                            "state": inv.state.value if inv else None,
                            "description": inv.description if inv else ""})
                if inv and (inv.last_error is None or inv.last_error.startswith("rendezvous status:")):
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
                    await self.store.inventory.update(
                        serial, last_error=f"rendezvous status: {status} (asked {stamp})")
        return out

    async def _mapped_to_us(self, serial: str) -> bool:
        if self.query_rendezvous is None:
            return False
        try:
            found = await self.query_statuses([serial])
        except Exception as exc:  # the rendezvous away: refuse as before, the device retries
            log.info("admission any: status query for %s failed: %s", serial, exc)
            return False
        return bool(found) and found[0]["rendezvous_status"] in ("mapped", "registered")


async def gateway_status(directory, as_json: bool = False) -> int:
    """`zerotouch gateway status --dir DIR`: the rendezvous' status of every device the
    gateway has not heard from (messages 7/8)."""
    from pathlib import Path
    from .roles import build_gateway
    gw = await build_gateway(Path(directory))
    try:
        url = gw.config.get("rendezvous_url")
        if not url:
            print("this gateway has no rendezvous configured (gateway init --rendezvous-info)")
            return 2
        gw.service.query_rendezvous = rendezvous_status_client(url, gw.config.get("rendezvous_tls_ca_pem"))
        try:
            rows = await gw.service.query_statuses()
        except ProtocolError as exc:
            print(f"refused: {exc.message}")
            return 1
    finally:
        await gw.close()
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("every device in the inventory has reached the gateway (or is revoked)")
    else:
        print(f"{'serial':10} {'inventory':11} {'rendezvous':11} description")
        for r in rows:
            print(f"{r['serial']:10} {r['state'] or '-':11} {r['rendezvous_status']:11} {r['description']}")
    return 0
