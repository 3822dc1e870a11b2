"""HTTP adapter of the rendezvous: device calls (CBOR), claims (TTE form/JSON), status."""
from __future__ import annotations

import html
import json
from urllib.parse import parse_qs
from dataclasses import asdict

from aiohttp import web

from ...pki.keys import public_key_pem
from ...protocol.errors import MalformedMessage, ProtocolError
from ...protocol.tte import TTE_PATH
from ...services.rendezvous import RendezvousService
from .common import cbor_route, make_app, read_cbor

MAX_FORM = 4096

_FORM = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Claim device {devid}</title>
<style>body{{font-family:system-ui,sans-serif;margin:1rem;max-width:32rem}}
label{{display:block;margin-top:.8rem}}input{{width:100%;font-size:1.1rem;padding:.4rem;box-sizing:border-box}}
button{{margin-top:1rem;font-size:1.1rem;padding:.6rem 1.2rem}}</style></head>
<body><h1>Claim device {devid}</h1>
<p>Enter the address of the controller (owner gateway) that will own this device, and the
fingerprint of its key.</p>
<form method="post" action="{action}">
<input type="hidden" name="otp" value="{otp}"><input type="hidden" name="devid" value="{devid}">
<label>Controller address <input name="cip" required placeholder="gw.example.com"></label>
<label>Controller port <input name="cport" required inputmode="numeric" value="8444"></label>
<label>Controller key fingerprint (SHA-256, hex) <input name="cfingerprint" required></label>
<button type="submit">Claim</button></form></body></html>"""


def _result(r) -> dict:
    d = asdict(r)
    extra = d.pop("extra")
    d.update(extra)
    return d


def rendezvous_app(service: RendezvousService, public_info: dict | None = None) -> web.Application:
    app = make_app()

    async def tte_get(request: web.Request) -> web.Response:
        otp, devid = request.query.get("otp", ""), request.query.get("devid", "")
        wants_json = "application/json" in request.headers.get("Accept", "") or request.query.get("format") == "json"
        if wants_json:
            return web.json_response(_result(await service.status(otp_hex=otp, devid_hex=devid)))
        if len(otp) > 32 or len(devid) > 16:
            raise MalformedMessage("otp or devid is too long")
        page = _FORM.format(devid=html.escape(devid), otp=html.escape(otp), action=html.escape(TTE_PATH))
        return web.Response(text=page, content_type="text/html")

    async def tte_post(request: web.Request) -> web.Response:
        data = await read_claim_body(request)
        # The draft puts otp/devid in the URL; a form may carry them as fields.
        otp = data.get("otp") or request.query.get("otp", "")
        devid = data.get("devid") or request.query.get("devid", "")
        result = await service.claim(otp_hex=_text(otp, "otp"), devid_hex=_text(devid, "devid"),
                                     cip=_text(data.get("cip", ""), "cip"), cport=data.get("cport", ""),
                                     cfingerprint=_text(data.get("cfingerprint", ""), "cfingerprint"))
        return web.json_response(_result(result))

    async def register(request: web.Request) -> web.Response:
        rec = await service.register(await read_cbor(request))
        return web.json_response({"serial": rec.serial, "status": rec.status.value}, status=201)

    async def registered(request: web.Request) -> web.Response:
        await service.registered(await read_cbor(request))
        return web.Response(status=204)

    async def info(_request: web.Request) -> web.Response:
        body = dict(public_info or {})
        body["key_pem"] = public_key_pem(service.public_key).decode()
        return web.json_response(body)

    app.router.add_get(TTE_PATH, tte_get)
    app.router.add_post(TTE_PATH, tte_post)
    app.router.add_post("/rv/v1/devices", register)
    app.router.add_post("/rv/v1/find-owner", cbor_route(service.find_owner))
    app.router.add_post("/rv/v1/registered", registered)
    app.router.add_get("/rv/v1/info", info)
    return app


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise MalformedMessage(f"{name} must be a string")
    return value


async def read_claim_body(request: web.Request) -> dict:
    """A claim as JSON or an HTML form, read with a hard size bound (chunked bodies included)."""
    if request.content_length is not None and request.content_length > MAX_FORM:
        raise MalformedMessage("claim is too large")
    raw = await request.content.read(MAX_FORM + 1)
    if len(raw) > MAX_FORM:
        raise MalformedMessage("claim is too large")
    try:
        text = raw.decode(request.charset or "utf-8")
    except (LookupError, UnicodeError):
        raise MalformedMessage("claim body is not JSON or form text in a known character set") from None
    if request.content_type == "application/json":
        try:
            data = json.loads(text)
        except ValueError:
            raise MalformedMessage("claim body is not JSON") from None
        if not isinstance(data, dict):
            raise MalformedMessage("claim body must be a JSON object")
        return data
    if request.content_type != "application/x-www-form-urlencoded":
        raise ProtocolError("send the claim as application/json or an HTML form",
                            status=415, code="media_type")
    try:
        fields = parse_qs(text, keep_blank_values=True, strict_parsing=False, max_num_fields=16)
    except ValueError:
        raise MalformedMessage("claim form is malformed") from None
    if any(len(v) != 1 for v in fields.values()):
        raise MalformedMessage("each claim field may appear once")
    return {k: v[0] for k, v in fields.items()}
