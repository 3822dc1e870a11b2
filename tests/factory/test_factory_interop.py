"""`zerotouch factory` as its own process, driven by curl and openssl alone."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys

import pytest

from zerotouch.pki.keys import load_cert

from factory_harness import sh


def run_cli(*argv: str) -> int:
    from zerotouch.cli.main import main
    return main(list(argv))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def served(tmp_path):
    """`factory est-serve` in its own process; yields (EST base URL, station dir)."""
    from zerotouch.services.manufacturer import Manufacturer
    Manufacturer(tmp_path / "mfr")
    assert run_cli("factory", "station", "--dir", str(tmp_path / "mfr"), "--name", "line-7",
                   "--out", str(tmp_path / "station")) == 0
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zerotouch.cli", "factory", "est-serve", "--dir", str(tmp_path / "mfr"),
        "--port", str(port), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"factory EST listening on https://127.0.0.1:" in line, \
            line + await proc.stderr.read(4000)
        yield f"https://127.0.0.1:{port}/.well-known/est", tmp_path / "station"
    finally:
        proc.terminate()
        await proc.wait()


def need_tools() -> None:
    from support import need
    for tool, pkg in (("curl", "curl"), ("openssl", "openssl"), ("base64", "coreutils")):
        if shutil.which(tool) is None:
            need(tool, f"apt-get install {pkg}")


async def test_curl_and_openssl_get_an_idevid(served, tmp_path):
    need_tools()
    est, station = served
    work = tmp_path / "client"
    work.mkdir()
    ca = station / "manufacturer-ca.pem"
    curl = f"curl -sS --fail-with-body --cacert {ca} --cert {station}/station.pem --key {station}/station.key"
    enroll = f"-H 'Content-Type: application/pkcs10' --data-binary @csr.b64 {est}/idevid/simpleenroll"

    out = await sh(f"{curl} {est}/idevid/cacerts | base64 -d | openssl pkcs7 -inform DER -print_certs"
                   f" | openssl x509 -noout -fingerprint -sha256", work)
    assert out == await sh(f"openssl x509 -in {ca} -noout -fingerprint -sha256", work)
    out = await sh(f"{curl} {est}/idevid/csrattrs | base64 -d | openssl asn1parse -inform DER", work)
    assert "serialNumber" in out and "prime256v1" in out

    # the device's CSR, made by openssl req, naming the serial; the station relays it
    await sh("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
             "-keyout device.key -subj /CN=dev/serialNumber=4d2f9a01 -outform DER 2>/dev/null "
             "| base64 > csr.b64", work)
    await sh(f"{curl} {enroll} | base64 -d | openssl pkcs7 -inform DER -print_certs > idevid.pem", work)
    text = await sh(f"openssl verify -CAfile {ca} idevid.pem && openssl x509 -in idevid.pem "
                    "-noout -subject -ext subjectAltName,extendedKeyUsage", work)
    assert "idevid.pem: OK" in text and "serialNumber = 4d2f9a01" in text
    assert "urn:dev:zerotouch:4d2f9a01" in text and "TLS Web Client Authentication" in text
    assert load_cert(work / "idevid.pem").issuer == load_cert(ca).subject

    # the same serial again: 409 with the reason in text
    out = await sh(f"curl -sS --cacert {ca} --cert {station}/station.pem --key {station}/station.key "
                   f"-w '\\n%{{http_code}}' {enroll}", work)
    assert out.strip().endswith("409") and "already has an IDevID" in out
    # no station certificate: the TLS handshake fails, nothing is issued
    out = await sh(f"curl -sS --cacert {ca} {enroll} || echo refused rc=$?", work)
    assert "refused rc=" in out, out
    records = (tmp_path / "mfr" / "idevids.jsonl").read_text().splitlines()
    assert len(records) == 1 and '"station": "line-7"' in records[0]


def test_station_command_writes_a_credential(tmp_path, capsys):
    from zerotouch.services.manufacturer import Manufacturer
    m = Manufacturer(tmp_path / "mfr")
    assert run_cli("factory", "station", "--dir", str(m.dir), "--name", "line-2",
                   "--out", str(tmp_path / "st")) == 0
    assert "line-2" in capsys.readouterr().out
    assert oct(os.stat(tmp_path / "st" / "station.key").st_mode & 0o777) == "0o600"
    assert load_cert(tmp_path / "st" / "manufacturer-ca.pem") == m.ca.cert
    assert (m.dir / "provisioning-ca.pem").exists()
    assert run_cli("factory", "station", "--dir", str(m.dir), "--name", "bad/name",
                   "--out", str(tmp_path / "st2")) == 2


async def test_manufacture_command_enrolls_idevids_at_the_factory_service(served, tmp_path):
    """`zerotouch manufacture --factory-est URL --station DIR`: the device keys stay in their
    directories; the IDevIDs come from the factory EST service and are on its record."""
    import json
    from cryptography import x509
    from zerotouch.pki.keys import generate_p256, public_key_pem
    from zerotouch.services.manufacturer import RendezvousInfo
    est, station = served
    RendezvousInfo(url="https://127.0.0.1:9", key_pem=public_key_pem(generate_p256().public_key()).decode(),
                   tls_ca_pem="").save(tmp_path / "rv.json")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zerotouch.cli", "manufacture", "--dir", str(tmp_path / "mfr"),
        "--rendezvous-info", str(tmp_path / "rv.json"), "--count", "2", "--no-register",
        "--factory-est", est.rsplit("/.well-known", 1)[0], "--station", str(station),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    serials = [line.split()[0] for line in out.decode().splitlines() if line.strip()]
    assert len(serials) == 2
    recorded = [json.loads(line)["serial"] for line in (tmp_path / "mfr" / "idevids.jsonl").read_text().splitlines()]
    assert set(serials) <= set(recorded)
    ca = load_cert(tmp_path / "mfr" / "manufacturer-ca.pem")
    for serial in serials:
        cert = x509.load_pem_x509_certificate((tmp_path / "mfr" / "devices" / serial / "idevid.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert serial in cert.subject.rfc4514_string()
