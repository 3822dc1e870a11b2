"""Operational certificates for a TPM device, end to end on real sockets: the device onboards
with attestation, then enrolls (simpleenroll, TLS client certificate = its LDevID, key in the
TPM) and renews (simplereenroll, the current operational key in the TPM) at the gateway's EST
server over TLS, each new pair tested at a real Mosquitto terminus before it is promoted. The
operational keys are made in the TPM and kept as TSS2 key files; no software key appears.
The swtpm sits behind tpm2-abrmd (`swtpm_rm`): the agent (tpm2-pytss) and its TLS children
(OpenSSL's tpm2 provider) share it."""
from __future__ import annotations

import os
import socket
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from support import need
from zerotouch.agent.renewal import OperationalFiles
from zerotouch.agent.runtime import Agent
from zerotouch.agent.state import load_state
from zerotouch.attestation.ek import EkVerifier
from zerotouch.attestation.quote import PcrPolicy
from zerotouch.pki.keys import generate_p256, public_key_der, save_cert, save_private_key
from zerotouch.services.est import EstPolicy, EstService
from zerotouch.services.attestation import TpmAttestation
from zerotouch.services.terminus import Terminus, find_mosquitto, write_terminus_config
from zerotouch.services.vault import load_owner_ca
from zerotouch.transport.http.est_app import est_server_ssl_context
from zerotouch.transport.http.gateway_app import gateway_app
from zerotouch.transport.http.server import start_site

pytest.importorskip("zerotouch.identity.tpm.backend", reason="tpm2-pytss missing")
from zerotouch.identity.tpm import Tpm  # noqa: E402
from zerotouch.identity.tpm.keys import parse_tss2_private_key_pem  # noqa: E402
from zerotouch.identity.tpm.openssl_env import tpm_provider_available  # noqa: E402
from zerotouch.identity.tpm.opkeys import TpmKeyStore  # noqa: E402
from zerotouch.identity.tpm.quote import read_pcrs  # noqa: E402

MODEL = "gw-1000"
HOST = "127.0.0.1"


class Transport:
    """Onboarding straight into the fleet's server cores (EST is on real TLS)."""

    def __init__(self, fleet):
        self.fleet = fleet

    async def find_owner(self, url, body):
        return await self.fleet.rendezvous.find_owner(body)

    async def gateway(self, url, step, body):
        return await getattr(self.fleet.gateway, step)(body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _tss2_public(path) -> bytes:
    blob, _ = parse_tss2_private_key_pem(path.read_bytes())
    return public_key_der(blob.public_key())


@pytest.fixture
async def est_gateway(fleet, tmp_path):
    """The fleet's gateway with its EST server on TLS, asking for client certificates from the
    owner and manufacturer CAs (as `gateway serve` does)."""
    owner_ca = load_owner_ca(tmp_path / "vault")
    key = generate_p256()
    tls = tmp_path / "gw-tls"
    tls.mkdir()
    save_private_key(tls / "gw.key", key)
    save_cert(tls / "gw.pem", owner_ca.issue_server(key.public_key(), common_name=HOST, hosts=[HOST]))
    cas = [fleet.manufacturer.ca.cert]
    est = EstService(fleet.store, fleet.vault, EstPolicy.from_config(None), manufacturer_cas=cas)
    app = gateway_app(fleet.gateway, admin_token="t" * 32, est_service=est)
    ctx = est_server_ssl_context(tls / "gw.pem", tls / "gw.key", [owner_ca.cert, *cas])
    runner = await start_site(app, HOST, 0, ctx)
    yield runner.addresses[0][1], owner_ca
    await runner.cleanup()


async def test_tpm_device_enrolls_and_renews_operational_certificates_in_its_tpm(
        fleet, est_gateway, swtpm_rm, tmp_path):
    if find_mosquitto() is None:
        need("Mosquitto", "apt-get install mosquitto")
    if not tpm_provider_available():
        need("tpm2-openssl", "apt-get install tpm2-openssl")
    gw_port, owner_ca = est_gateway
    terminus = write_terminus_config(tmp_path / "terminus", ca=owner_ca, port=_free_port())
    fleet.gateway.cfg.terminus_port = terminus.port
    fleet.gateway.cfg.settings = {**fleet.gateway.cfg.settings, "est_operational": True}
    with Tpm(swtpm_rm.tcti) as tpm:
        policy = PcrPolicy.capture(MODEL, read_pcrs(tpm, range(8)))
    fleet.gateway.tpm = TpmAttestation(
        EkVerifier.from_pem([swtpm_rm.ca.root_pem], [swtpm_rm.ca.intermediate_pem]), {MODEL: policy})
    dev = fleet.manufacturer.make_device(fleet.tmp / "factory", fleet.info, identity="tpm",
                                         tcti=swtpm_rm.tcti, model=MODEL)
    await fleet.rendezvous.register(dev.registration)
    await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip=HOST,
                                 cport=gw_port, cfingerprint=fleet.owner_fp_hex)
    await fleet.gateway.register_label(dev.label.url, "tpm device")
    d = dev.device_dir

    async with Terminus(terminus):
        agent = Agent(d, transport=Transport(fleet))
        t0 = time.perf_counter()
        report = await agent.run(telemetry=2)
        enroll_s = time.perf_counter() - t0
        assert report.error is None, (report.error, report.errors)
        assert report.operational == "promoted" and agent.renewals[-1].tested
        assert report.telemetry_sent == 2          # on the operational pair, key in the TPM
        files = OperationalFiles(d, keys=TpmKeyStore(swtpm_rm.tcti))
        assert agent.terminus_credentials(load_state(d)) == (files.cert_file, files.key_file)
        first = files.current()
        ldevid = x509.load_pem_x509_certificate((d / "ldevid.pem").read_bytes())
        assert first is not None and first.subject == ldevid.subject
        assert first.serial_number != ldevid.serial_number
        assert files.key_file.name == "operational.tss2.pem"
        assert files.key_file.read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")
        assert public_key_der(first.public_key()) == _tss2_public(files.key_file)
        assert oct(files.key_file.stat().st_mode & 0o777) == "0o600"

        # renewal: simplereenroll authenticated by the current operational key in the TPM
        t0 = time.perf_counter()
        result = await agent.renew_if_due(force=True)
        renew_s = time.perf_counter() - t0
        assert result.outcome == "promoted" and result.tested, result.error
        second = files.current()
        assert second.serial_number != first.serial_number and second.subject == first.subject
        assert public_key_der(second.public_key()) != public_key_der(first.public_key())
        assert public_key_der(second.public_key()) == _tss2_public(files.key_file)
        prev = x509.load_pem_x509_certificate(files.prev_cert_file.read_bytes())
        assert prev.serial_number == first.serial_number
        assert _tss2_public(files.prev_key_file) == public_key_der(first.public_key())
        # the terminus takes the renewed pair: telemetry on it
        again = await Agent(d, transport=Transport(fleet)).run(telemetry=1)
        assert again.straight_to_terminus and again.telemetry_sent == 1, again.error
        assert again.operational == "not_due"
    # no software key anywhere in the device directory, nothing left staged
    assert not list(d.glob("*.key"))
    assert not files.new_key_file.exists() and not files.new_csr_file.exists()
    print(f"\nTPM operational: onboard+enroll+test+2 msgs {enroll_s:.2f} s, renew {renew_s:.2f} s")


def test_tpm_operational_files_survive_a_crash_between_the_renames(swtpm, tmp_path):
    """The swap's crash recovery works the same with TSS2 key files: a promotion cut after the
    certificate moved is finished by recover(); the key the CSR certifies was made in the TPM."""
    from zerotouch.identity.tpm.keys import provision
    from zerotouch.pki.ca import CertificateAuthority, make_root

    with Tpm(swtpm.tcti) as tpm:
        provision(tpm, os.urandom(16))
    files = OperationalFiles(tmp_path, keys=TpmKeyStore(swtpm.tcti))
    csr = x509.load_der_x509_csr(files.pending_csr("0a0b0c0d", "urn:x:0a0b0c0d"))
    assert csr.is_signature_valid
    assert public_key_der(csr.public_key()) == _tss2_public(files.new_key_file)
    # the CSR in flight comes back unchanged (same key, RFC 7030 §4.2.3), no new TPM key
    assert files.pending_csr("0a0b0c0d", "urn:x:0a0b0c0d") == csr.public_bytes(Encoding.DER)
    ca_key = generate_p256()
    ca = CertificateAuthority(ca_key, make_root(ca_key, "test CA"))
    cert = ca.issue_device(csr.public_key(), serial="0a0b0c0d", urn="urn:x:0a0b0c0d")
    files.stage(cert)
    assert files.staged() == cert and files.current() is None
    os.replace(files.new_cert_file, files.cert_file)   # the crash: certificate moved, key not
    assert files.current() is None
    files.recover()
    assert files.current() == cert and not files.new_key_file.exists()
    assert not files.new_csr_file.exists()
