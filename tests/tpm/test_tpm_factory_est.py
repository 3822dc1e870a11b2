"""A TPM device's IDevID from the factory EST service: the station relays a CSR signed in the
TPM whose extensionRequest asks for the TPM binding (RFC 4108 hardwareModuleName naming the EK)
and whose subject names the device type; the IDevID carries both, exactly as the in-process CA
would write them, and the device onboards with attestation."""
from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

DER = Encoding.DER

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "factory"))
from factory_harness import start_factory_server  # noqa: E402
from zerotouch.attestation.ek import EkVerifier, ek_key_id  # noqa: E402
from zerotouch.attestation.quote import PcrPolicy  # noqa: E402
from zerotouch.pki.hwmodule import device_type, tpm_binding  # noqa: E402
from zerotouch.pki.keys import load_cert  # noqa: E402
from zerotouch.protocol.device import DeviceOnboarding  # noqa: E402
from zerotouch.protocol.errors import Conflict  # noqa: E402
from zerotouch.services.attestation import TpmAttestation  # noqa: E402
from zerotouch.services.factory_est import idevid_via_est  # noqa: E402

tpm_mod = pytest.importorskip("zerotouch.identity.tpm.backend", reason="tpm2-pytss missing")
from zerotouch.identity.tpm import Tpm  # noqa: E402
from zerotouch.identity.tpm.quote import read_pcrs  # noqa: E402

MODEL = "gw-1000"


@pytest.fixture
async def factory(tmp_path):
    s = await start_factory_server(tmp_path / "manufacturer", tmp_path / "factory-est")
    yield s
    await s.close()


async def test_factory_est_idevid_of_a_tpm_device_is_bound_and_onboards_attested(
        factory, fleet, swtpm):
    assert fleet.manufacturer.dir == factory.manufacturer.dir
    via = idevid_via_est(factory.url, station_cert=factory.station.cert_file,
                         station_key=factory.station.key_file, ca_pem=factory.ca_pem)
    t0 = time.perf_counter()
    dev = await asyncio.to_thread(fleet.manufacturer.make_device, fleet.tmp / "factory", fleet.info,
                                  identity="tpm", tcti=swtpm.tcti, model=MODEL, idevid_via=via)
    made_s = time.perf_counter() - t0
    idevid = load_cert(dev.device_dir / "idevid.pem")
    ek = x509.load_der_x509_certificate((dev.device_dir / "tpm-ek.der").read_bytes())
    assert tpm_binding(idevid) == ek_key_id(ek)          # the binding the in-process CA adds
    assert device_type(idevid) == MODEL
    rec = factory.service.issued.get(dev.serial)
    assert rec["tpm_ek_sha256"] == ek_key_id(ek).hex() and rec["model"] == MODEL
    assert rec["cert_serial"] == format(idevid.serial_number, "x")
    assert not (dev.device_dir / "idevid.key").exists()  # the key is in the TPM

    # the TPM cannot get a second IDevID under another serial (one device per TPM)
    other_csr = tpm_mod.TpmIdentityFactory(swtpm.tcti).idevid_csr(dev.device_dir, "0f0f0f0f",
                                                                  "urn:zerotouch:device:0f0f0f0f")
    with pytest.raises(Conflict, match="one device per TPM"):
        factory.service.issue(other_csr, (load_cert(factory.station.cert_file).public_bytes(DER),))

    # onboarding with attestation: EK chain, binding, credential activation, PCR quote
    await fleet.rendezvous.register(dev.registration)
    await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip="127.0.0.1",
                                 cport=8444, cfingerprint=fleet.owner_fp_hex)
    await fleet.gateway.register_label(dev.label.url, "made on the factory line")
    with Tpm(swtpm.tcti) as tpm:
        policy = PcrPolicy.capture(MODEL, read_pcrs(tpm, range(8)))
    fleet.gateway.tpm = TpmAttestation(
        EkVerifier.from_pem([swtpm.ca.root_pem], [swtpm.ca.intermediate_pem]), {MODEL: policy})
    identity = tpm_mod.TpmIdentity(dev.device_dir, swtpm.tcti)
    try:
        core = DeviceOnboarding(serial=dev.serial, urn=dev.urn,
                                rendezvous_key=fleet.rv_key.public_key(),
                                n_device=identity.n_device(), identity=identity, clock=time.time,
                                rng=os.urandom)
        await fleet.onboard(core)
    finally:
        identity.close()
    inv = await fleet.store.inventory.get(dev.serial)
    assert inv.state.value == "onboarded"
    assert inv.attestation.startswith("TPM attested") and MODEL in inv.attestation
    print(f"\nTPM device made with its IDevID over factory EST in {made_s:.2f} s")
