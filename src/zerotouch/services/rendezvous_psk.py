"""What the rendezvous keeps for PSK devices, and for how long.

* at registration: the manufacturer's commitment H("zt-psk-commit" | serial | K_rv) — no key;
* at the claim: K_rv, checked against the commitment, stored AES-GCM encrypted under a key
  of the rendezvous directory (`psk-at-rest.key`, 0600, or `ZT_RV_PSK_KEY`); AAD = kind|serial;
* on revocation: K_rv is forgotten (overwritten with an empty value).

K_rv is derived from the device's PSK (psk.rendezvous_key) and only authenticates the
find-owner / redirect leg, which the rendezvous' own signing key already speaks for: a
rendezvous database (and its at-rest key) leaking gives an attacker no owner messages, no
wrapped secret and no terminus access. It is kept while the mapping lives because a device
that lost its state after `done` (power loss before state.json) asks the rendezvous again.
Neither value is ever logged or returned by an API.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..storage.base import SecretRepo
from ..util.files import atomic_write

AT_REST_FILE = "psk-at-rest.key"
AT_REST_ENV = "ZT_RV_PSK_KEY"
KIND_KEY = "rv_psk"
KIND_COMMIT = "rv_psk_commit"


def load_at_rest_key(directory: Path) -> bytes:
    """The rendezvous' key for K_rv at rest: ZT_RV_PSK_KEY, or DIR/psk-at-rest.key (made once)."""
    env = os.environ.get(AT_REST_ENV)
    if env:
        return env.encode()
    path = Path(directory) / AT_REST_FILE
    if not path.exists():
        atomic_write(path, os.urandom(32).hex().encode(), mode=0o600)
    return path.read_bytes().strip()


class RvPskKeys:
    def __init__(self, secrets: SecretRepo, at_rest_key: bytes):
        self._secrets = secrets
        self._aead = AESGCM(HKDF(hashes.SHA256(), 32, salt=None,
                                 info=b"zerotouch rendezvous psk keys").derive(at_rest_key))

    async def put_commit(self, serial: str, commit: bytes) -> None:
        await self._secrets.put(KIND_COMMIT, serial, commit)

    async def commit(self, serial: str) -> bytes | None:
        got = await self._secrets.get(KIND_COMMIT, serial)
        return got or None

    async def put_key(self, serial: str, k_rv: bytes) -> None:
        iv = os.urandom(12)
        await self._secrets.put(KIND_KEY, serial,
                                iv + self._aead.encrypt(iv, k_rv, f"{KIND_KEY}|{serial}".encode()))

    async def key(self, serial: str) -> bytes | None:
        blob = await self._secrets.get(KIND_KEY, serial)
        if not blob:
            return None
        return self._aead.decrypt(blob[:12], blob[12:], f"{KIND_KEY}|{serial}".encode())

    async def forget(self, serial: str) -> None:
        if await self._secrets.get(KIND_KEY, serial):
            await self._secrets.put(KIND_KEY, serial, b"")

    @staticmethod
    def matches(commit: bytes | None, candidate: bytes) -> bool:
        return commit is not None and hmac.compare_digest(commit, candidate)
