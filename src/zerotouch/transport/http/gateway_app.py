"""HTTP adapter of the owner gateway: device onboarding (CBOR), inventory admin (JSON/CSV), EST."""
from __future__ import annotations

import hmac
import json
from dataclasses import asdict
from typing import Sequence

from aiohttp import web

from ...protocol.errors import MalformedMessage, NotAuthorized, ProtocolError
from ...services.gateway import GatewayService
from .common import cbor_route, make_app

MAX_ADMIN_BODY = 1024 * 1024  # the app's client_max_size: ~8,000 labels per CSV upload


def _inv(rec) -> dict:
    d = asdict(rec)
    d["state"] = rec.state.value
    d["idevid_fp"] = rec.idevid_fp.hex() if rec.idevid_fp else None
    return d


def gateway_app(service: GatewayService, *, admin_token: str, est_service=None,
                trusted_proxies: Sequence[str] = (), revocation=None) -> web.Application:
    """`est_service`: also serve EST at /.well-known/est/ (`trusted_proxies` may forward a
    client certificate in a header); `revocation`: also serve the CRL at /crl."""
    app = make_app()
    if est_service is not None:
        from .est_app import add_est_routes
        add_est_routes(app, est_service, trusted_proxies=list(trusted_proxies))
    if revocation is not None:
        from .crl_app import add_crl_routes
        add_crl_routes(app, revocation)

    def require_admin(request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        # surrogateescape: a header with non-UTF-8 bytes is simply a wrong token, not a crash
        if not (scheme.lower() == "bearer" and hmac.compare_digest(
                token.encode("utf-8", "surrogateescape"), admin_token.encode())):
            raise NotAuthorized("admin token required (Authorization: Bearer ...)", status=401,
                                code="unauthorized")

    async def inventory_add(request: web.Request) -> web.Response:
        require_admin(request)
        if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
            raise ProtocolError("inventory upload is too large", status=413, code="too_large")
        raw = await request.content.read(MAX_ADMIN_BODY + 1)
        if len(raw) > MAX_ADMIN_BODY:
            raise ProtocolError("inventory upload is too large", status=413, code="too_large")
        try:
            text = raw.decode(request.charset or "utf-8")
        except (LookupError, UnicodeError):
            raise MalformedMessage("upload is not UTF-8 text: send JSON {label_url, description} "
                                   "or text/csv in UTF-8") from None
        if request.content_type == "text/csv":
            recs = await service.register_csv(text)
        else:
            try:
                data = json.loads(text)
            except ValueError:
                raise MalformedMessage("send JSON {label_url, description} or text/csv") from None
            if not isinstance(data, dict) or not isinstance(data.get("label_url"), str):
                raise MalformedMessage("JSON body needs a label_url string")
            recs = [await service.register_label(data["label_url"], str(data.get("description", "")))]
        return web.json_response({"added": [_inv(r) for r in recs]}, status=201)

    async def inventory_list(request: web.Request) -> web.Response:
        require_admin(request)
        return web.json_response({"devices": [_inv(r) for r in await service.store.inventory.list()]})

    async def notice(request: web.Request) -> web.Response:
        """Message 6: the introducer tells the owner about a device it claimed for it."""
        require_admin(request)
        if request.content_length is not None and request.content_length > 8192:
            raise ProtocolError("notice is too large", status=413, code="too_large")
        raw = await request.content.read(8193)
        if len(raw) > 8192:
            raise ProtocolError("notice is too large", status=413, code="too_large")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeError, ValueError):
            raise MalformedMessage("send the notice as JSON {urn, fingerprint, otp, devid, "
                                   "description} or {label_url, description}") from None
        rec = await service.notice(data)
        return web.json_response({"added": [_inv(rec)]}, status=201)

    app.router.add_post("/zt/v1/notice", notice)
    app.router.add_post("/zt/v1/hello", cbor_route(service.hello))
    app.router.add_post("/zt/v1/prove", cbor_route(service.prove))
    app.router.add_post("/zt/v1/done", cbor_route(service.done))
    app.router.add_post("/zt/v1/inventory", inventory_add)
    app.router.add_get("/zt/v1/inventory", inventory_list)
    return app
