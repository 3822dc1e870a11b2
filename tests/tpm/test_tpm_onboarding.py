"""Onboarding a TPM device (swtpm) against the real gateway and vault cores, and the attacks
the TPM checks stop: unknown TPM maker, AK from another TPM, replayed quote, changed PCR,
another TPM's EK under a TPM-bound IDevID, a TPM device downgrading to no evidence."""
from __future__ import annotations

import dataclasses
import os

import pytest

from zerotouch.attestation.ek import EkVerifier
from zerotouch.attestation.quote import PcrPolicy
from zerotouch.protocol.device import DeviceOnboarding
from zerotouch.protocol.errors import BadSignature, MalformedMessage, NotAuthorized
from zerotouch.services.attestation import TpmAttestation

tpm_mod = pytest.importorskip("zerotouch.identity.tpm.backend",
                              reason="tpm2-pytss missing: apt-get install libtss2-dev; pip install tpm2-pytss")
from zerotouch.identity.tpm import Tpm  # noqa: E402
from zerotouch.identity.tpm.quote import extend_pcr, read_pcrs  # noqa: E402

MODEL = "gw-1000"


async def _make(fleet, swtpm, *, model=MODEL):
    dev = fleet.manufacturer.make_device(fleet.tmp / "factory", fleet.info, identity="tpm",
                                         tcti=swtpm.tcti, model=model)
    await fleet.rendezvous.register(dev.registration)
    await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip="127.0.0.1",
                                 cport=8444, cfingerprint=fleet.owner_fp_hex)
    await fleet.gateway.register_label(dev.label.url, "tpm device")
    return dev


def _trust(fleet, swtpm, *, policy: PcrPolicy | None = None, ca=None):
    ca = ca or swtpm.ca
    if policy is None:
        with Tpm(swtpm.tcti) as tpm:
            policy = PcrPolicy.capture(MODEL, read_pcrs(tpm, range(8)))
    fleet.gateway.tpm = TpmAttestation(EkVerifier.from_pem([ca.root_pem], [ca.intermediate_pem]),
                                       {MODEL: policy})
    return policy


async def _two_tpm_devices(fleet, swtpm_factory):
    """Device A (onboarding, its TPM trusted with a policy) and device B on another TPM of the
    same maker; their identities, open on their own TPMs."""
    a, b = swtpm_factory(), swtpm_factory()
    dev = await _make(fleet, a)
    _trust(fleet, a)
    other = fleet.manufacturer.make_device(fleet.tmp / "factory2", fleet.info, identity="tpm",
                                           tcti=b.tcti, model=MODEL)
    return (dev, tpm_mod.TpmIdentity(dev.device_dir, a.tcti),
            tpm_mod.TpmIdentity(other.device_dir, b.tcti))


def _core(fleet, dev, identity):
    return DeviceOnboarding(serial=dev.serial, urn=dev.urn, rendezvous_key=fleet.rv_key.public_key(),
                            n_device=identity.n_device(), identity=identity,
                            clock=__import__("time").time, rng=os.urandom)


async def _until_prove(fleet, core):
    core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
    core.receive_challenge(await fleet.gateway.hello(core.hello_request()))


async def test_tpm_device_onboards_and_only_its_tpm_opens_the_secret(fleet, swtpm):
    dev = await _make(fleet, swtpm)
    _trust(fleet, swtpm)
    identity = tpm_mod.TpmIdentity(dev.device_dir, swtpm.tcti)
    try:
        core = _core(fleet, dev, identity)
        await fleet.onboard(core)
        identity.commit_ldevid()
        assert core.result.channel_secret == await fleet.vault.channel_secret(dev.serial)
        inv = await fleet.store.inventory.get(dev.serial)
        assert inv.state.value == "onboarded"
        assert inv.attestation.startswith("TPM attested") and MODEL in inv.attestation
        # the LDevID key is a TPM key file, not a software key
        assert identity.ldevid_key_file().read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY")
        assert not (dev.device_dir / "idevid.key").exists()
        assert not (dev.device_dir / "n_device.secret").exists()
    finally:
        identity.close()


async def test_ek_from_unknown_tpm_maker_is_refused_and_recorded(fleet, swtpm_factory, other_tpm_ca):
    swtpm_factory(other_tpm_ca)   # makes the other maker's CA files
    swtpm = swtpm_factory()
    dev = await _make(fleet, swtpm)
    _trust(fleet, swtpm, policy=PcrPolicy.capture(MODEL, {i: bytes(32) for i in range(8)}),
           ca=other_tpm_ca)
    identity = tpm_mod.TpmIdentity(dev.device_dir, swtpm.tcti)
    try:
        core = _core(fleet, dev, identity)
        core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
        with pytest.raises(NotAuthorized, match="does not chain to a trusted TPM manufacturer"):
            await fleet.gateway.hello(core.hello_request())
    finally:
        identity.close()
    inv = await fleet.store.inventory.get(dev.serial)
    assert "attestation failed" in inv.last_error and "TPM manufacturer" in inv.attestation
    assert inv.state.value == "expected"


async def test_changed_pcr_releases_no_secret_and_says_why(fleet, swtpm):
    dev = await _make(fleet, swtpm)
    _trust(fleet, swtpm)
    with Tpm(swtpm.tcti) as tpm:    # new firmware measured after the policy was captured
        extend_pcr(tpm, 7, b"unsigned boot loader")
    identity = tpm_mod.TpmIdentity(dev.device_dir, swtpm.tcti)
    try:
        core = _core(fleet, dev, identity)
        await _until_prove(fleet, core)
        with pytest.raises(NotAuthorized, match="PCR 7"):
            await fleet.gateway.prove(core.prove_request())
    finally:
        identity.close()
    assert await fleet.vault.channel_secret(dev.serial) is None   # nothing released
    inv = await fleet.store.inventory.get(dev.serial)
    assert "PCR 7" in inv.attestation and "PCR 7" in inv.last_error
    assert inv.ldevid_serial is None


async def test_replayed_quote_is_refused(fleet, swtpm):
    dev = await _make(fleet, swtpm)
    _trust(fleet, swtpm)
    identity = tpm_mod.TpmIdentity(dev.device_dir, swtpm.tcti)
    try:
        first = _core(fleet, dev, identity)
        await _until_prove(fleet, first)
        old_quote = identity.tpm_quote(first._challenge.challenge, first._challenge.pcr_mask)
        # a later onboarding answers with the quote of the first one
        identity.tpm_quote = lambda nonce, mask: old_quote
        second = _core(fleet, dev, identity)
        await _until_prove(fleet, second)
        with pytest.raises(NotAuthorized, match="nonce"):
            await fleet.gateway.prove(second.prove_request())
    finally:
        identity.close()
    assert await fleet.vault.channel_secret(dev.serial) is None


async def test_ak_of_another_tpm_fails_activation(fleet, swtpm_factory):
    dev, identity, other_id = await _two_tpm_devices(fleet, swtpm_factory)
    try:
        ek_a, _ = identity.tpm_evidence()
        _, ak_b = other_id.tpm_evidence()
        # genuine EK of TPM A, attestation key of TPM B (whose PCRs the attacker controls)
        identity.tpm_evidence = lambda: (ek_a, ak_b)
        core = _core(fleet, dev, identity)
        await _until_prove(fleet, core)
        ch = core._challenge
        with pytest.raises(Exception):   # TPM A: the credential names B's AK -> integrity error
            identity.tpm_activate(ch.cred_blob, ch.cred_secret)
        with pytest.raises(Exception):   # TPM B: cannot recover the seed encrypted to A's EK
            other_id.tpm_activate(ch.cred_blob, ch.cred_secret)
        # guessing the credential gets nowhere either
        identity.tpm_activate = lambda blob, secret: os.urandom(32)
        identity.tpm_quote = other_id.tpm_quote
        with pytest.raises(NotAuthorized, match="activation failed"):
            await fleet.gateway.prove(core.prove_request())
    finally:
        identity.close()
        other_id.close()
    assert await fleet.vault.channel_secret(dev.serial) is None


async def test_idevid_bound_to_one_tpm_refuses_another_tpms_ek(fleet, swtpm_factory):
    dev, identity, other_id = await _two_tpm_devices(fleet, swtpm_factory)
    try:
        # the IDevID key of device A (say, extracted) presented with TPM B, whose owner
        # controls B's PCRs: B's EK chains to the same trusted maker, but is not A's TPM
        identity.tpm_evidence = other_id.tpm_evidence
        core = _core(fleet, dev, identity)
        core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
        with pytest.raises(NotAuthorized, match="bound this IDevID"):
            await fleet.gateway.hello(core.hello_request())
        # and without any TPM evidence (a software imitation of a TPM device)
        identity.tpm_evidence = lambda: None
        core = _core(fleet, dev, identity)
        core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
        with pytest.raises(NotAuthorized, match="sent no TPM evidence"):
            await fleet.gateway.hello(core.hello_request())
    finally:
        identity.close()
        other_id.close()


async def test_no_policy_for_the_device_type_is_refused_with_a_hint(fleet, swtpm):
    dev = await _make(fleet, swtpm, model="unknown-model")
    _trust(fleet, swtpm)
    identity = tpm_mod.TpmIdentity(dev.device_dir, swtpm.tcti)
    try:
        core = _core(fleet, dev, identity)
        core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
        with pytest.raises(NotAuthorized, match="zerotouch policy capture"):
            await fleet.gateway.hello(core.hello_request())
    finally:
        identity.close()


async def test_secret_for_one_tpm_does_not_open_on_another(fleet, swtpm_factory):
    dev, identity, other_id = await _two_tpm_devices(fleet, swtpm_factory)
    try:
        core = _core(fleet, dev, identity)
        await _until_prove(fleet, core)
        from zerotouch.protocol import cose
        from zerotouch.protocol.messages import Credentials
        signed = cose.parse_sign1(await fleet.gateway.prove(core.prove_request()), max_size=1 << 16)
        creds = Credentials.decode(signed.payload)
        with pytest.raises(BadSignature, match="does not open in this device's TPM"):
            other_id.open_sealed(creds.sealed_secret, serial=dev.serial, session=creds.session,
                                 nonce=creds.nonce, n_device=identity.n_device())
        # the right TPM opens it
        assert identity.open_sealed(creds.sealed_secret, serial=dev.serial, session=creds.session,
                                    nonce=creds.nonce, n_device=identity.n_device()) \
            == await fleet.vault.channel_secret(dev.serial)
    finally:
        identity.close()
        other_id.close()


async def test_gateway_without_tpm_trust_refuses_tpm_devices_but_onboards_software(fleet, swtpm):
    dev = await _make(fleet, swtpm)     # fleet.gateway has no TPM roots configured
    identity = tpm_mod.TpmIdentity(dev.device_dir, swtpm.tcti)
    try:
        core = _core(fleet, dev, identity)
        core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
        with pytest.raises(NotAuthorized, match="no TPM manufacturer roots"):
            await fleet.gateway.hello(core.hello_request())
    finally:
        identity.close()
    soft = await fleet.make()
    await fleet.onboard(fleet.core(soft))


async def test_prove_without_tpm_evidence_after_a_tpm_hello_is_refused(fleet, swtpm):
    dev = await _make(fleet, swtpm)
    _trust(fleet, swtpm)
    identity = tpm_mod.TpmIdentity(dev.device_dir, swtpm.tcti)
    try:
        core = _core(fleet, dev, identity)
        await _until_prove(fleet, core)
        # downgrade after the challenge: drop the TPM evidence from the prove
        core._challenge = dataclasses.replace(core._challenge, cred_blob=None)
        with pytest.raises((NotAuthorized, MalformedMessage)):
            identity.new_seal_key = lambda: os.urandom(32)
            await fleet.gateway.prove(core.prove_request())
    finally:
        identity.close()
    assert await fleet.vault.channel_secret(dev.serial) is None


@pytest.mark.parametrize("evidence", [
    (b"\x30\x03junk", None),                 # junk EK certificate
    (None, b"\x00\x23junk"),                 # AK without EK certificate
    ("ek", b"\x00\x23\x00\x0bjunk"),         # genuine EK certificate, junk AK public area
    ("ek", b"\x00" * 300),                   # AK public area of zeros
])
async def test_malformed_tpm_evidence_is_a_clear_4xx_and_changes_nothing(fleet, swtpm, evidence):
    from zerotouch.protocol.errors import ProtocolError
    dev = await _make(fleet, swtpm)
    _trust(fleet, swtpm)
    identity = tpm_mod.TpmIdentity(dev.device_dir, swtpm.tcti)
    try:
        real_ek, _ = identity.tpm_evidence()
        ek, ak = evidence
        identity.tpm_evidence = lambda: (real_ek if ek == "ek" else ek, ak)
        core = _core(fleet, dev, identity)
        core.receive_redirect(await fleet.rendezvous.find_owner(core.find_owner_request()))
        with pytest.raises(ProtocolError) as exc:
            await fleet.gateway.hello(core.hello_request())
        assert 400 <= exc.value.status < 500 and exc.value.message
    except MalformedMessage:
        pass   # the device core itself refused to build such a hello
    finally:
        identity.close()
    inv = await fleet.store.inventory.get(dev.serial)
    assert inv.state.value == "expected" and inv.ldevid_serial is None
    assert await fleet.vault.channel_secret(dev.serial) is None


async def test_malformed_quote_fields_in_prove_are_refused_before_anything_is_issued(fleet, swtpm):
    from zerotouch.protocol.errors import ProtocolError
    dev = await _make(fleet, swtpm)
    _trust(fleet, swtpm)
    identity = tpm_mod.TpmIdentity(dev.device_dir, swtpm.tcti)
    try:
        real_quote = identity.tpm_quote
        for bad in (lambda n, m: (b"\xff" * 40, b"\x00" * 10, b"\x00" * 256),   # junk attest
                    lambda n, m: (*real_quote(n, m)[:2], b"\x00" * 64)):         # too few PCRs
            identity.tpm_quote = bad
            core = _core(fleet, dev, identity)
            await _until_prove(fleet, core)
            with pytest.raises(ProtocolError) as exc:
                await fleet.gateway.prove(core.prove_request())
            assert 400 <= exc.value.status < 500
    finally:
        identity.close()
    assert await fleet.vault.channel_secret(dev.serial) is None
    assert (await fleet.store.inventory.get(dev.serial)).ldevid_serial is None
