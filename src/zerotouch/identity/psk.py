"""PSK identity: a device without public-key crypto. It holds N_device (its OTP) and a
32-byte pre-shared key, both 0600 files; it has no IDevID, makes no key pair and no CSR.
Onboarding uses the PSK profile (protocol/psk.py, protocol/psk_device.py) instead."""
from __future__ import annotations

from pathlib import Path

from ..protocol.psk import PskIdentityError
from ..util.files import atomic_write

PSK_FILE = "psk.secret"             # hex, 0600 (= transport.coap.security.DEVICE_PSK_FILE)
N_DEVICE_FILE = "n_device.secret"   # hex, 0600


def _read_hex(path: Path, what: str) -> bytes:
    try:
        raw = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        raise PskIdentityError(f"{path.name} is missing: not a PSK device") from None
    except ValueError:
        raise PskIdentityError(f"{path.name} is not hex ({what})") from None
    return raw


class PskIdentity:
    kind = "psk"

    def __init__(self, device_dir: Path):
        self.dir = Path(device_dir)
        self._psk = _read_hex(self.dir / PSK_FILE, "the PSK")
        if len(self._psk) != 32:
            raise PskIdentityError(f"{PSK_FILE} must hold 32 bytes")

    def psk(self) -> bytes:
        return self._psk

    def n_device(self) -> bytes:
        return _read_hex(self.dir / N_DEVICE_FILE, "N_device")

    def tpm_evidence(self) -> None:
        return None

    def _no_keys(self, *_a, **_k):
        raise NotImplementedError("a PSK device has no key pair (no IDevID, no CSR, no HPKE key)")

    idevid_signer = idevid_cert_der = create_ldevid_csr = new_seal_key = open_sealed = _no_keys
    ldevid_key_file = tpm_activate = tpm_quote = _no_keys

    def commit_ldevid(self) -> None:
        pass   # nothing to commit: no LDevID

    def close(self) -> None:
        pass


class PskIdentityFactory:
    kind = "psk"

    def provision(self, device_dir: Path, n_device: bytes, *, psk: bytes | None = None):
        if psk is None or len(psk) != 32:
            raise PskIdentityError("a PSK device needs a 32-byte PSK (Manufacturer.make_psk_device)")
        atomic_write(Path(device_dir) / N_DEVICE_FILE, n_device.hex().encode(), mode=0o600)
        atomic_write(Path(device_dir) / PSK_FILE, psk.hex().encode(), mode=0o600)
        return None   # no public key: nothing for the manufacturer CA to certify

    def idevid_binding(self, device_dir: Path) -> dict:
        return {}

    def store_idevid(self, device_dir: Path, cert_pem: bytes) -> None:
        raise NotImplementedError("a PSK device has no IDevID")

    def open(self, device_dir: Path) -> PskIdentity:
        return PskIdentity(device_dir)
