"""TPM-resident keys on a fresh swtpm: provisioning, persistence, signing, N_device, LDevID keys,
TSS2 PEM files, handle hygiene."""
from __future__ import annotations

import os
import time

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from zerotouch.identity.tpm.core import EK_PERSISTENT, Tpm, TpmError
from zerotouch.identity.tpm.keys import (IDEVID_PERSISTENT, SRK_PERSISTENT, TpmKeyBlob,
                                         create_signing_key, idevid_signer, is_provisioned,
                                         parse_tss2_private_key_pem, provision,
                                         read_idevid_certificate, read_n_device,
                                         store_idevid_certificate, tss2_private_key_pem)
from zerotouch.pki.external_csr import build_csr

ECDSA = ec.ECDSA(hashes.SHA256())


def _median(xs):
    return round(sorted(xs)[len(xs) // 2], 2)


@pytest.fixture
def provisioned(swtpm):
    n_device = os.urandom(16)
    with Tpm(swtpm.tcti) as tpm:
        result = provision(tpm, n_device)
        assert tpm.transient_handles() == [] and tpm.session_handles() == []
        print("\nprovision:", round(tpm.timings["provision"][0], 1), "ms,",
              sum(tpm.commands.values()), "TPM commands", dict(tpm.commands))
    return swtpm, n_device, result


def test_provision_is_persistent_across_connections(provisioned):
    swtpm, _, result = provisioned
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.ek_is_persistent
        assert tpm.commands["create_primary"] == 0  # the persistent EK, not a new one
        assert tpm.ek_public() == result.ek_public
        assert result.ek_cert is not None and tpm.ek_certificate() == result.ek_cert
        assert tpm.name(tpm.ak_handle())  # the AK is there
        assert idevid_signer(tpm).public_key().public_numbers() == \
            result.idevid_public.public_numbers()
        assert tpm.transient_handles() == []


def test_ek_from_persistent_handle_costs_no_create_primary(provisioned):
    swtpm, _, _ = provisioned
    with Tpm(swtpm.tcti) as tpm:
        tpm.ek()
        assert tpm.commands["create_primary"] == 0
        # GetCapability(handles) + tr_from_tpmpublic (a ReadPublic) + ReadPublic; CreatePrimary
        # of an RSA EK would be 40-60 ms of key derivation on swtpm
        assert sum(tpm.commands.values()) == 3
        assert tpm.persistent_handle(EK_PERSISTENT) == tpm.ek()


def test_idevid_signatures_verify(provisioned):
    swtpm, _, result = provisioned
    with Tpm(swtpm.tcti) as tpm:
        signer = idevid_signer(tpm)
        for msg in (b"", b"hello", os.urandom(5000)):
            result.idevid_public.verify(signer.sign_der(msg), msg, ECDSA)
        with pytest.raises(InvalidSignature):
            result.idevid_public.verify(signer.sign_der(b"a"), b"b", ECDSA)


def test_n_device_reads_back_and_is_write_once(provisioned):
    swtpm, n_device, _ = provisioned
    with Tpm(swtpm.tcti) as tpm:
        assert read_n_device(tpm) == n_device
        nv = tpm.ctx.tr_from_tpmpublic(0x01C90001)
        with pytest.raises(Exception):  # TPM_RC_NV_LOCKED, even with owner auth
            from tpm2_pytss.constants import ESYS_TR
            tpm.ctx.nv_write(nv, b"X" * len(n_device), 0, auth_handle=ESYS_TR.OWNER)
        assert read_n_device(tpm) == n_device


def test_provisioning_twice_is_refused_unless_replace(provisioned):
    swtpm, _, first = provisioned
    with Tpm(swtpm.tcti) as tpm:
        assert is_provisioned(tpm)
        with pytest.raises(TpmError, match="already provisioned"):
            provision(tpm, b"another-secret")
        assert read_n_device(tpm) != b"another-secret"
        again = provision(tpm, b"another-secret", replace=True)
        assert read_n_device(tpm) == b"another-secret"
        assert again.ak_public != first.ak_public  # a new AK
        # a primary key from the same seed and template: the IDevID certificate survives
        assert again.idevid_public.public_numbers() == first.idevid_public.public_numbers()


def test_n_device_size_is_checked(swtpm):
    with Tpm(swtpm.tcti) as tpm:
        for bad in (b"", b"1234567", bytes(33)):
            with pytest.raises(ValueError):
                provision(tpm, bad)
        assert not is_provisioned(tpm)


def test_idevid_certificate_in_nv(provisioned):
    swtpm, _, _ = provisioned
    cert = os.urandom(1200)  # longer than one NV chunk
    with Tpm(swtpm.tcti) as tpm:
        assert read_idevid_certificate(tpm) is None
        store_idevid_certificate(tpm, cert)
    with Tpm(swtpm.tcti) as tpm:
        assert read_idevid_certificate(tpm) == cert


def test_csr_signed_in_the_tpm_verifies(provisioned):
    swtpm, _, result = provisioned
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SN-1"),
                         x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-1")])
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:dev:sn:SN-1")])
    with Tpm(swtpm.tcti) as tpm:
        signer = idevid_signer(tpm)
        csr = x509.load_der_x509_csr(build_csr(subject, signer.public_key(), signer.sign_der,
                                               [san]))
        assert csr.is_signature_valid
        assert csr.public_key().public_numbers() == result.idevid_public.public_numbers()
        key = create_signing_key(tpm)
        with key.load_signer(tpm) as ldevid:
            csr = x509.load_der_x509_csr(build_csr(subject, ldevid.public_key(),
                                                   ldevid.sign_der))
        assert csr.is_signature_valid and csr.subject == subject


def test_tss2_pem_round_trip(provisioned):
    swtpm, _, _ = provisioned
    with Tpm(swtpm.tcti) as tpm:
        blob = create_signing_key(tpm)
        pem = tss2_private_key_pem(blob)
        assert pem.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----\n")
        back, parent = parse_tss2_private_key_pem(pem)
        assert (back, parent) == (blob, SRK_PERSISTENT)
        with back.load_signer(tpm) as signer:  # what was parsed still loads and signs
            blob.public_key().verify(signer.sign_der(b"m"), b"m", ECDSA)
    with pytest.raises(ValueError):
        parse_tss2_private_key_pem(pem.replace(b"TSS2 PRIVATE", b"EC PRIVATE"))


def test_ldevid_key_does_not_load_in_another_tpm(swtpm_factory):
    tpms = [swtpm_factory(), swtpm_factory()]
    for t in tpms:
        with Tpm(t.tcti) as tpm:
            provision(tpm, b"12345678")
    with Tpm(tpms[0].tcti) as tpm:
        blob = create_signing_key(tpm)
    with Tpm(tpms[1].tcti) as tpm, pytest.raises(TpmError):
        with blob.load_signer(tpm):
            pass


def test_hundred_sign_create_load_cycles_leak_nothing(provisioned):
    swtpm, _, result = provisioned
    with Tpm(swtpm.tcti) as tpm:
        idevid = idevid_signer(tpm)
        per_op: dict[str, list[int]] = {}
        for i in range(100):
            msg = i.to_bytes(4, "big")
            result.idevid_public.verify(idevid.sign_der(msg), msg, ECDSA)
            before = sum(tpm.commands.values())
            blob: TpmKeyBlob = create_signing_key(tpm)
            per_op.setdefault("create", []).append(sum(tpm.commands.values()) - before)
            before = sum(tpm.commands.values())
            with blob.load_signer(tpm) as signer:
                blob.public_key().verify(signer.sign_der(msg), msg, ECDSA)
            per_op.setdefault("load+sign+flush", []).append(sum(tpm.commands.values()) - before)
        assert tpm.transient_handles() == [] and tpm.session_handles() == []
        print("\nTPM timings (ms, median):", {k: _median(v) for k, v in tpm.timings.items()},
              "\nTPM commands per op (median):", {k: _median(v) for k, v in per_op.items()})
        # the first create also resolves the SRK handle (one ReadPublic), cached afterwards
        assert max(per_op["create"][1:]) == 1 and max(per_op["load+sign+flush"]) == 3
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.transient_handles() == [] and tpm.session_handles() == []
        assert IDEVID_PERSISTENT in tpm._handles(0x81)
