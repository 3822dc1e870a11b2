"""`zerotouch policy ...` and `zerotouch tpm ...` against a real swtpm: capture a policy from a
known-good TPM, install it, trust a TPM maker, extend a PCR; bad input gets a clear error and
changes nothing."""
from __future__ import annotations

import json

import pytest

from zerotouch.attestation.quote import PcrPolicy
from zerotouch.cli.main import main

pytest.importorskip("tpm2_pytss", reason="apt-get install libtss2-dev; pip install tpm2-pytss")


def test_capture_install_list_and_extend(swtpm, tmp_path, capsys):
    gw = tmp_path / "gw"
    out = tmp_path / "gw-1000.json"
    assert main(["policy", "capture", "--name", "gw-1000", "--tcti", swtpm.tcti, "--pcrs", "0-3,7",
                 "--out", str(out)]) == 0
    policy = PcrPolicy.from_json(out.read_text())
    assert sorted(policy.pcrs) == [0, 1, 2, 3, 7]
    assert main(["policy", "install", "--dir", str(gw), str(out)]) == 0
    assert (gw / "policies" / "gw-1000.json").exists()
    assert main(["policy", "install", "--dir", str(gw), "--type", "default", str(out)]) == 0
    capsys.readouterr()
    assert main(["policy", "list", "--dir", str(gw)]) == 0
    listed = capsys.readouterr().out
    assert "gw-1000" in listed and "default" in listed and "0,1,2,3,7" in listed
    # a boot loader measuring other software: PCR 7 moves, the captured policy no longer holds
    assert main(["tpm", "extend", "--tcti", swtpm.tcti, "--pcr", "7", "--data", "grub 2.12"]) == 0
    new_value = capsys.readouterr().out.split("is now ")[1].strip()
    assert new_value != "00" * 32
    assert policy.violations({**{i: policy.pcrs[i][0] for i in policy.pcrs},
                              7: bytes.fromhex(new_value)})


def test_trust_accepts_ca_certificates_only(swtpm, tmp_path, capsys):
    gw = tmp_path / "gw"
    ca = swtpm.ca.dir
    assert main(["tpm", "trust", "--dir", str(gw), "--root", str(ca / "swtpm-localca-rootca-cert.pem"),
                 "--intermediate", str(ca / "issuercert.pem")]) == 0
    assert len(list((gw / "tpm" / "roots").glob("*.pem"))) == 1
    assert len(list((gw / "tpm" / "intermediates").glob("*.pem"))) == 1
    # an end-entity certificate is refused, nothing added
    from zerotouch.identity.tpm import Tpm
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    with Tpm(swtpm.tcti) as tpm:
        ek_pem = x509.load_der_x509_certificate(tpm.ek_certificate()).public_bytes(Encoding.PEM)
    (tmp_path / "ek.pem").write_bytes(ek_pem)
    capsys.readouterr()
    assert main(["tpm", "trust", "--dir", str(gw), "--root", str(tmp_path / "ek.pem")]) == 2
    assert "is not a CA certificate" in capsys.readouterr().err
    assert len(list((gw / "tpm" / "roots").glob("*.pem"))) == 1


@pytest.mark.parametrize("args, message", [
    (["policy", "capture", "--name", "x", "--tcti", "swtpm:host=127.0.0.1,port=1", "--pcrs", "0-99"],
     "PCRs 0..23"),
    (["policy", "capture", "--name", "../etc", "--tcti", "swtpm:host=127.0.0.1,port=1"], "policy name"),
    (["policy", "capture", "--name", "x"], "which TPM?"),
    (["tpm", "extend", "--tcti", "swtpm:host=127.0.0.1,port=1", "--pcr", "24", "--data", "x"], "0..23"),
])
def test_bad_input_is_a_clear_error(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_install_refuses_a_broken_policy_and_keeps_the_old_one(tmp_path, capsys):
    gw = tmp_path / "gw"
    good = tmp_path / "good.json"
    good.write_text(PcrPolicy.capture("gw-1000", {0: bytes(32)}).to_json())
    assert main(["policy", "install", "--dir", str(gw), str(good)]) == 0
    installed = (gw / "policies" / "gw-1000.json").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "gw-1000", "bank": "sha256", "pcrs": {"0": ["zz"]}}))
    capsys.readouterr()
    assert main(["policy", "install", "--dir", str(gw), str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert (gw / "policies" / "gw-1000.json").read_text() == installed


def test_manufacture_refuses_several_devices_on_one_tpm(tmp_path, capsys):
    (tmp_path / "rv.json").write_text(json.dumps({"url": "https://127.0.0.1:1", "key_pem": "x",
                                                  "tls_ca_pem": ""}))
    assert main(["manufacture", "--dir", str(tmp_path / "f"), "--rendezvous-info",
                 str(tmp_path / "rv.json"), "--identity", "tpm", "--tcti", "swtpm:port=1",
                 "--count", "2"]) == 2
