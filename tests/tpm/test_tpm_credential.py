"""TPM 2.0 foundation against swtpm: EK certificate chain, MakeCredential in pure Python,
ActivateCredential in the TPM, the different-TPM attack, tampering, and handle hygiene."""
from __future__ import annotations

import struct
import time

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from zerotouch.attestation.credential import check_ak_public, make_credential, name_of_public

try:  # without tpm2-pytss the swtpm fixtures skip (or fail in CI) with an install hint
    from zerotouch.identity.tpm import ActivationError, Tpm, TpmError
except ImportError:  # pragma: no cover
    ActivationError = TpmError = Exception
    Tpm = None


def _verify_issued(child: x509.Certificate, issuer: x509.Certificate) -> None:
    """Signature and names: child is directly issued by issuer (RSA PKCS#1 v1.5 or ECDSA)."""
    child.verify_directly_issued_by(issuer)


def ek_chain_ok(ek_der: bytes, roots_pem: list[bytes], intermediates_pem: list[bytes]) -> bool:
    """EK certificates are not TLS certificates (no SAN, TCG EKU), so walk the chain by hand:
    EK -> an intermediate -> a trusted root, each signature and issuer name checked."""
    ek = x509.load_der_x509_certificate(ek_der)
    roots = [x509.load_pem_x509_certificate(p) for p in roots_pem]
    inters = [x509.load_pem_x509_certificate(p) for p in intermediates_pem]
    for inter in inters:
        try:
            _verify_issued(ek, inter)
        except (InvalidSignature, ValueError, TypeError):
            continue
        bc = inter.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            continue
        for root in roots:
            try:
                _verify_issued(inter, root)
                return True
            except (InvalidSignature, ValueError, TypeError):
                continue
    return False


# -- against swtpm --------------------------------------------------------------------------

def test_ek_certificate_chains_to_swtpm_local_ca(swtpm):
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.ek_type == "EK-RSA2048"  # swtpm_setup 0.7 makes RSA 2048 + ECC P-384 certs
        der = tpm.ek_certificate()
        assert der
        cert = x509.load_der_x509_certificate(der)
        # the certificate names the key the TPM re-creates from the TCG default template
        assert cert.public_key().public_numbers() == tpm.ek_public_key().public_numbers()
    assert ek_chain_ok(der, [swtpm.ca.root_pem], [swtpm.ca.intermediate_pem])


def test_ek_from_unknown_manufacturer_is_rejected(swtpm_factory, other_tpm_ca, tpm_ca):
    rogue = swtpm_factory(other_tpm_ca)
    with Tpm(rogue.tcti) as tpm:
        der = tpm.ek_certificate()
    trusted = swtpm_factory(tpm_ca)  # make sure the trusted CA exists
    assert not ek_chain_ok(der, [trusted.ca.root_pem], [trusted.ca.intermediate_pem])
    assert not ek_chain_ok(der, [trusted.ca.root_pem], [rogue.ca.intermediate_pem])
    assert ek_chain_ok(der, [rogue.ca.root_pem], [rogue.ca.intermediate_pem])


@pytest.mark.parametrize("ek_type", ["EK-RSA2048", "EK-ECC256"])
def test_make_credential_activated_by_tpm(swtpm, ek_type):
    with Tpm(swtpm.tcti, ek_type=ek_type) as tpm:
        if ek_type == "EK-RSA2048":
            ek_pub = x509.load_der_x509_certificate(tpm.ek_certificate()).public_key()
            assert isinstance(ek_pub, rsa.RSAPublicKey)
        else:  # swtpm has no P-256 EK certificate; the key itself exercises ECDH + KDFe
            ek_pub = tpm.ek_public_key()
            assert isinstance(ek_pub, ec.EllipticCurvePublicKey)
        ak = tpm.create_ak()
        h = tpm.load_ak(ak)
        name = check_ak_public(ak.public)
        assert name == name_of_public(ak.public) == tpm.name(h)
        for secret in (b"\x01", b"s" * 32, b"nonce-1234567890"):
            blob, enc = make_credential(ek_pub, name, secret)
            assert tpm.activate_credential(h, blob, enc) == secret


def test_ak_from_a_different_tpm_fails_activation(swtpm_factory):
    """The attack: an attacker with a genuine EK certificate (TPM A) presents an AK of another
    TPM B. The credential is bound to (EK_A, name(AK_B)); neither TPM can activate it."""
    a, b = swtpm_factory(), swtpm_factory()
    with Tpm(a.tcti) as ta, Tpm(b.tcti) as tb:
        ek_a = x509.load_der_x509_certificate(ta.ek_certificate()).public_key()
        ak_a, ak_b = ta.create_ak(), tb.create_ak()
        ha, hb = ta.load_ak(ak_a), tb.load_ak(ak_b)
        blob, enc = make_credential(ek_a, name_of_public(ak_b.public), b"only-for-tpm-a-ak")
        with pytest.raises(ActivationError):
            ta.activate_credential(ha, blob, enc)  # TPM A: AK name mismatch -> integrity
        with pytest.raises(ActivationError):
            tb.activate_credential(hb, blob, enc)  # TPM B: cannot recover the seed (wrong EK)
        # an AK blob from TPM B does not even load in TPM A
        with pytest.raises(TpmError):
            ta.load_ak(ak_b)
        assert ta.transient_handles() and not ta.session_handles()
        assert not tb.session_handles()


def test_tampered_credential_fails(swtpm):
    with Tpm(swtpm.tcti) as tpm:
        ek = x509.load_der_x509_certificate(tpm.ek_certificate()).public_key()
        ak = tpm.create_ak()
        h = tpm.load_ak(ak)
        name = name_of_public(ak.public)
        blob, enc = make_credential(ek, name, b"secret-secret")
        for i in (3, len(blob) - 1):  # a bit of the HMAC, a bit of encIdentity
            bad = bytearray(blob)
            bad[i] ^= 0x01
            with pytest.raises(ActivationError):
                tpm.activate_credential(h, bytes(bad), enc)
        bad_secret = bytearray(enc)
        bad_secret[10] ^= 0x80
        with pytest.raises(ActivationError):
            tpm.activate_credential(h, blob, bytes(bad_secret))
        # the untouched credential still works, and failures leaked no session
        assert tpm.activate_credential(h, blob, enc) == b"secret-secret"
        assert tpm.session_handles() == []


def test_fifty_rounds_leak_no_handles(swtpm):
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.transient_handles() == [] and tpm.session_handles() == []
        ek = x509.load_der_x509_certificate(tpm.ek_certificate()).public_key()
        ak = tpm.create_ak()
        make_ms = []
        for i in range(50):
            h = tpm.load_ak(ak)
            secret = struct.pack(">I", i) * 4
            t0 = time.perf_counter()
            blob, enc = make_credential(ek, name_of_public(ak.public), secret)
            make_ms.append((time.perf_counter() - t0) * 1000)
            assert tpm.activate_credential(h, blob, enc) == secret
            tpm.unload(h)
            assert len(tpm.transient_handles()) == (0 if tpm.ek_is_persistent else 1)  # only the EK
            assert tpm.session_handles() == []
        timings = {k: sorted(v) for k, v in tpm.timings.items()}
        timings["make_credential_py"] = sorted(make_ms)
        print("\nTPM timings (ms, median):",
              {k: round(v[len(v) // 2], 2) for k, v in timings.items()})
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.transient_handles() == []
        assert tpm.session_handles() == []
