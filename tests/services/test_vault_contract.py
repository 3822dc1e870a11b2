"""Contract for the `Vault` protocol (services/vault.py), run against every implementation.

Add an implementation by appending one factory to VAULT_FACTORIES: an async callable
(tmp_path, store, monkeypatch) -> VaultUnderTest.
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from zerotouch.pki.ca import device_identity
from zerotouch.pki.keys import generate_p256, spki_fingerprint
from zerotouch.protocol import cose
from zerotouch.protocol.codec import MAX_MESSAGE
from zerotouch.protocol.errors import BadSignature, MalformedMessage, NotFound, ProtocolError
from zerotouch.protocol.proofs import owner_proof
from zerotouch.protocol.sealing import open_secret
from zerotouch.services.vault import (OWNER_KEY, VAULT_KEY_ENV, LocalVault, Vault,
                                      init_vault_dir)
from zerotouch.storage import open_store
from zerotouch.storage.schema import vault_secrets
from vault_harness import start_vault_server

SERIAL = "0a1b2c3d"
URN = f"urn:dev:zerotouch:{SERIAL}"


@dataclass
class VaultUnderTest:
    vault: Vault
    store: object                                        # the SqlStore the vault keeps secrets in
    other_key_vault: Callable[[], Awaitable[Vault]]      # same store, another vault key
    key_files: list[Path]                                # private key material at rest, if on disk
    reopen_with_wrong_key: Callable[[], Awaitable[Vault]] | None = None
    aclose: Callable[[], Awaitable[None]] | None = None  # stop servers, close clients


async def local_vault(tmp_path: Path, store, monkeypatch) -> VaultUnderTest:
    monkeypatch.setenv(VAULT_KEY_ENV, "contract-test-key-" + os.urandom(8).hex())
    init_vault_dir(tmp_path / "vault")
    vault = LocalVault(tmp_path / "vault", store.secrets, store.certs)

    async def other_key_vault() -> Vault:
        monkeypatch.setenv(VAULT_KEY_ENV, "another-key-" + os.urandom(8).hex())
        init_vault_dir(tmp_path / "vault-2")
        return LocalVault(tmp_path / "vault-2", store.secrets, store.certs)

    async def reopen_with_wrong_key() -> Vault:
        monkeypatch.setenv(VAULT_KEY_ENV, "wrong-key-" + os.urandom(8).hex())
        return LocalVault(tmp_path / "vault", store.secrets, store.certs)

    return VaultUnderTest(vault=vault, store=store, other_key_vault=other_key_vault,
                          key_files=[tmp_path / "vault" / OWNER_KEY],
                          reopen_with_wrong_key=reopen_with_wrong_key)


async def remote_vault(tmp_path: Path, store, monkeypatch) -> VaultUnderTest:
    """A RemoteVault over mutual TLS to a vault_app on a real socket, a LocalVault behind it."""
    local = await local_vault(tmp_path, store, monkeypatch)
    servers = [await start_vault_server(local.vault, tmp_path / "vault", tmp_path / "tls")]

    async def other_key_vault() -> Vault:
        other = await local.other_key_vault()
        servers.append(await start_vault_server(other, tmp_path / "vault-2", tmp_path / "tls-2"))
        return servers[-1].client()

    async def reopen_with_wrong_key() -> Vault:
        await local.reopen_with_wrong_key()     # the vault process dies here, before it listens
        return servers[0].client()

    async def aclose() -> None:
        for s in servers:
            await s.close()

    return VaultUnderTest(vault=servers[0].client(), store=store, other_key_vault=other_key_vault,
                          key_files=local.key_files, reopen_with_wrong_key=reopen_with_wrong_key,
                          aclose=aclose)


VAULT_FACTORIES = [
    pytest.param(local_vault, id="local"),
    pytest.param(remote_vault, id="remote"),   # one line per further implementation
]


@pytest.fixture(params=VAULT_FACTORIES)
async def vut(request, tmp_path, sqlite_url, monkeypatch):
    store = await open_store(sqlite_url)
    vut = None
    try:
        vut = await request.param(tmp_path, store, monkeypatch)
        yield vut
    finally:
        if vut is not None and vut.aclose is not None:
            await vut.aclose()
        await store.close()


def csr_for(key, *, cn: str = "whatever the device says") -> bytes:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, algorithm))
    return csr.public_bytes(serialization.Encoding.DER)


async def owner_ca(vault: Vault) -> x509.Certificate:
    return x509.load_der_x509_certificate(await vault.owner_ca_der())


async def raw_secret_rows(store) -> list[bytes]:
    async with store.engine.connect() as c:
        return [r[0] for r in await c.execute(select(vault_secrets.c.ciphertext))]


# --- owner CA and signing ----------------------------------------------------------------------
async def test_owner_ca_is_self_signed_p256_ca(vut):
    ca = await owner_ca(vut.vault)
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    now = dt.datetime.now(dt.timezone.utc)
    assert ca.not_valid_before_utc <= now < ca.not_valid_after_utc
    assert await vut.vault.owner_ca_der() == await vut.vault.owner_ca_der()      # stable


async def test_sign_is_cose_sign1_by_the_owner_ca_key(vut):
    ca = await owner_ca(vut.vault)
    payload = b"\xa1\x00\x0b" + os.urandom(20)
    signed = await vut.vault.sign(payload)
    parsed = cose.parse_sign1(signed, max_size=MAX_MESSAGE)
    assert parsed.verify(ca.public_key()) == payload
    assert parsed.x5chain == [await vut.vault.owner_ca_der()]
    with pytest.raises(BadSignature):
        parsed.verify(generate_p256().public_key())


async def test_sign_without_chain_for_receivers_that_have_the_owner_ca(vut):
    ca = await owner_ca(vut.vault)
    payload = b"\xa1\x00\x0c" + os.urandom(20)
    bare = await vut.vault.sign(payload, with_chain=False)
    parsed = cose.parse_sign1(bare, max_size=MAX_MESSAGE)
    assert parsed.x5chain == [] and parsed.verify(ca.public_key()) == payload
    assert len(bare) + 400 < len(await vut.vault.sign(payload))   # the certificate is not sent


# --- N_device -------------------------------------------------------------------------------------
async def test_owner_proof_uses_the_stored_n_device(vut):
    n_device, nonce = os.urandom(8), os.urandom(16)
    assert not await vut.vault.has_device_secret(SERIAL)
    with pytest.raises(NotFound) as err:
        await vut.vault.owner_proof(SERIAL, nonce)
    assert err.value.status == 404
    await vut.vault.put_device_secret(SERIAL, n_device)
    assert await vut.vault.has_device_secret(SERIAL)
    assert not await vut.vault.has_device_secret("ffffffff")
    assert await vut.vault.owner_proof(SERIAL, nonce) == owner_proof(n_device, nonce)
    assert await vut.vault.owner_proof(SERIAL, nonce) != owner_proof(n_device, os.urandom(16))
    with pytest.raises(NotFound):
        await vut.vault.owner_proof("ffffffff", nonce)


async def test_device_secrets_are_encrypted_at_rest(vut):
    n_device = os.urandom(8)
    await vut.vault.put_device_secret(SERIAL, n_device)
    nonce, session = os.urandom(16), os.urandom(16)
    recipient = x25519.X25519PrivateKey.generate()
    sealed = await vut.vault.seal_channel_secret(SERIAL, seal_key=_raw(recipient), session=session,
                                                 nonce=nonce)
    channel = open_secret(recipient, sealed, serial=SERIAL, session=session, nonce=nonce,
                          n_device=n_device)
    rows = await raw_secret_rows(vut.store)
    assert len(rows) >= 2                                   # N_device and the channel secret
    for raw in rows:
        assert n_device not in raw and n_device.hex().encode() not in raw
        assert channel not in raw
    # the same N_device stored twice is not stored as the same bytes (random nonce per write)
    await vut.vault.put_device_secret("ffffffff", n_device)
    rows = await raw_secret_rows(vut.store)
    assert len(set(rows)) == len(rows)


async def test_vault_with_another_key_cannot_read_the_secrets(vut):
    n_device, nonce = os.urandom(8), os.urandom(16)
    await vut.vault.put_device_secret(SERIAL, n_device)
    other = await vut.other_key_vault()
    assert await other.has_device_secret(SERIAL)            # the row is there...
    proof = None
    with pytest.raises(Exception):                          # ...but does not decrypt
        proof = await other.owner_proof(SERIAL, nonce)
    assert proof is None
    assert await vut.vault.owner_proof(SERIAL, nonce) == owner_proof(n_device, nonce)


async def test_vault_opened_with_a_wrong_key_does_not_start(vut):
    if vut.reopen_with_wrong_key is None:
        pytest.skip("this implementation keeps no key material it could be reopened from")
    with pytest.raises(Exception):
        await vut.reopen_with_wrong_key()


async def test_private_keys_on_disk_are_encrypted_pem(vut):
    for path in vut.key_files:
        data = path.read_bytes()
        assert b"ENCRYPTED" in data
        with pytest.raises(TypeError):          # needs the vault key
            serialization.load_pem_private_key(data, password=None)
        assert (path.stat().st_mode & 0o077) == 0


# --- LDevID issuance ----------------------------------------------------------------------------
@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["p256", "p384"])
async def test_issued_ldevid_chains_to_the_owner_ca(vut, curve):
    key = ec.generate_private_key(curve)
    der = await vut.vault.issue_ldevid(csr_for(key, cn="evil-name"), SERIAL, URN, 30.0)
    cert = x509.load_der_x509_certificate(der)
    ca = await owner_ca(vut.vault)
    cert.verify_directly_issued_by(ca)
    assert spki_fingerprint(cert.public_key()) == spki_fingerprint(key.public_key())
    assert device_identity(cert) == (SERIAL, URN)           # from our records, not from the CSR
    assert "evil-name" not in cert.subject.rfc4514_string()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30, minutes=1)
    assert der in await vut.store.certs.for_device(SERIAL)


def _bad_signature_csr() -> bytes:
    der = csr_for(generate_p256(), cn="AAAAAAAAAAAA")
    tampered = der.replace(b"AAAAAAAAAAAA", b"AAAAAAAAAAAB")
    assert tampered != der
    return tampered


@pytest.mark.parametrize("make_csr", [
    _bad_signature_csr,
    lambda: csr_for(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
    lambda: csr_for(ec.generate_private_key(ec.SECP521R1())),
    lambda: csr_for(ec.generate_private_key(ec.SECP256K1())),
    lambda: csr_for(ed25519.Ed25519PrivateKey.generate()),
    lambda: b"not a csr",
    lambda: b"",
], ids=["bad_signature", "rsa", "p521", "secp256k1", "ed25519", "garbage", "empty"])
async def test_issue_ldevid_refuses_bad_csrs_and_issues_nothing(vut, make_csr):
    with pytest.raises(MalformedMessage) as err:
        await vut.vault.issue_ldevid(make_csr(), SERIAL, URN, 30.0)
    assert 400 <= err.value.status < 500
    assert await vut.store.certs.for_device(SERIAL) == []


# --- channel secrets ------------------------------------------------------------------------------
def _raw(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


async def test_sealed_channel_secret_opens_only_for_its_recipient_nonce_and_n(vut):
    n_device, nonce, session = os.urandom(8), os.urandom(16), os.urandom(16)
    await vut.vault.put_device_secret(SERIAL, n_device)
    recipient = x25519.X25519PrivateKey.generate()
    sealed = await vut.vault.seal_channel_secret(SERIAL, seal_key=_raw(recipient), session=session,
                                                 nonce=nonce)
    secret = open_secret(recipient, sealed, serial=SERIAL, session=session, nonce=nonce,
                         n_device=n_device)
    assert len(secret) == 32
    wrong = [
        dict(private_key=x25519.X25519PrivateKey.generate()),
        dict(nonce=os.urandom(16)),
        dict(n_device=os.urandom(8)),
        dict(session=os.urandom(16)),
        dict(serial="ffffffff"),
    ]
    for change in wrong:
        args = dict(private_key=recipient, blob=sealed, serial=SERIAL, session=session,
                    nonce=nonce, n_device=n_device) | change
        with pytest.raises(BadSignature):
            open_secret(**args)
    again = await vut.vault.seal_channel_secret(SERIAL, seal_key=_raw(recipient), session=session,
                                                nonce=nonce)
    assert open_secret(recipient, again, serial=SERIAL, session=session, nonce=nonce,
                       n_device=n_device) != secret          # a new secret each time


async def test_seal_channel_secret_for_unknown_device_is_not_found(vut):
    with pytest.raises(NotFound):
        await vut.vault.seal_channel_secret("ffffffff", seal_key=_raw(x25519.X25519PrivateKey.generate()),
                                            session=os.urandom(16), nonce=os.urandom(16))
    assert await raw_secret_rows(vut.store) == []


@pytest.mark.parametrize("seal_key", [b"\x04" * 33, b"\x01" * 31, b""], ids=["33", "31", "empty"])
async def test_seal_channel_secret_refuses_a_malformed_key(vut, seal_key):
    await vut.vault.put_device_secret(SERIAL, os.urandom(8))
    with pytest.raises(MalformedMessage):
        await vut.vault.seal_channel_secret(SERIAL, seal_key=seal_key, session=os.urandom(16),
                                            nonce=os.urandom(16))


async def test_seal_channel_secret_refuses_a_low_order_key(vut):
    await vut.vault.put_device_secret(SERIAL, os.urandom(8))
    with pytest.raises(ProtocolError) as err:
        await vut.vault.seal_channel_secret(SERIAL, seal_key=bytes(32), session=os.urandom(16),
                                            nonce=os.urandom(16))
    assert 400 <= err.value.status < 500


def _software_ek_cert(key) -> bytes:
    """A stand-in EK certificate for a software RSA key: the vault only takes the public key."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test EK")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


async def test_channel_secret_sealed_to_a_tpm_ek_opens_only_with_that_ek(vut):
    from support_tpm import unwrap_sealed
    from zerotouch.attestation.duplicate import SealedForTpm
    from zerotouch.protocol.sealing import check_sealed_plaintext
    n_device, nonce, session = os.urandom(8), os.urandom(16), os.urandom(16)
    await vut.vault.put_device_secret(SERIAL, n_device)
    ek = rsa.generate_private_key(65537, 2048)
    blob = await vut.vault.seal_channel_secret_tpm(SERIAL, ek_cert=_software_ek_cert(ek),
                                                   session=session, nonce=nonce)
    plain = unwrap_sealed(SealedForTpm.from_bytes(blob), ek)
    secret = check_sealed_plaintext(plain, serial=SERIAL, nonce=nonce, n_device=n_device)
    assert len(secret) == 32
    with pytest.raises(BadSignature):   # H(M|N) binds it to this onboarding's nonce
        check_sealed_plaintext(plain, serial=SERIAL, nonce=os.urandom(16), n_device=n_device)
    with pytest.raises(Exception):      # another EK's private key cannot recover the seed
        unwrap_sealed(SealedForTpm.from_bytes(blob), rsa.generate_private_key(65537, 2048))


async def test_seal_to_tpm_refuses_a_bad_ek_certificate_and_unknown_devices(vut):
    with pytest.raises(MalformedMessage):
        await vut.vault.seal_channel_secret_tpm(SERIAL, ek_cert=b"\x30\x03junk", session=os.urandom(16),
                                                nonce=os.urandom(16))
    ek = rsa.generate_private_key(65537, 2048)
    with pytest.raises(NotFound):
        await vut.vault.seal_channel_secret_tpm("ffffffff", ek_cert=_software_ek_cert(ek),
                                                session=os.urandom(16), nonce=os.urandom(16))
    assert await raw_secret_rows(vut.store) == []
