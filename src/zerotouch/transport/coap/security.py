"""How a CoAP endpoint is protected: the `--coap-security` modes of servers and devices.

* ``edhoc`` (the default of the CLI and the demo): EDHOC (RFC 9528) + OSCORE, P-256 raw public
  keys pinned by SHA-256 SPKI fingerprint. Each server keeps its EDHOC key in its role
  directory (`edhoc.key`, made at `init` or first serve; the fingerprint is in `public.json`
  / `config.json` and printed). The device's EDHOC key is its IDevID key; it pins the
  rendezvous by the fingerprint in its factory.json (`rendezvous_edhoc_fp`) and the gateway by
  the fingerprint in its signed redirect (the claim's `cedhoc`).
* ``oscore-psk``: OSCORE with a context from the device's pre-shared key (oscore_psk.py), for
  devices without public-key crypto, towards the gateway (which holds the PSKs in `psk.json`);
  the rendezvous holds no device keys, so the device reaches it over plain CoAP (its messages
  are signed and nonce-bound anyway) and the rendezvous must serve ``none``.
* ``none``: plain CoAP over UDP (the messages still carry their own signatures; what travels
  is readable on the path).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from ...pki.keys import generate_p256, load_private_key, save_private_key, spki_fingerprint
from ...util.files import atomic_write, read_json

MODES = ("none", "edhoc", "oscore-psk")
DEFAULT_MODE = "edhoc"
EDHOC_KEY_FILE = "edhoc.key"
PSK_FILE = "psk.json"              # gateway dir: {"devices": {devid: hex}, "boxes": [...]}
DEVICE_PSK_FILE = "psk.secret"     # device dir: hex, 0600
DEVICE_SEQ_FILE = "oscore-seq.json"
SEQ_SKIP = 64                      # sequence numbers skipped after a restart (RFC 8613 B.1.1)

log = logging.getLogger("zerotouch.coap")
_DEVID = re.compile(r"[0-9a-f]{8}")
_HEXKEY = re.compile(r"(?:[0-9a-f]{2}){16,64}")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"CoAP security must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def edhoc_key(directory: Path):
    """The role's P-256 EDHOC key (`DIR/edhoc.key`, 0600), made on first use."""
    path = Path(directory) / EDHOC_KEY_FILE
    if not path.exists():
        save_private_key(path, generate_p256())
    return load_private_key(path)


def edhoc_fingerprint(directory: Path) -> str:
    """Hex SHA-256 SPKI of the role's EDHOC key (making the key if needed)."""
    return spki_fingerprint(edhoc_key(directory).public_key()).hex()


class PskFile:
    """The gateway's `psk.json`, read again whenever it changes, so PSKs added by a claim
    (`zerotouch box claim --gateway-dir`) are used without a restart.

    Each lookup compares the file's (mtime, size, inode) with what was loaded: one stat(),
    no read unless it changed (it is replaced atomically, so a new inode each time). `reload()`
    (SIGHUP) reads it unconditionally. A file that does not parse is reported (never its
    contents) and the PSKs loaded before stay in use."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / PSK_FILE
        self._seen: tuple | None = None
        self._devices: dict[str, bytes] = {}
        self._boxes: list[tuple[bytes, int, int]] = []
        self.loads = 0
        self.reload()

    def _signature(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reload(self) -> None:
        sig = self._signature()
        self._seen = sig
        if sig is None:
            self._devices, self._boxes = {}, []
            return
        try:
            devices, boxes = parse_psk_json(read_json(self.path))
        except (OSError, ValueError) as exc:   # JSONDecodeError is a ValueError
            log.warning("%s is not usable (%s); keeping the PSKs loaded before", self.path,
                        exc if isinstance(exc, PskFileError) else type(exc).__name__)
            return
        self._devices, self._boxes = devices, boxes
        self.loads += 1

    def psk_for(self, devid_hex: str) -> bytes | None:
        if self._signature() != self._seen:
            self.reload()
        psk = self._devices.get(devid_hex)
        if psk is not None:
            return psk
        from ...services.bulk import derive_psk
        n = int(devid_hex, 16)
        for master, first, last in self._boxes:
            if first <= n <= last:
                return derive_psk(master, n)
        return None


class PskFileError(ValueError):
    """psk.json is malformed; the message names the entry, never a key."""


def parse_psk_json(data) -> tuple[dict[str, bytes], list[tuple[bytes, int, int]]]:
    if not isinstance(data, dict):
        raise PskFileError("not a JSON object")
    devices: dict[str, bytes] = {}
    raw = data.get("devices", {})
    if not isinstance(raw, dict):
        raise PskFileError('"devices" is not an object')
    for devid, psk in raw.items():
        d = str(devid).lower()
        if not _DEVID.fullmatch(d) or not isinstance(psk, str) or not _HEXKEY.fullmatch(psk.lower()):
            raise PskFileError(f"device entry {devid[:8]!r}: want 8 hex digits -> 16..64 bytes hex")
        devices[d] = bytes.fromhex(psk)
    boxes = []
    for i, b in enumerate(data.get("boxes", [])):
        try:
            boxes.append((bytes.fromhex(b["master"]), int(b["first"], 16), int(b["last"], 16)))
        except (KeyError, TypeError, ValueError):
            raise PskFileError(f"box entry {i} is malformed") from None
    return devices, boxes


def load_psk_store(directory: Path, psk_file: PskFile | None = None):
    """The gateway's PSKs: `psk.json` with single devices and/or claimed boxes, followed as it
    changes (`store.psk_file.reload()` forces a read). `psk_file`: one already loaded (the
    gateway core's), so the core and OSCORE share one copy."""
    from .oscore_psk import PskContextStore
    psk_file = psk_file if psk_file is not None else PskFile(directory)
    store = PskContextStore(psk_file.psk_for, roles=("gateway",))
    store.psk_file = psk_file
    return store


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_device_psks(directory: Path, psks: dict[str, bytes]) -> int:
    """Add (or replace) device PSKs in `DIR/psk.json` (0600, replaced atomically, under a lock
    so two claims at once both land). Returns how many entries are new or changed. A running
    gateway picks the file up at its next lookup."""
    from ...util.files import atomic_write_json
    path = Path(directory) / PSK_FILE
    with _locked(path.with_name(PSK_FILE + ".lock")):
        data = read_json(path) if path.exists() else {}
        parse_psk_json(data)   # refuse to build on a malformed file (names no key)
        devices = dict(data.get("devices", {}))
        changed = 0
        for devid, psk in psks.items():
            d = str(devid).lower()
            if not _DEVID.fullmatch(d) or not 16 <= len(psk) <= 64:
                raise PskFileError(f"device {devid!r}: bad Device ID or PSK length")
            if devices.get(d) != psk.hex():
                devices[d] = psk.hex()
                changed += 1
        if changed:
            atomic_write_json(path, {**data, "devices": devices}, mode=0o600)
    return changed


async def start_role_coap_server(directory: Path, host: str, port: int, *, rendezvous=None,
                                 gateway=None, security: str = DEFAULT_MODE, rate_limit=None,
                                 psk_file: PskFile | None = None):
    """CoAP/UDP for one role's directory in the given security mode. `psk_file` (oscore-psk):
    share this PskFile (the gateway core's) instead of loading another copy."""
    check_mode(security)
    if security == "edhoc":
        from .edhoc import AnyDeviceKey, EdhocIdentity
        from .server import start_coap_server
        identity = EdhocIdentity(edhoc_key(directory), "rendezvous" if rendezvous else "gateway")
        return await start_coap_server(rendezvous, gateway, bind=(host, port), edhoc_identity=identity,
                                       edhoc_known=AnyDeviceKey(), rate_limit=rate_limit)
    if security == "oscore-psk":
        if rendezvous is not None:
            raise ValueError("the rendezvous holds no device PSKs: serve it with --coap-security "
                             "none or edhoc")
        from .oscore_psk import start_oscore_psk_server
        store = load_psk_store(directory, psk_file)
        server = await start_oscore_psk_server(None, gateway, store=store, bind=(host, port),
                                               rate_limit=rate_limit)
        server.psk_file = store.psk_file   # `serve` reloads it on SIGHUP
        return server
    from .server import start_coap_server
    return await start_coap_server(rendezvous, gateway, bind=(host, port), rate_limit=rate_limit)


# --- the device side ---------------------------------------------------------------------
def _coap_base(url: str) -> str:
    return f"coap://{urlsplit(url).netloc}"


def device_coap_transport(factory: dict, *, security: str = "none", device_dir: Path | None = None):
    """A device's CoAP transport in the given mode (factory: its factory.json contents)."""
    from .client import CoapDeviceTransport
    check_mode(security)
    ca = factory.get("rendezvous_tls_ca_pem") or None
    if security == "none":
        return CoapDeviceTransport(rendezvous_ca_pem=ca)
    if device_dir is None:
        raise ValueError(f"--coap-security {security} needs the device directory")
    d = Path(device_dir)
    if security == "edhoc":
        from .edhoc import EdhocIdentity
        if factory.get("identity", "software") != "software":
            raise ValueError("EDHOC uses the IDevID key for static Diffie-Hellman: only software "
                             "identities can (use --coap-security none or oscore-psk)")
        pin = factory.get("rendezvous_edhoc_fp")
        if not pin:
            raise ValueError("factory.json has no rendezvous EDHOC pin (rendezvous_edhoc_fp): "
                             "the device was made before its rendezvous had an EDHOC key")
        identity = EdhocIdentity(load_private_key(d / "idevid.key"), factory.get("serial", ""))
        return CoapDeviceTransport(rendezvous_ca_pem=ca, edhoc_identity=identity,
                                   edhoc_pins={_coap_base(factory["rendezvous_url"]): bytes.fromhex(pin)})
    from .oscore_psk import OscorePskTransport
    psk_file = d / DEVICE_PSK_FILE
    if not psk_file.exists():
        raise ValueError(f"no {DEVICE_PSK_FILE} in the device directory: not a PSK-mode device")
    seq_file = d / DEVICE_SEQ_FILE
    # Never reuse a sequence number with the same PSK (AES-CCM nonce): resume past the last
    # persisted one, persisting as we go.
    seq = {k: int(v) + SEQ_SKIP for k, v in (read_json(seq_file) if seq_file.exists() else {}).items()}
    state = dict(seq)

    def on_sequence(role: str, n: int) -> None:
        state[role] = n
        atomic_write(seq_file, json.dumps(state).encode(), mode=0o600)
    return OscorePskTransport(devid=factory["serial"], psk=bytes.fromhex(psk_file.read_text().strip()),
                              sequence_numbers=seq, on_sequence=on_sequence, protect=("gateway",),
                              rendezvous_ca_pem=ca)
