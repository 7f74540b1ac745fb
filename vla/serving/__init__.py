"""`vla.serving`: serve a policy over websocket + msgpack (`vla serve`), and the matching client
(``vla.policies.RemotePolicy`` wraps it). The wire protocol is documented in ``server.py``.

It sits above the core and the policies; nothing in the core imports it.
"""

from vla.serving.server import (
    PROTOCOL_VERSION,
    CodecError,
    PolicyClient,
    PolicyServer,
    RequestError,
    is_loopback,
    pack,
    read_api_key,
    unpack,
    validate_request,
)

__all__ = [
    "PROTOCOL_VERSION",
    "CodecError",
    "PolicyClient",
    "PolicyServer",
    "RequestError",
    "is_loopback",
    "pack",
    "read_api_key",
    "unpack",
    "validate_request",
]
