"""Our EST server driven by clients nobody here wrote: curl and openssl, as in RFC 7030's examples."""
from __future__ import annotations

import shutil

from zerotouch.pki.keys import load_cert
from zerotouch.protocol import est as codec


from support import sh  # noqa: E402,F401


def need_tools() -> None:
    from support import need
    for tool, pkg in (("curl", "curl"), ("openssl", "openssl"), ("base64", "coreutils")):
        if shutil.which(tool) is None:
            need(tool, f"apt-get install {pkg}")


async def test_curl_and_openssl_enroll_and_reenroll(server, env, tmp_path):
    need_tools()
    dev, _idevid, _ = await env.device()
    work = tmp_path / "client"
    work.mkdir()
    idevid, idkey = dev.device_dir / "idevid.pem", dev.device_dir / "idevid.key"
    est = f"{server.url}{codec.WELL_KNOWN}"
    curl = f"curl -sS --fail-with-body --cacert {server.ca_file}"

    # cacerts -> PKCS#7 -> the owner CA
    out = await sh(f"{curl} {est}/cacerts | base64 -d | openssl pkcs7 -inform DER -print_certs "
                   "> owner.pem && openssl x509 -in owner.pem -noout -fingerprint -sha256", work)
    ours = await sh(f"openssl x509 -in {env.fleet.tmp / 'vault' / 'owner-ca.pem'} -noout "
                    "-fingerprint -sha256", work)
    assert out == ours

    # csrattrs: what openssl's asn1parse sees is what we ask for
    out = await sh(f"{curl} {est}/csrattrs | base64 -d | openssl asn1parse -inform DER", work)
    assert "id-ecPublicKey" in out and "prime256v1" in out and "ecdsa-with-SHA256" in out

    # simpleenroll with the IDevID as TLS client certificate and a CSR made by openssl req
    await sh("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
             "-keyout ldevid.key -subj /CN=x -outform DER 2>/dev/null | base64 > csr.b64", work)
    await sh(f"{curl} --cert {idevid} --key {idkey} -H 'Content-Type: application/pkcs10' "
             f"--data-binary @csr.b64 {est}/simpleenroll | base64 -d "
             "| openssl pkcs7 -inform DER -print_certs > ldevid.pem", work)
    text = await sh("openssl x509 -in ldevid.pem -noout -subject -ext subjectAltName,extendedKeyUsage"
                    " && openssl verify -CAfile owner.pem ldevid.pem", work)
    assert f"serialNumber = {dev.serial}" in text and dev.urn in text
    assert "TLS Web Client Authentication" in text and "ldevid.pem: OK" in text
    ldevid = load_cert(work / "ldevid.pem")

    # simplereenroll with that certificate as the client certificate; the subject is kept
    await sh(f"openssl req -new -key ldevid.key -subj /CN={dev.serial}/serialNumber={dev.serial} "
             "-outform DER | base64 > renew.b64", work)
    await sh(f"{curl} --cert ldevid.pem --key ldevid.key -H 'Content-Type: application/pkcs10' "
             f"--data-binary @renew.b64 {est}/simplereenroll | base64 -d "
             "| openssl pkcs7 -inform DER -print_certs > renewed.pem", work)
    renewed = load_cert(work / "renewed.pem")
    assert renewed.subject == ldevid.subject and renewed.serial_number != ldevid.serial_number

    # the operational stage, authenticated by the LDevID
    await sh("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
             "-keyout op.key -subj /CN=op -outform DER 2>/dev/null | base64 > op.b64", work)
    out = await sh(f"{curl} --cert ldevid.pem --key ldevid.key -H 'Content-Type: application/pkcs10' "
                   f"--data-binary @op.b64 {est}/operational/simpleenroll | base64 -d "
                   "| openssl pkcs7 -inform DER -print_certs | openssl x509 -noout -subject", work)
    assert dev.serial in out
    kinds = sorted(r.kind for r in await env.certs_of(dev.serial))
    assert kinds == ["ldevid", "ldevid", "operational"]

    # and a refusal reads as text: a reenroll with another subject
    await sh("openssl req -new -key ldevid.key -subj /CN=other -outform DER | base64 > bad.b64", work)
    out = await sh(f"curl -sS --cacert {server.ca_file} --cert ldevid.pem --key ldevid.key "
                   "-H 'Content-Type: application/pkcs10' --data-binary @bad.b64 "
                   f"-w '\\n%{{http_code}}' {est}/simplereenroll", work)
    assert out.strip().endswith("400") and "subject" in out
