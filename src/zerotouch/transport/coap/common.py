"""Shared by the CoAP server and client: paths, content formats, status ↔ response code."""
from __future__ import annotations

from aiocoap.numbers import codes

from ...protocol.codec import MAX_MESSAGE

#: application/cbor (RFC 7049 / IANA CoAP Content-Formats)
CBOR_CF = 60
#: also accepted on requests, as the HTTP adapter accepts application/cose and octet-stream
ACCEPTED_CF = frozenset({CBOR_CF, 18, 42})  # cbor, cose; cose-type="cose-sign1", octet-stream

#: Short paths: every byte counts on a constrained link (HTTP uses /rv/v1/..., /zt/v1/...).
PATHS = {
    "find-owner": ("rv", "find-owner"),
    "hello": ("zt", "hello"),
    "prove": ("zt", "prove"),
    "done": ("zt", "done"),
}

#: The largest request body a server takes and the largest answer a client reads.
MAX_PAYLOAD = MAX_MESSAGE

STATUS_TO_CODE = {
    400: codes.BAD_REQUEST,
    401: codes.UNAUTHORIZED,
    403: codes.FORBIDDEN,
    404: codes.NOT_FOUND,
    405: codes.METHOD_NOT_ALLOWED,
    409: codes.CONFLICT,
    413: codes.REQUEST_ENTITY_TOO_LARGE,
    415: codes.UNSUPPORTED_CONTENT_FORMAT,
    422: codes.UNPROCESSABLE_ENTITY,
    429: codes.TOO_MANY_REQUESTS,
    500: codes.INTERNAL_SERVER_ERROR,
    503: codes.SERVICE_UNAVAILABLE,
}


def code_for_status(status: int):
    code = STATUS_TO_CODE.get(status)
    if code is not None:
        return code
    return codes.BAD_REQUEST if 400 <= status < 500 else codes.INTERNAL_SERVER_ERROR


def status_for_code(code) -> int:
    """4.04 → 404: CoAP codes are class.detail, HTTP-like statuses class*100 + detail."""
    return code.class_ * 100 + (int(code) & 0x1F)
