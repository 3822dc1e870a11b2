"""Identity backends, chosen by name (`--identity software|tpm|psk`)."""
from __future__ import annotations

from .psk import PskIdentityFactory
from .software import SoftwareIdentityFactory


def _tpm_factory(**options):
    try:   # only the tpm package imports tpm2-pytss: load it when asked for
        from .tpm.backend import TpmIdentityFactory
    except ImportError as exc:
        raise ValueError(f"the tpm identity backend needs tpm2-pytss ({exc}); install it with "
                         "apt-get install libtss2-dev pkg-config && pip install 'zerotouch[tpm]'") from None
    return TpmIdentityFactory(**options)


IDENTITY_BACKENDS = {"software": SoftwareIdentityFactory, "tpm": _tpm_factory,
                     "psk": PskIdentityFactory}   # no key pair: the PSK profile (protocol/psk.py)


def identity_factory(kind: str, **options):
    """`options`: backend settings, e.g. tcti= for the TPM."""
    try:
        make = IDENTITY_BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown identity backend {kind!r}; known: {', '.join(IDENTITY_BACKENDS)}") from None
    return make(**options)
