"""HTTP adapter of the bulk box claim: POST /.well-known/tte/box (JSON or HTML form)."""
from __future__ import annotations

from aiohttp import web

from ...protocol.errors import MalformedMessage
from ...services.bulk import BOX_PATH, box_from_fields, claim_box
from ...services.rendezvous import RendezvousService
from .rendezvous_app import read_claim_body   # JSON or form, bounded to 4 KiB


def add_box_routes(app: web.Application, rendezvous: RendezvousService) -> None:
    """Add the box claim endpoint to a rendezvous app (errors go through its middleware)."""

    async def box_post(request: web.Request) -> web.Response:
        data = await read_claim_body(request)
        for name in ("master", "first", "last", "cip", "cfingerprint", "cedhoc"):
            if not isinstance(data.get(name, ""), str):
                raise MalformedMessage(f"{name} must be a string")
        box = box_from_fields(data.get("master", ""), data.get("first", ""), data.get("last", ""),
                              rendezvous=f"{request.scheme}://{request.host}")
        result = await claim_box(rendezvous, box, data.get("cip", ""), data.get("cport", ""),
                                 data.get("cfingerprint", ""), source=request.remote,
                                 cedhoc=data.get("cedhoc") or None)
        return web.json_response(result.to_json())

    app.router.add_post(BOX_PATH, box_post)
