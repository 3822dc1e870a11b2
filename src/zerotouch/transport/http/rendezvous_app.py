"""HTTP adapter of the rendezvous: device calls (CBOR), claims (TTE form/JSON), status."""
from __future__ import annotations

import asyncio
import html
import json
from urllib.parse import parse_qs
from dataclasses import asdict

from aiohttp import web

from ...pki.keys import public_key_pem
from ...protocol.errors import MalformedMessage, ProtocolError
from ...introducer.photo import decode_label_bytes
from ...protocol.tte import TTE_PATH, parse_label
from ...services.rendezvous import RendezvousService
from .common import cbor_route, make_app, read_cbor

MAX_FORM = 4096

_STYLE = """<style>
*{box-sizing:border-box}body{font-family:system-ui,sans-serif;margin:0 auto;padding:1rem;max-width:30rem;
font-size:1.15rem;line-height:1.4}h1{font-size:1.5rem}h2{font-size:1.25rem;margin-top:2rem}
label{display:block;margin-top:1rem;font-weight:600}
input{display:block;width:100%;font-size:1.2rem;padding:.7rem;min-height:3rem;margin-top:.3rem;
border:1px solid #888;border-radius:.4rem}
button{display:block;width:100%;margin-top:1.2rem;font-size:1.2rem;padding:.9rem;min-height:3.2rem;
border:0;border-radius:.4rem;background:#1a5fb4;color:#fff}
.status{padding:.6rem .8rem;border-radius:.4rem;background:#eef}
.warn{padding:.8rem;border-radius:.4rem;background:#fde2e1;border:2px solid #c01c28;color:#600}
.ok{padding:.8rem;border-radius:.4rem;background:#e0f5e0;border:2px solid #26a269}
code{word-break:break-all}small{display:block;margin-top:.3rem;color:#444}</style>"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>{style}</head>
<body>{body}</body></html>"""

_FORM_BODY = """<h1>Claim device {devid}</h1>
{status}
<p>Enter the address of the controller (owner gateway) that will own this device, and the
fingerprint of its key.</p>
<form method="post" action="{action}">
<input type="hidden" name="otp" value="{otp}"><input type="hidden" name="devid" value="{devid}">
<input type="hidden" name="page" value="1">
<label>Controller address <input name="cip" required placeholder="gw.example.com"
 autocapitalize="off" autocorrect="off" spellcheck="false"></label>
<label>Controller port <input name="cport" required inputmode="numeric" pattern="[0-9]{{1,5}}" value="{port}"></label>
<label>Controller key fingerprint (SHA-256, hex) <input name="cfingerprint" required
 autocapitalize="off" autocorrect="off" spellcheck="false" pattern="[0-9A-Fa-f:]{{64,95}}"></label>
<label>Gateway EDHOC key fingerprint (optional; SHA-256, hex) <input name="cedhoc"
 autocapitalize="off" autocorrect="off" spellcheck="false" pattern="[0-9A-Fa-f:]{{64,95}}"
 aria-describedby="cedhoc-help"></label>
<small id="cedhoc-help">For devices that onboard over CoAP with EDHOC: <code>gateway init</code>
prints it. Leave it empty otherwise.</small>
<label>Device rendezvous key K_rv (PSK devices only; 64 hex) <input name="cpsk" type="password"
 autocomplete="off" autocapitalize="off" autocorrect="off" spellcheck="false"
 pattern="[0-9A-Fa-f]{{64}}" aria-describedby="cpsk-help"></label>
<small id="cpsk-help">For devices without public-key crypto (PSK profile): the key derived from the
device's PSK for the rendezvous, never the PSK itself. Leave it empty otherwise.</small>
<button type="submit">Claim</button></form>
{photo}"""

_PHOTO_FORM = """<h2>Or photograph the label</h2>
<form method="post" action="{action}" enctype="multipart/form-data">
<label>Photo of the QR code <input type="file" name="photo" accept="image/*" capture="environment" required></label>
<button type="submit">Read label</button></form>"""

DEFAULT_PORT = 8444
MAX_PHOTO = 16 * 1024 * 1024   # an upload from a phone camera
ALREADY_USED = ("This OTP was already used: the device is already claimed. If you did not "
                "claim it, its label may have been copied (stolen OTP) — do not install it; "
                "ask the manufacturer.")


def _page(title: str, body: str) -> str:
    return _PAGE.format(title=html.escape(title), style=_STYLE, body=body)


def claim_form_page(otp: str, devid: str, *, status_html: str = "", port: int = DEFAULT_PORT) -> str:
    """The phone page for one label: claim form (every value escaped) and a photo upload."""
    e = html.escape
    body = _FORM_BODY.format(devid=e(devid), otp=e(otp), action=e(TTE_PATH), port=int(port),
                             status=status_html, photo=_PHOTO_FORM.format(action=e(TTE_PATH)))
    return _page(f"Claim device {devid}", body)


def _status_html(result) -> str:
    e = html.escape
    text = {"not_mapped": "not claimed yet — ready to be claimed",
            "mapped": "already claimed (mapped to a controller)",
            "registered": "claimed and registered with its owner",
            "revoked": "revoked: this device must not be used"}.get(result.status, result.status)
    line = f'<p class="status">Current status: <b id="status">{e(result.status)}</b> — {e(text)}</p>'
    if result.status != "not_mapped":
        gw = result.extra.get("gateway_url")
        line += (f'<p class="warn" id="warning"><b>Warning:</b> {e(ALREADY_USED)}'
                 + (f"<br>Controller: <code>{e(gw)}</code>" if gw else "") + "</p>")
    return line


def _message_page(title: str, message: str, *, css: str = "warn", extra: str = "") -> str:
    return _page(title, f'<h1>{html.escape(title)}</h1><p class="{css}" id="message">'
                        f'{html.escape(message)}</p>{extra}')


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
            return web.json_response(_result(await service.status(otp_hex=otp, devid_hex=devid,
                                                                  source=request.remote)))
        if len(otp) > 32 or len(devid) > 16:
            raise MalformedMessage("otp or devid is too long")
        return web.Response(text=await _form_with_status(otp, devid, request.remote),
                            content_type="text/html")

    async def _form_with_status(otp: str, devid: str, source: str | None) -> str:
        try:
            status_html = _status_html(await service.status(otp_hex=otp, devid_hex=devid, source=source))
        except ProtocolError as exc:
            status_html = (f'<p class="warn" id="status-error">This label cannot be checked: '
                           f'{html.escape(exc.message)}</p>')
        return claim_form_page(otp, devid, status_html=status_html)

    async def tte_post(request: web.Request) -> web.Response:
        if request.content_type == "multipart/form-data":
            return await photo_post(request)
        # The page's own form (hidden field page=1, or a browser asking for HTML) gets HTML
        # pages; scripts posting the form or JSON get JSON.
        form = request.content_type == "application/x-www-form-urlencoded"
        as_html = form and "text/html" in request.headers.get("Accept", "")
        try:
            data = await read_claim_body(request)
            as_html = as_html or (form and data.get("page") == "1")
            # The draft puts otp/devid in the URL; a form may carry them as fields.
            otp = data.get("otp") or request.query.get("otp", "")
            devid = data.get("devid") or request.query.get("devid", "")
            result = await service.claim(otp_hex=_text(otp, "otp"), devid_hex=_text(devid, "devid"),
                                         cip=_text(data.get("cip", ""), "cip"), cport=data.get("cport", ""),
                                         cfingerprint=_text(data.get("cfingerprint", ""), "cfingerprint"),
                                         cedhoc=_text(data.get("cedhoc", ""), "cedhoc"),
                                         cpsk=_text(data.get("cpsk", ""), "cpsk") or None,
                                         source=request.remote)
        except ProtocolError as exc:
            if not as_html:
                raise
            return _html_error(exc)
        if not as_html:
            return web.json_response(_result(result))
        e = html.escape
        extra = (f'<p>Device <code id="urn">{e(result.urn)}</code><br>fingerprint '
                 f'<code id="fingerprint">{e(result.fingerprint)}</code><br>controller '
                 f'<code>{e(str(result.extra.get("gateway_url", "")))}</code></p>')
        return web.Response(text=_message_page("Device claimed", "The device will find its owner "
                                               "when it is powered on.", css="ok", extra=extra),
                            content_type="text/html")

    async def photo_post(request: web.Request) -> web.Response:
        """A photo of a label, uploaded from the phone page: decoded here, answered with the
        claim form for that label (nothing is claimed yet)."""
        try:
            data = await _read_photo(request)
            loop = asyncio.get_running_loop()
            url = await loop.run_in_executor(None, decode_label_bytes, data)
            label = parse_label(url)
            if "application/json" in request.headers.get("Accept", ""):
                return web.json_response({"label_url": label.url})
            if label.rendezvous.split("://", 1)[1].lower() != (request.host or "").lower():
                link = html.escape(label.url)
                return web.Response(text=_message_page(
                    "Label of another rendezvous", "This device is claimed at another rendezvous:",
                    extra=f'<p><a href="{link}">{link}</a></p>'), content_type="text/html")
            return web.Response(text=await _form_with_status(label.otp, label.devid, request.remote),
                                content_type="text/html")
        except ProtocolError as exc:
            if "text/html" not in request.headers.get("Accept", ""):
                raise  # a script: the JSON error
            return _html_error(exc)

    def _html_error(exc: ProtocolError) -> web.Response:
        headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after is not None else None
        if exc.status == 409:
            page = _message_page("OTP already used", ALREADY_USED)
        else:
            page = _message_page("Not claimed", exc.message)
        return web.Response(text=page, status=exc.status, content_type="text/html", headers=headers)

    async def owner_statuses(request: web.Request) -> web.Response:
        return web.json_response(await service.owner_statuses(await read_cbor(request)))

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
    app.router.add_post("/rv/v1/status", owner_statuses)
    from .box_app import add_box_routes  # here: box_app imports read_claim_body from this module
    add_box_routes(app, service)
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


async def _read_photo(request: web.Request) -> bytes:
    """The `photo` field of a multipart upload, with a hard size bound."""
    if request.content_length is not None and request.content_length > MAX_PHOTO + 4096:
        raise ProtocolError("photo is too large", status=413, code="too_large")
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                raise MalformedMessage("send the photo in a form field named photo")
            if getattr(part, "name", None) != "photo":
                continue
            buf = bytearray()
            while chunk := await part.read_chunk(64 * 1024):
                buf += chunk
                if len(buf) > MAX_PHOTO:
                    raise ProtocolError("photo is too large", status=413, code="too_large")
            if not buf:
                raise MalformedMessage("the photo field is empty")
            return bytes(buf)
    except (ValueError, AssertionError):
        raise MalformedMessage("the upload is not a well-formed multipart form") from None
