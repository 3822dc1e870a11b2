"""Short-lived operational certificates: when to renew, and a swap that never loses a working one.

Timing is pure (time and randomness injected). A device renews at about two thirds of the
lifetime, moved by up to ±5 % of the lifetime at random, so a fleet issued in one burst does
not come back in one burst; never later than 90 % (room for retries), never in the past.

The swap, over files in the device data directory:
  operational.new.key / .csr   key and CSR of an enrollment in flight; kept through a 202 and a
                               reboot so the same CSR is sent again, as RFC 7030 §4.2.3 asks
  operational.new.pem          enrolled, not yet proven to work at the terminus
  operational.pem / .key       the pair in use (key 0600)
  operational.prev.pem / .key  the pair before, kept until the next renewal
A new pair is promoted only after `check` (a terminus connection with it) succeeds; until then
the old pair stays in use. Promotion renames the certificate, then the key, syncing the
directory after each, so a crash leaves one of few known states and `recover()` finishes it.

Where the keys live is a `KeyStore`: software keys in PKCS#8 files (`.key`), or keys in the
device's TPM (`identity/tpm/opkeys.py`: `.tss2.pem`, TPM-wrapped blobs made under the SRK and
signing the CSR in the TPM). The files and the swap are the same for both.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from ..pki.keys import generate_p256, load_private_key, public_key_der, save_private_key
from ..util.files import atomic_write, fsync_dir
from .est_client import EstRefused, Pending

log = logging.getLogger("zerotouch.agent.renewal")
RENEW_FRACTION = 2 / 3
JITTER = 0.05          # ± fraction of the lifetime
LATEST = 0.90          # never plan a renewal later than this fraction of the lifetime
CLOCK_SKEW = 300       # seconds a certificate may start "in the future" of the device clock

Enroll = Callable[[bytes], Awaitable[x509.Certificate]]   # CSR (DER) → issued certificate
Check = Callable[[Path, Path], Awaitable[None]]           # (cert file, key file); raises if refused


# --- timing (pure) ----------------------------------------------------------------------------
def renew_at(not_before: float, not_after: float, rand: Callable[[], float], *,
             now: float | None = None, jitter: float = JITTER) -> float:
    """When to renew a certificate valid from `not_before` to `not_after` (epoch seconds);
    `rand()` is uniform in [0, 1)."""
    lifetime = max(0.0, not_after - not_before)
    fraction = min(RENEW_FRACTION + jitter * (2.0 * rand() - 1.0), LATEST)
    at = not_before + fraction * lifetime
    return at if now is None else max(at, now)


def validity(cert: x509.Certificate) -> tuple[float, float]:
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def is_due(cert: x509.Certificate | None, now: float, planned: float | None = None) -> bool:
    """Renew now? Yes without a certificate, at the planned time, and past 90 % whatever the plan.

    A plan outside the certificate's validity belongs to another certificate and is ignored.
    """
    if cert is None:
        return True
    nb, na = validity(cert)
    if now >= nb + LATEST * (na - nb):
        return True
    if planned is None or not nb <= planned <= na:
        planned = renew_at(nb, na, lambda: 0.5)
    return now >= planned


def expired(cert: x509.Certificate, now: float) -> bool:
    return now >= validity(cert)[1]


# --- keys -------------------------------------------------------------------------------------
class SoftwareKeyStore:
    """Operational keys as PKCS#8 files (0600) made in software."""
    suffix = ".key"

    def public_der(self, key_file: Path) -> bytes:
        """SubjectPublicKeyInfo of the key in `key_file`; raises on a missing/unreadable file."""
        return public_key_der(load_private_key(key_file).public_key())

    def new_key_and_csr(self, key_file: Path, subject: x509.Name,
                        san: x509.SubjectAlternativeName, key_factory=None) -> bytes:
        """Make a key, write it to `key_file` (0600), return a DER CSR signed by it."""
        key = (key_factory or generate_p256)()
        save_private_key(key_file, key)
        return (x509.CertificateSigningRequestBuilder().subject_name(subject)
                .add_extension(san, critical=False)
                .sign(key, hashes.SHA256())).public_bytes(serialization.Encoding.DER)


SOFTWARE_KEYS = SoftwareKeyStore()


# --- files ------------------------------------------------------------------------------------
def _pair_matches(cert_file: Path, key_file: Path, keys=SOFTWARE_KEYS) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        return public_key_der(cert.public_key()) == keys.public_der(key_file)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return False


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class OperationalFiles:
    def __init__(self, device_dir: Path, stem: str = "operational", keys=SOFTWARE_KEYS):
        d = self.dir = Path(device_dir)
        self.keys, k = keys, keys.suffix
        self.cert_file, self.key_file = d / f"{stem}.pem", d / f"{stem}{k}"
        self.new_cert_file, self.new_key_file = d / f"{stem}.new.pem", d / f"{stem}.new{k}"
        self.new_csr_file = d / f"{stem}.new.csr"
        self.prev_cert_file, self.prev_key_file = d / f"{stem}.prev.pem", d / f"{stem}.prev{k}"

    def _matches(self, cert_file: Path, key_file: Path) -> bool:
        return _pair_matches(cert_file, key_file, self.keys)

    def current(self) -> x509.Certificate | None:
        """The certificate in use, if its key is there and matches it."""
        if not self._matches(self.cert_file, self.key_file):
            return None
        return x509.load_pem_x509_certificate(self.cert_file.read_bytes())

    def staged(self) -> x509.Certificate | None:
        """An enrolled certificate not yet promoted (a failed check or a crash left it)."""
        if not self._matches(self.new_cert_file, self.new_key_file):
            return None
        return x509.load_pem_x509_certificate(self.new_cert_file.read_bytes())

    def recover(self) -> None:
        """Finish a promotion a crash cut between renaming the certificate and the key."""
        if (self.new_key_file.exists() and not self._matches(self.cert_file, self.key_file)
                and self._matches(self.cert_file, self.new_key_file)):
            os.replace(self.new_key_file, self.key_file)
            fsync_dir(self.dir)
        if not self.new_key_file.exists():
            _unlink(self.new_csr_file)

    def pending_csr(self, serial: str, urn: str, key_factory=None,
                    template: x509.Certificate | None = None) -> bytes:
        """The CSR of the enrollment in flight, or a new key (0600) and CSR.

        Subject and SAN are copied from `template` (the certificate being renewed): RFC 7030
        §4.2.2 wants them unchanged, and a server compares them exactly (attribute order too)."""
        if self.new_key_file.exists() and self.new_csr_file.exists():
            try:
                csr = self.new_csr_file.read_bytes()
                if public_key_der(x509.load_der_x509_csr(csr).public_key()) == \
                        self.keys.public_der(self.new_key_file):
                    return csr
            except (OSError, ValueError, TypeError):
                pass  # unreadable leftovers: start over with a new key
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial),
                             x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(urn)])
        if template is not None:
            subject = template.subject
            try:
                san = template.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            except x509.ExtensionNotFound:
                pass
        csr = self.keys.new_key_and_csr(self.new_key_file, subject, san, key_factory)
        atomic_write(self.new_csr_file, csr)
        return csr

    def new_key_public_der(self) -> bytes:
        return self.keys.public_der(self.new_key_file)

    def stage(self, cert: x509.Certificate) -> None:
        atomic_write(self.new_cert_file, cert.public_bytes(serialization.Encoding.PEM))

    def promote(self) -> None:
        if self._matches(self.cert_file, self.key_file):
            # Copies: the pair in use stays in place until the new one replaces it.
            atomic_write(self.prev_key_file, self.key_file.read_bytes(), mode=0o600, sync_dir=False)
            atomic_write(self.prev_cert_file, self.cert_file.read_bytes(), sync_dir=False)
        os.replace(self.new_cert_file, self.cert_file)
        fsync_dir(self.dir)       # durable before the key moves: recover() relies on the order
        os.replace(self.new_key_file, self.key_file)
        fsync_dir(self.dir)
        _unlink(self.new_csr_file)

    def discard_new(self) -> None:
        for path in (self.new_cert_file, self.new_key_file, self.new_csr_file):
            _unlink(path)
        fsync_dir(self.dir)


# --- the swap ---------------------------------------------------------------------------------
@dataclass
class RenewalResult:
    outcome: str                      # promoted | pending | kept_old | failed | not_due
    cert: x509.Certificate | None = None
    retry_after: float | None = None
    error: str | None = None
    tested: bool = False              # promoted after a successful terminus check
    next_at: float | None = None      # when the caller plans the next renewal (epoch seconds)


def _describe(exc: BaseException) -> str:
    return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"


def check_issued(cert: x509.Certificate, *, owner_ca: x509.Certificate, serial: str,
                 key_der: bytes, now: float) -> None:
    """Raise ValueError unless `cert` is what this device asked the owner for, valid now."""
    try:
        cert.verify_directly_issued_by(owner_ca)
    except Exception:
        raise ValueError("issued certificate is not signed by the owner CA") from None
    if public_key_der(cert.public_key()) != key_der:
        raise ValueError("issued certificate certifies another key")
    names = [a.value for oid in (NameOID.SERIAL_NUMBER, NameOID.COMMON_NAME)
             for a in cert.subject.get_attributes_for_oid(oid)]
    if serial not in names:
        raise ValueError("issued certificate names another device")
    nb, na = validity(cert)
    if not nb - CLOCK_SKEW <= now < na:
        raise ValueError("issued certificate is not valid now")


async def _works(check: Check, cert_file: Path, key_file: Path) -> str | None:
    """None if the pair works at the terminus, else why not."""
    try:
        await check(cert_file, key_file)
        return None
    except Exception as exc:  # any failure means "not proven"
        return _describe(exc)


async def _settle(files: OperationalFiles, check: Check, cert: x509.Certificate, now: float,
                  serial: str) -> RenewalResult:
    """A pair is staged: promote it if it works; else keep the old one, and keep the staged one
    unless the terminus takes the old pair and refuses only the new (then the new is bad)."""
    why = await _works(check, files.new_cert_file, files.new_key_file)
    if why is None:
        await asyncio.to_thread(files.promote)
        return RenewalResult("promoted", cert=cert, tested=True)
    current = await asyncio.to_thread(files.current)
    if current is not None and expired(current, now):
        # The old pair cannot work any more; a valid unproven one is the better bet.
        log.warning("%s: promoting an untested certificate, the old one expired (%s)", serial, why)
        await asyncio.to_thread(files.promote)
        return RenewalResult("promoted", cert=cert, error=why)
    if current is not None and await _works(check, files.cert_file, files.key_file) is None:
        await asyncio.to_thread(files.discard_new)
        return RenewalResult("kept_old", cert=current, error=f"new certificate refused: {why}")
    # Nothing works (terminus away?): not the new pair's fault; test it again next round
    # instead of enrolling yet another certificate.
    return RenewalResult("kept_old", cert=current, error=f"cannot test the new certificate: {why}")


async def swap(files: OperationalFiles, *, enroll: Enroll, check: Check,
               owner_ca: x509.Certificate, serial: str, urn: str, now: float,
               key_factory=None, template: x509.Certificate | None = None) -> RenewalResult:
    """Enroll a new pair, prove it at the terminus, then promote it; else keep the old one.
    `template`: the certificate authenticating the request, whose names the CSR repeats."""
    await asyncio.to_thread(files.recover)
    staged = await asyncio.to_thread(files.staged)
    if staged is not None and expired(staged, now):
        await asyncio.to_thread(files.discard_new)
    elif staged is not None:
        result = await _settle(files, check, staged, now, serial)
        if result.outcome == "promoted" or await asyncio.to_thread(files.staged) is not None:
            return result
    csr = await asyncio.to_thread(files.pending_csr, serial, urn, key_factory, template)
    try:
        cert = await enroll(csr)
    except Pending as exc:
        return RenewalResult("pending", retry_after=exc.retry_after, error=exc.message)
    except Exception as exc:
        if isinstance(exc, EstRefused) and 400 <= exc.status < 500:
            await asyncio.to_thread(files.discard_new)  # refused: this CSR will not do
        return RenewalResult("failed", retry_after=getattr(exc, "retry_after", None),
                             error=_describe(exc))
    try:
        check_issued(cert, owner_ca=owner_ca, serial=serial, now=now,
                     key_der=await asyncio.to_thread(files.new_key_public_der))
    except ValueError as exc:
        await asyncio.to_thread(files.discard_new)
        return RenewalResult("failed", error=str(exc))
    await asyncio.to_thread(files.stage, cert)
    return await _settle(files, check, cert, now, serial)
