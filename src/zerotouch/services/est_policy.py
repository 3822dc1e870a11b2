"""EST policy and identities: who the client is (TLS certificate, HTTP Basic, forwarded
certificate) and what the owner allows (config.json "est"; docs/est.md)."""
from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass, field

from cryptography import x509

from ..protocol.est import EnrollmentPolicy
from ..protocol.errors import ProtocolError, RemoteError

SCRYPT = (2 ** 14, 8, 1)     # n, r, p: ~16 MiB and tens of ms per check


class AuthenticationRequired(RemoteError):
    status = 401
    code = "unauthenticated"


class EnrollmentPending(ProtocolError):
    """Not an error: RFC 7030 §4.2.3 answers 202 + Retry-After while a person decides."""
    status = 202
    code = "pending"


@dataclass(frozen=True)
class BasicUser:
    device_serial: str
    password_hash: str          # hash_password() output


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    n, r, p = SCRYPT
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        tag, n, r, p, salt, digest = stored.split("$")
        n, r, p = int(n), int(r), int(p)
        if tag != "scrypt" or not (n <= 2 ** 20 and r <= 32 and p <= 4):
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=n, r=r, p=p,
                             dklen=len(bytes.fromhex(digest)), maxmem=256 * 1024 * 1024)
    except ValueError:
        return False
    return hmac.compare_digest(got, bytes.fromhex(digest))


def _basic_user(name: str, entry) -> BasicUser:
    if not isinstance(entry, dict) or not {"device", "password"} <= set(entry) \
            or not str(entry["password"]).startswith("scrypt$"):
        raise ValueError(f"EST Basic user {name!r} needs 'device' and 'password' (hash_password())")
    return BasicUser(str(entry["device"]), str(entry["password"]))


@functools.cache
def _dummy_hash() -> str:
    """Checked for unknown user names, so they cost as much as known ones."""
    return hash_password("", salt=bytes(16))


@dataclass
class EstPolicy:
    """config.json `"est"`: a default policy, per-serial overrides, Basic users, proxies."""
    default: EnrollmentPolicy = field(default_factory=EnrollmentPolicy)
    devices: dict[str, EnrollmentPolicy] = field(default_factory=dict)
    basic_users: dict[str, BasicUser] = field(default_factory=dict)
    trusted_proxies: tuple[str, ...] = ()
    retry_after: int = 60

    @classmethod
    def from_config(cls, data: dict | None) -> "EstPolicy":
        data = data or {}
        known = {"default", "devices", "basic", "trusted_proxies", "retry_after"}
        if set(data) - known:
            raise ValueError(f"unknown keys in config 'est': {sorted(set(data) - known)}")
        default = EnrollmentPolicy.from_dict(data.get("default", {}))
        return cls(
            default=default,
            devices={s: EnrollmentPolicy.from_dict(o, default)
                     for s, o in data.get("devices", {}).items()},
            basic_users={u: _basic_user(u, v) for u, v in data.get("basic", {}).items()},
            trusted_proxies=tuple(str(ipaddress.ip_network(p, strict=False))
                                  for p in data.get("trusted_proxies", [])),
            retry_after=int(data.get("retry_after", 60)))

    def for_device(self, serial: str) -> EnrollmentPolicy:
        return self.devices.get(serial, self.default)


@dataclass(frozen=True)
class ClientIdentity:
    """How the client authenticated, as the transport saw it."""
    chain: tuple[bytes, ...] = ()       # DER, leaf first: TLS client certificate or forwarded one
    via_proxy: bool = False             # forwarded by a trusted TLS-terminating proxy
    username: str | None = None         # HTTP Basic
    password: str | None = None
    tls_unique: bytes | None = None     # only on direct TLS 1.2 connections


@dataclass(frozen=True)
class Authenticated:
    serial: str
    urn: str
    credential: str                     # idevid | basic | ldevid | operational
    cert: x509.Certificate | None = None
