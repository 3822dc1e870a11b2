"""Owner and device-side TPM administration: trust a TPM maker, capture and install PCR
policies, extend a PCR (a simulated software change). CLI: `zerotouch tpm ...`, `zerotouch policy ...`."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..attestation.quote import DEFAULT_PCRS, PcrPolicy
from ..util.files import atomic_write, read_json
from .attestation import INTERMEDIATES_DIR, POLICIES_DIR, ROOTS_DIR

_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def parse_pcrs(text: str) -> list[int]:
    """'0-7', '0,2,7' or '0-3,7' -> sorted PCR indices (0..23)."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            a, b = int(lo), int(hi or lo)
            if not 0 <= a <= b <= 23:
                raise ValueError
            out.update(range(a, b + 1))
    except ValueError:
        raise ValueError(f"PCR list {text!r} is not like 0-7 or 0,2,7 (PCRs 0..23)") from None
    return sorted(out)


def _tcti_of(device_dir: Path | None, tcti: str | None) -> str:
    if tcti:
        return tcti
    if device_dir is not None:
        factory = read_json(Path(device_dir) / "factory.json")
        if factory.get("tcti"):
            return factory["tcti"]
    raise ValueError("which TPM? give --tcti, or --device DIR of a device made with --identity tpm")


def capture_policy(name: str, *, device_dir: Path | None = None, tcti: str | None = None,
                   pcrs: list[int] | None = None) -> PcrPolicy:
    """The PCR values of a known-good device, as the policy devices of its type must match."""
    if not _TYPE.fullmatch(name):
        raise ValueError("policy name: letters, digits, '.', '_' or '-', at most 64")
    from ..identity.tpm import Tpm
    from ..identity.tpm.quote import read_pcrs
    with Tpm(_tcti_of(device_dir, tcti)) as tpm:
        values = read_pcrs(tpm, list(pcrs or DEFAULT_PCRS))
    return PcrPolicy.capture(name, values)


def install_policy(gateway_dir: Path, policy_file: Path, device_type: str | None = None) -> Path:
    """Check and install a policy for a device type (default: the policy's name)."""
    policy = PcrPolicy.from_json(Path(policy_file).read_text())
    dtype = device_type or policy.name
    if not _TYPE.fullmatch(dtype):
        raise ValueError("device type: letters, digits, '.', '_' or '-', at most 64")
    out = Path(gateway_dir) / POLICIES_DIR / f"{dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, policy.to_json().encode())
    return out


def list_policies(gateway_dir: Path) -> list[tuple[str, PcrPolicy]]:
    return [(p.stem, PcrPolicy.from_json(p.read_text()))
            for p in sorted((Path(gateway_dir) / POLICIES_DIR).glob("*.json"))]


def trust_tpm_maker(gateway_dir: Path, roots: list[Path], intermediates: list[Path] = ()) -> list[Path]:
    """Add TPM maker root and intermediate CA certificates the gateway checks EK certificates
    against. Each must be a CA certificate."""
    written = []
    for kind, files in ((ROOTS_DIR, roots), (INTERMEDIATES_DIR, intermediates)):
        for f in files:
            try:
                certs = x509.load_pem_x509_certificates(Path(f).read_bytes())
            except ValueError:
                raise ValueError(f"{f}: not a PEM certificate") from None
            for cert in certs:
                try:
                    ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
                except x509.ExtensionNotFound:
                    ca = False
                if not ca:
                    raise ValueError(f"{f}: {cert.subject.rfc4514_string()} is not a CA certificate")
                der = cert.public_bytes(Encoding.DER)
                out = Path(gateway_dir) / kind / f"{hashlib.sha256(der).hexdigest()[:16]}.pem"
                out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(out, cert.public_bytes(Encoding.PEM))
                written.append(out)
    return written


def extend_pcr(index: int, data: bytes, *, device_dir: Path | None = None, tcti: str | None = None) -> bytes:
    """Extend a PCR of the device's TPM (what a boot loader measuring new software does)."""
    from ..identity.tpm import Tpm
    from ..identity.tpm.quote import extend_pcr as _extend, read_pcrs
    if not 0 <= index <= 23:
        raise ValueError("PCR index must be 0..23")
    with Tpm(_tcti_of(device_dir, tcti)) as tpm:
        _extend(tpm, index, data)
        return read_pcrs(tpm, [index])[index]
