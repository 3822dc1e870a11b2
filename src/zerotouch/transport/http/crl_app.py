"""`GET /crl` (DER, application/pkix-crl, RFC 5280 §4.2.1.13 / RFC 2585) and `GET /crl.pem`.

No authentication: a CRL is public and signed, so whoever serves it cannot forge it. Every
replica answers from the shared database (see services.revocation), so a load balancer may send
the request anywhere. Caches may keep it for `max-age`, a small slice of the time left before
its nextUpdate, so a relying party never holds an expired CRL because of our headers.
"""
from __future__ import annotations

import email.utils
import hashlib

from aiohttp import web

from ...protocol.errors import ProtocolError

CRL_DER = "application/pkix-crl"
CRL_PEM = "application/x-pem-file"


def _handler(service, pem: bool):
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            snap = await service.snapshot()
        except ProtocolError as exc:  # e.g. the vault is unreachable: try again, do not cache
            return web.json_response({"error": exc.code, "message": exc.message}, status=503,
                                     headers={"Retry-After": "5", "Cache-Control": "no-store"})
        body = snap.pem if pem else snap.der
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {"Cache-Control": f"public, max-age={service.max_age(snap)}",
                   "ETag": etag,
                   "Last-Modified": email.utils.formatdate(snap.this_update, usegmt=True)}
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=CRL_PEM if pem else CRL_DER, headers=headers)
    return handler


def add_crl_routes(app: web.Application, revocation_service) -> None:
    """Add GET (and HEAD) /crl and /crl.pem answered from `revocation_service`."""
    app.router.add_get("/crl", _handler(revocation_service, pem=False))
    app.router.add_get("/crl.pem", _handler(revocation_service, pem=True))


__all__ = ["add_crl_routes", "CRL_DER", "CRL_PEM"]
