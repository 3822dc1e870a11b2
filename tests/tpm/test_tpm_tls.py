"""TLS client authentication with an LDevID key that lives in the TPM (tpm2-openssl provider).

The TLS client runs in a child Python process started with `tpm_tls_environment(...)`, as the
agent would: OpenSSL providers can only be activated by configuration read at start-up.
The handshake needs a resource manager in front of the TPM (`swtpm_rm`: tpm2-abrmd, as
/dev/tpmrm0 on a device): with the provider's digests, it uses more objects than swtpm's 3
slots. Straight on swtpm (`swtpm`) the parent closes its own TPM connection first: swtpm
serves one connection at a time and the provider holds its connection for the child's lifetime.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from zerotouch.identity.tpm.core import Tpm
from zerotouch.identity.tpm.keys import (
    create_signing_key, parse_tss2_private_key_pem, provision, tss2_private_key_pem)
from zerotouch.identity.tpm.openssl_env import tpm_provider_available, tpm_tls_environment
from zerotouch.pki.external_csr import build_csr

pytestmark = pytest.mark.skipif(not tpm_provider_available(),
                                reason="tpm2-openssl provider not installed")

PEM = serialization.Encoding.PEM
NOW = dt.datetime.now(dt.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class LocalTestCA:
    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._issue(_name("test CA"), self.key.public_key(), ca=True)

    def _issue(self, subject, public_key, *, ca=False, dns=None):
        b = (x509.CertificateBuilder().subject_name(subject)
             .issuer_name(_name("test CA")).public_key(public_key)
             .serial_number(x509.random_serial_number())
             .not_valid_before(NOW - dt.timedelta(minutes=1))
             .not_valid_after(NOW + dt.timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if dns:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        return b.sign(self.key, hashes.SHA256())

    def issue_from_csr(self, csr_der: bytes) -> x509.Certificate:
        csr = x509.load_der_x509_csr(csr_der)
        assert csr.is_signature_valid
        return self._issue(csr.subject, csr.public_key())


@pytest.fixture
def device_files(swtpm, tmp_path):
    """Provisioned swtpm + LDevID key in it + certificate for that key from a test CA."""
    return _device_files(swtpm.tcti, tmp_path)


@pytest.fixture
def rm_device_files(swtpm_rm, tmp_path):
    """The same, with the swtpm behind a resource manager (tpm2-abrmd)."""
    return _device_files(swtpm_rm.tcti, tmp_path)


def _device_files(tcti: str, tmp_path: Path):
    ca = LocalTestCA()
    with Tpm(tcti) as tpm:
        provision(tpm, os.urandom(16))
        blob = create_signing_key(tpm)
        with blob.load_signer(tpm) as signer:
            csr = build_csr(_name("SN-TLS"), signer.public_key(), signer.sign_der)
    cert = ca.issue_from_csr(csr)
    (tmp_path / "ca.pem").write_bytes(ca.cert.public_bytes(PEM))
    (tmp_path / "ldevid.pem").write_bytes(cert.public_bytes(PEM))
    (tmp_path / "ldevid.tss2.pem").write_bytes(tss2_private_key_pem(blob))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = ca._issue(_name("localhost"), server_key.public_key(), dns="localhost")
    (tmp_path / "server.pem").write_bytes(
        server_cert.public_bytes(PEM) + server_key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp_path, cert


def _server(files: Path):
    """One-shot TLS server requiring a client certificate from the test CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files / "server.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(files / "ca.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list = []

    def serve():
        conn, _ = listener.accept()
        conn.settimeout(30)
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                seen.append(tls.getpeercert(binary_form=True))
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as e:
            seen.append(e)
        finally:
            listener.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], seen, thread


CLIENT = """
import socket, ssl, sys
import cryptography.x509  # the wheel's own OpenSSL reads the same OPENSSL_CONF
files, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context(cafile=files + "/ca.pem")
ctx.load_cert_chain(files + "/ldevid.pem", files + "/ldevid.tss2.pem")
print("loaded", flush=True)
if port:
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                         server_hostname="localhost") as s:
        print(s.version(), s.recv(2).decode(), flush=True)
"""


def _child_cmd(files: Path, port: int, tcti: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, **tpm_tls_environment(tcti, files / "openssl"))
    return [sys.executable, "-c", CLIENT, str(files), str(port)], env


def _child(files: Path, port: int, tcti: str) -> subprocess.CompletedProcess:
    cmd, env = _child_cmd(files, port, tcti)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_child_loads_tss2_key_and_cryptography_still_works(device_files, swtpm):
    files, _ = device_files
    r = _child(files, 0, swtpm.tcti)
    assert r.returncode == 0, r.stderr
    assert "loaded" in r.stdout


def test_tls_handshake_with_tpm_resident_client_key(rm_device_files, swtpm_rm):
    files, cert = rm_device_files
    port, seen, thread = _server(files)
    r = _child(files, port, swtpm_rm.tcti)
    thread.join(30)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.split()[-2:] == ["TLSv1.3", "ok"], r.stdout
    assert seen and isinstance(seen[0], bytes), seen
    assert x509.load_der_x509_certificate(seen[0]) == cert


def test_onboarding_and_tls_use_the_tpm_at_the_same_time(rm_device_files, swtpm_rm):
    """Through the resource manager, this process (tpm2-pytss, as onboarding/telemetry would)
    keeps a TPM context with the LDevID loaded and signs with it while the TLS child holds the
    provider's connection and does its handshake."""
    files, cert = rm_device_files
    blob, _parent = parse_tss2_private_key_pem((files / "ldevid.tss2.pem").read_bytes())
    port, seen, thread = _server(files)
    signed = 0
    with Tpm(swtpm_rm.tcti) as tpm, blob.load_signer(tpm) as signer:
        cmd, env = _child_cmd(files, port, swtpm_rm.tcti)
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            while child.poll() is None:
                msg = b"telemetry %d" % signed
                cert.public_key().verify(signer.sign_der(msg), msg, ec.ECDSA(hashes.SHA256()))
                signed += 1
            out, err = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        msg = b"after the child"
        cert.public_key().verify(signer.sign_der(msg), msg, ec.ECDSA(hashes.SHA256()))
    thread.join(30)
    assert child.returncode == 0, err[-1500:]
    assert "TLSv1.3 ok" in out, out
    assert seen and x509.load_der_x509_certificate(seen[0]) == cert
    assert signed >= 1  # at least one signature while the child was running


def test_key_file_does_not_work_with_another_tpm(device_files, swtpm_factory):
    files, _ = device_files
    other = swtpm_factory()
    with Tpm(other.tcti) as tpm:
        provision(tpm, os.urandom(16))  # it has an SRK at the same handle, but another seed
    r = _child(files, 0, other.tcti)
    assert r.returncode != 0
    assert "loaded" not in r.stdout
