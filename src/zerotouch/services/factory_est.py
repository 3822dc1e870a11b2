"""The factory's EST server (RFC 7030) for IDevIDs: seed 003's first stage, software and TPM devices.

A provisioning station on the factory line relays a CSR made on the device (the device key
never leaves it) and authenticates with its own TLS client certificate, issued by the
manufacturer's *provisioning CA*: a CA of its own, so no device certificate (IDevID, LDevID)
can ever pass as a station. The CSR names the device serial in its subject (serialNumber, 8 hex
digits); each serial gets one IDevID, recorded in an append-only file before the certificate
leaves the service.

RFC 7030 §3.5 linking does not apply here: the CSR is made by the device, not by the TLS client,
so it cannot carry the station's tls-unique. The CSR signature proves possession of the key;
subject and SAN are built by the service from the validated serial, never copied from the CSR.

What the service takes from a CSR besides the key and the serial, each checked for form:
  * the device type, as the subject's one OU (as the in-process CA writes `--model`);
  * for a TPM device, the TPM binding: one RFC 4108 hardwareModuleName in the extensionRequest's
    subjectAltName (hwType TPM 2.0, hwSerialNum = SHA-256 of the EK SubjectPublicKeyInfo, which
    the station computed from the EK certificate it read out of the device's TPM).
What the service can verify about the binding, and what it cannot: it knows the request comes
from one of its own provisioning stations (the station's TLS credential), that the binding is
well formed, and that no other IDevID was ever bound to that TPM (one device per TPM, recorded
with the serial). It cannot tell from one EST round that the CSR's key is in *that* TPM (that
would need the TPM to certify the key with its AK, and the AK to be activated against the EK: a
second round trip EST's simpleenroll does not have); that fact is the station's, as it is the
manufacturing process's when the in-process CA issues. A wrong binding is not a way in: the
owner's gateway still checks at onboarding that the EK chains to a trusted TPM maker, is the one
the IDevID names, and holds the AK that quotes the PCRs.

Paths: /.well-known/est/idevid/{cacerts,simpleenroll,csrattrs}, and the same without a label.
The HTTP side is the gateway's EST adapter (`add_est_routes`), which this service duck-types.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..agent.est_client import EstClient
from ..pki.ca import DEVICE_URN_PREFIX, CertificateAuthority, load_der_cert, make_root, verify_device_chain
from ..pki.hwmodule import (HARDWARE_MODULE_NAME, TPM2_HW_TYPE, parse_hardware_module_name,
                            tpm_binding_san)
from ..pki.keys import (cert_der, cert_fingerprint, cert_pem, generate_p256, load_cert,
                        load_private_key, save_cert, save_private_key)
from ..protocol import est as codec
from ..protocol.errors import Conflict, MalformedMessage, NotAuthorized, NotFound
from ..protocol.est import EnrollmentPolicy, PolicyViolation
from ..transport.http.common import make_app, server_ssl_context
from ..transport.http.est_app import add_est_routes
from ..transport.http.server import serve_forever
from ..util.files import atomic_write, fsync_dir
from .manufacturer import Manufacturer

LABEL = "idevid"
PROV_CA_KEY, PROV_CA_CERT = "provisioning-ca.key", "provisioning-ca.pem"
ISSUED_FILE = "idevids.jsonl"
TLS_CERT, TLS_KEY = "factory-est-tls.pem", "factory-est-tls.key"
STATION_OU = "provisioning station"
STATION_URN_PREFIX = "urn:zerotouch:station:"
DEFAULT_PORT = 8445
_SERIAL = re.compile(r"[0-9a-f]{8}")
_STATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")   # the device type (subject OU)
EK_KEY_ID_LEN = 32   # SHA-256 of the EK SubjectPublicKeyInfo
_CLIENT_KU = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                           data_encipherment=False, key_agreement=False, key_cert_sign=False,
                           crl_sign=False, encipher_only=False, decipher_only=False)


# --- the provisioning CA and station credentials -----------------------------------------------
def provisioning_ca(manufacturer: Manufacturer) -> CertificateAuthority:
    """The manufacturer's CA for provisioning stations (never devices), made on first use."""
    d = manufacturer.dir
    if not (d / PROV_CA_CERT).exists():     # the certificate is written last: it commits the CA
        key = generate_p256()
        save_private_key(d / PROV_CA_KEY, key)
        save_cert(d / PROV_CA_CERT, make_root(key, f"{manufacturer.name} provisioning CA",
                                              org=manufacturer.name))
    return CertificateAuthority(load_private_key(d / PROV_CA_KEY), load_cert(d / PROV_CA_CERT))


@dataclass(frozen=True)
class StationCredential:
    cert_file: Path     # station.pem: the TLS client certificate
    key_file: Path      # station.key (0600)
    ca_file: Path       # manufacturer-ca.pem: verifies the factory EST server (and the IDevIDs)


def issue_station(manufacturer: Manufacturer, name: str, out_dir: Path, *,
                  days: float = 730) -> StationCredential:
    if not _STATION_NAME.fullmatch(name):
        raise ValueError("station name must be 1-64 letters, digits, '.', '_' or '-'")
    ca = provisioning_ca(manufacturer)
    key = generate_p256()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, manufacturer.name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, STATION_OU)])
    # _builder: the CA's end-entity basics (not a CA, AKI, SKI, validity), shared with devices
    cert = (ca._builder(subject, key.public_key(), days)
            .add_extension(_CLIENT_KU, critical=True)
            # a SAN, as RFC 5280 client verification wants one; never a device URN
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                STATION_URN_PREFIX + name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    out = Path(out_dir)
    cred = StationCredential(out / "station.pem", out / "station.key", out / "manufacturer-ca.pem")
    save_private_key(cred.key_file, key)
    save_cert(cred.cert_file, cert)
    atomic_write(cred.ca_file, manufacturer.ca_pem)
    return cred


# --- the issued-serials record -----------------------------------------------------------------
class IssuedSerials:
    """Append-only JSON lines, one per IDevID, shared between processes under flock.

    A line is fsynced before its certificate is returned, so a torn last line (power loss
    mid-append) belongs to a certificate nobody received: it is dropped at the next append.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._seen: dict[str, dict] = {}
        self._offset = 0                    # end of the last complete line read

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.lseek(fd, self._offset, os.SEEK_SET)
            data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            end = data.rfind(b"\n") + 1
            for line in data[:end].splitlines():   # only what other processes appended since
                rec = json.loads(line)
                self._seen[rec["serial"]] = rec
            self._offset += end
            yield fd
        finally:
            os.close(fd)                    # releases the lock

    def get(self, serial: str) -> dict | None:
        with self._locked():
            return self._seen.get(serial)

    def records(self) -> list[dict]:
        with self._locked():
            return list(self._seen.values())

    def record(self, serial: str, issue: Callable[[], tuple[x509.Certificate, dict]], *,
               tpm_ek: str | None = None) -> x509.Certificate:
        """Issue once per serial, and once per TPM (`tpm_ek`: the hex EK key id the IDevID is
        bound to): check, sign and append under one lock."""
        with self._locked() as fd:
            if (old := self._seen.get(serial)) is not None:
                when = dt.datetime.fromtimestamp(old["issued_at"], dt.timezone.utc).isoformat()
                raise Conflict(f"device serial {serial} already has an IDevID (certificate "
                               f"{old['cert_serial']}, issued {when} via station {old['station']!r})",
                               code="duplicate_serial")
            if tpm_ek is not None:
                for old in self._seen.values():
                    if old.get("tpm_ek_sha256") == tpm_ek:
                        raise Conflict(f"the TPM with EK key id {tpm_ek[:16]}… is already bound to "
                                       f"device {old['serial']} (one device per TPM)",
                                       code="duplicate_tpm")
            cert, rec = issue()
            os.ftruncate(fd, self._offset)  # drop a torn tail
            line = json.dumps(rec, sort_keys=True).encode() + b"\n"
            if os.write(fd, line) != len(line):
                raise OSError(f"short write to {self.path}")
            os.fsync(fd)
            if self._offset == 0:
                fsync_dir(self.path.parent)  # the file's creation is durable too
            self._offset += len(line)
            self._seen[serial] = rec
            return cert


# --- the service -------------------------------------------------------------------------------
def csr_serial(csr: x509.CertificateSigningRequest) -> str:
    attrs = csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if len(attrs) != 1:
        raise MalformedMessage("the CSR subject must name the device serial in exactly one "
                               "serialNumber attribute (8 hex digits)")
    serial = str(attrs[0].value).lower()
    if not _SERIAL.fullmatch(serial):
        raise MalformedMessage(f"device serial {str(attrs[0].value)[:32]!r} in the CSR is not "
                               "8 hex digits")
    if serial == "00000000":
        raise PolicyViolation("device serial 00000000 is reserved for examples and never issued")
    return serial


def _names_device(cert: x509.Certificate) -> bool:
    """A device certificate: serialNumber in the subject or a device URN (IDevID, LDevID)."""
    if cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER):
        return True
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    except ValueError:
        raise MalformedMessage("client certificate extensions do not parse") from None
    return any(u.startswith(DEVICE_URN_PREFIX) for u in san.get_values_for_type(x509.UniformResourceIdentifier))


def _check_san(csr: x509.CertificateSigningRequest, urn: str) -> None:
    # The SAN is ours to write; a CSR naming another device is a mix-up on the line.
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(DEVICE_URN_PREFIX) and uri != urn:
            raise PolicyViolation(f"CSR subjectAltName names {uri[:64]} but its serialNumber is {urn}")


def csr_model(csr: x509.CertificateSigningRequest) -> str | None:
    """The device type the CSR's subject names in its OU (at most one), or None."""
    ous = csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not ous:
        return None
    model = str(ous[0].value)
    if len(ous) > 1 or not _MODEL.fullmatch(model):
        raise MalformedMessage("the CSR subject may name one device type in its OU: 1-64 "
                               "letters, digits, '.', '_' or '-'")
    return model


def csr_tpm_binding(csr: x509.CertificateSigningRequest) -> bytes | None:
    """The EK key id of the hardwareModuleName the CSR asks for, or None. Only a TPM 2.0
    binding of the right length is taken; any other otherName in the SAN is refused."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    others = san.get_values_for_type(x509.OtherName)
    if any(o.type_id != HARDWARE_MODULE_NAME for o in others):
        raise PolicyViolation("CSR subjectAltName asks for an otherName other than "
                              "hardwareModuleName, which the factory does not issue")
    if not others:
        return None
    if len(others) > 1:
        raise PolicyViolation("CSR subjectAltName names more than one hardware module")
    try:
        hw_type, ek_id = parse_hardware_module_name(others[0])
    except ValueError as exc:
        raise MalformedMessage(f"CSR {exc}") from None
    if hw_type != TPM2_HW_TYPE:
        raise PolicyViolation(f"CSR hardwareModuleName has hwType {hw_type[:40]}; the factory "
                              f"binds IDevIDs to TPM 2.0 modules ({TPM2_HW_TYPE}) only")
    if len(ek_id) != EK_KEY_ID_LEN:
        raise PolicyViolation("CSR hardwareModuleName hwSerialNum must be the 32-byte SHA-256 "
                              "of the TPM's EK SubjectPublicKeyInfo")
    return ek_id


class FactoryEstService:
    """IDevIDs for CSRs relayed by provisioning stations. Offers what `add_est_routes` calls."""
    basic_configured = False            # stations authenticate with certificates only

    def __init__(self, manufacturer: Manufacturer, *, provisioning_ca: CertificateAuthority,
                 idevid_days: float = 365 * 20, policy: EnrollmentPolicy | None = None,
                 clock: Callable[[], float] = time.time):
        if provisioning_ca.cert == manufacturer.ca.cert:
            raise ValueError("provisioning stations need a CA of their own, not the manufacturer "
                             "CA: otherwise any IDevID could act as a station")
        self.manufacturer, self.provisioning_ca = manufacturer, provisioning_ca
        self.idevid_days, self.clock = idevid_days, clock
        self.policy = policy or EnrollmentPolicy()
        self.issued = IssuedSerials(manufacturer.dir / ISSUED_FILE)

    def authenticate(self, chain: tuple[bytes, ...]) -> x509.Certificate:
        """The station's certificate (leaf first), or 403."""
        if not chain:
            raise NotAuthorized("a provisioning station's TLS client certificate is required",
                                code="unauthenticated")
        leaf = load_der_cert(chain[0])
        if _names_device(leaf):
            raise NotAuthorized("a device certificate (IDevID or LDevID) cannot act as a "
                                "provisioning station", code="not_a_station")
        try:
            verify_device_chain(leaf, [self.provisioning_ca.cert],
                                dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc))
        except NotAuthorized as exc:
            raise NotAuthorized("client certificate is not a station credential of this "
                                f"manufacturer's provisioning CA ({exc.message.partition(': ')[2]})",
                                code="unknown_station") from None
        return leaf

    def issue(self, csr_der: bytes, chain: tuple[bytes, ...]) -> x509.Certificate:
        """Synchronous core: authenticate, check the CSR and serial, issue once, record."""
        station = self.authenticate(chain)
        csr = self.policy.check_csr(csr_der)
        serial = csr_serial(csr)
        urn = DEVICE_URN_PREFIX + serial
        _check_san(csr, urn)
        model = csr_model(csr)
        ek_id = csr_tpm_binding(csr)   # vouched for by the station (see the module docstring)
        names = station.subject.get_attributes_for_oid(NameOID.COMMON_NAME)

        def make():
            cert = self.manufacturer.ca.issue_device(
                csr.public_key(), serial=serial, urn=urn, org=self.manufacturer.name,
                days=self.idevid_days, model=model,
                extra_sans=[tpm_binding_san(ek_id)] if ek_id is not None else [])
            return cert, {"serial": serial, "urn": urn, "cert_serial": format(cert.serial_number, "x"),
                          "station": str(names[0].value) if names else "",
                          "station_sha256": cert_fingerprint(station).hex(),
                          "issued_at": int(self.clock()),
                          **({"model": model} if model else {}),
                          **({"tpm_ek_sha256": ek_id.hex()} if ek_id is not None else {})}
        return self.issued.record(serial, make, tpm_ek=ek_id.hex() if ek_id is not None else None)

    # --- what the EST adapter calls -----------------------------------------------------------
    @staticmethod
    def _label(label: str) -> None:
        if label not in ("", LABEL):
            raise NotFound(f"unknown EST label {label!r}: the factory EST service has {LABEL!r}")

    async def cacerts(self) -> bytes:
        return codec.certs_only([self.manufacturer.ca.cert])

    async def csrattrs(self, label: str, ident=None) -> bytes:
        self._label(label)
        wanted = codec.csr_attrs_for(list(self.policy.key_types))
        # ... and the subject's serialNumber (RFC 7030 §4.5.2: an OID the CSR should include)
        return codec.encode_csr_attrs([*wanted, codec.CsrAttr(NameOID.SERIAL_NUMBER.dotted_string)])

    async def enroll(self, op: str, label: str, csr_der: bytes, ident) -> bytes:
        self._label(label)
        if op != "simpleenroll":
            raise NotFound("the factory EST service only issues IDevIDs (simpleenroll); an IDevID "
                           "is never renewed")
        # Blocking for a few ms (sign, fsync, flock): the factory line's rate is far below that.
        return cert_der(self.issue(csr_der, ident.chain))

    async def serverkeygen(self, label: str, csr_der: bytes, ident):
        raise NotFound("serverkeygen is not offered: an IDevID key is made on the device and "
                       "never leaves it")


# --- HTTP and TLS ------------------------------------------------------------------------------
def factory_est_app(service: FactoryEstService) -> web.Application:
    app = make_app()
    add_est_routes(app, service, trusted_proxies=[])     # no proxy: the TLS peer is the station
    return app


def _hosts(host: str) -> list[str]:
    if host in ("", "0.0.0.0", "::"):
        return ["127.0.0.1", "localhost", socket.gethostname()]
    return [host]


def factory_est_ssl_context(manufacturer: Manufacturer, prov_ca: CertificateAuthority,
                            host: str) -> ssl.SSLContext:
    """Server certificate from the manufacturer CA (which stations already trust), reissued at
    each start; a client certificate from the provisioning CA is required to finish the handshake."""
    d, key = manufacturer.dir, generate_p256()
    hosts = _hosts(host)
    save_private_key(d / TLS_KEY, key)
    save_cert(d / TLS_CERT, manufacturer.ca.issue_server(key.public_key(), common_name=hosts[0],
                                                        hosts=hosts))
    ctx = server_ssl_context(d / TLS_CERT, d / TLS_KEY)
    ctx.load_verify_locations(cadata=cert_pem(prov_ca.cert).decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def serve_factory_est(directory: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                            on_ready=None) -> None:
    manufacturer = Manufacturer(Path(directory))
    prov = provisioning_ca(manufacturer)
    app = factory_est_app(FactoryEstService(manufacturer, provisioning_ca=prov))
    await serve_forever(app, host, port, factory_est_ssl_context(manufacturer, prov, host), on_ready)


# --- the station side --------------------------------------------------------------------------
async def enroll_idevid(url: str, *, station_cert: Path, station_key: Path, ca_pem: bytes | str,
                        csr_der: bytes) -> x509.Certificate:
    """Relay a device's CSR to the factory EST service (`url`: https://host:port); the IDevID,
    checked to certify the CSR's key and to be issued by the manufacturer CA (`ca_pem`)."""
    async with EstClient(url, ca_pem=ca_pem, client_cert_file=Path(station_cert),
                         client_key_file=Path(station_key)) as est:
        cert = await est.simpleenroll(csr_der, label=LABEL)
    pem = ca_pem.encode() if isinstance(ca_pem, str) else ca_pem
    for ca in x509.load_pem_x509_certificates(pem):
        with contextlib.suppress(ValueError, TypeError, InvalidSignature):
            cert.verify_directly_issued_by(ca)
            return cert
    raise NotAuthorized("the factory EST service returned an IDevID the manufacturer CA did not issue")


def idevid_via_est(url: str, *, station_cert: Path, station_key: Path,
                   ca_pem: bytes | str) -> Callable[[bytes], x509.Certificate]:
    """For `Manufacturer.make_device(idevid_via=...)`, which is synchronous and may be called
    from a running event loop: the client runs on its own loop in a worker thread."""
    def via(csr_der: bytes) -> x509.Certificate:
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: asyncio.run(enroll_idevid(
                url, station_cert=station_cert, station_key=station_key, ca_pem=ca_pem,
                csr_der=csr_der))).result()
    return via
