"""Identity backends, chosen by name (`--identity software`)."""
from __future__ import annotations

from .software import SoftwareIdentityFactory

IDENTITY_BACKENDS = {"software": SoftwareIdentityFactory}


def identity_factory(kind: str):
    try:
        return IDENTITY_BACKENDS[kind]()
    except KeyError:
        raise ValueError(f"unknown identity backend {kind!r}; known: {', '.join(IDENTITY_BACKENDS)}") from None
