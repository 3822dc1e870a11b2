"""Protocol errors say which side broke the rules and map to a status code.

`RemoteError` means the peer sent something wrong (a server answers 4xx);
`LocalError` means this side cannot go on (a server answers 5xx/503).
"""
from __future__ import annotations


class ProtocolError(Exception):
    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.retry_after = retry_after


class RemoteError(ProtocolError):
    """The other side broke the protocol (malformed, forged, stale, unknown...)."""


class MalformedMessage(RemoteError):
    code = "malformed"


class MessageTooLarge(RemoteError):
    status = 413
    code = "too_large"


class BadSignature(RemoteError):
    status = 401
    code = "bad_signature"


class StaleMessage(RemoteError):
    status = 401
    code = "stale"


class NotAuthorized(RemoteError):
    status = 403
    code = "forbidden"


class NotFound(RemoteError):
    status = 404
    code = "not_found"


class Conflict(RemoteError):
    status = 409
    code = "conflict"


class TryLater(ProtocolError):
    """Not an error of either side: the answer is not ready yet (not claimed yet...)."""
    status = 503
    code = "try_later"


class LocalError(ProtocolError):
    status = 500
    code = "internal"
