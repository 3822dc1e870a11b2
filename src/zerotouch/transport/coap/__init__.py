"""CoAP adapters (RFC 7252 over UDP, RFC 8323 over TLS) of the same sans-IO protocol core.

Thin like the HTTP adapters: payload bytes → service → payload bytes; a ProtocolError becomes
its 4.xx/5.03 response code with a CBOR ErrorReply. Requires `aiocoap` (0.4.x).
"""
from .common import CBOR_CF, PATHS
from .server import CoapServer, start_coap_server

__all__ = ["CBOR_CF", "PATHS", "CoapServer", "start_coap_server"]
