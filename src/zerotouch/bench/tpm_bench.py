"""`zerotouch bench tpm`: many consecutive onboardings of one TPM device against one swtpm.

It shows two things the TPM issue asks for: no TPM handle leaks (transient objects and sessions
are counted from a fresh connection before and after, and every `--check-every` onboardings),
and where an onboarding's time goes: in TPM commands (counted and timed at the ESAPI boundary),
in the server cores (rendezvous + gateway + vault, called in-process: no network here; the
demo's figures add loopback HTTPS), and the rest on the device (CBOR/COSE, CSR, checks).
"""
from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..attestation.ek import EkVerifier
from ..attestation.quote import DEFAULT_PCRS, PcrPolicy
from ..pki.keys import generate_p256, public_key_pem
from ..protocol.cose import SoftwareSigner
from ..protocol.device import DeviceOnboarding
from ..services.attestation import TpmAttestation
from ..services.gateway import GatewayConfig, GatewayService
from ..services.manufacturer import Manufacturer, RendezvousInfo
from ..services.rendezvous import RendezvousConfig, RendezvousService
from ..services.vault import LocalVault, init_vault_dir
from ..storage import open_store
from ..util.swtpm import make_local_ca, manufacture, start, stop

MODEL = "bench-tpm"


@dataclass
class TpmBenchResult:
    onboardings: int
    p50_ms: float
    p95_ms: float
    tpm_commands_per_onboarding: float
    tpm_ms_per_onboarding: float
    server_ms_per_onboarding: float
    device_other_ms_per_onboarding: float
    handles_before: dict
    handles_after: dict
    handle_checks: list[dict] = field(default_factory=list)


def _handles(tcti: str) -> dict:
    from ..identity.tpm import Tpm
    with Tpm(tcti) as tpm:
        return {"transient": len(tpm.transient_handles()), "sessions": len(tpm.session_handles())}


async def run_tpm_bench(onboardings: int = 1000, check_every: int = 100,
                        progress=None) -> TpmBenchResult:
    from ..identity.tpm import Tpm
    from ..identity.tpm.backend import TpmIdentity
    from ..identity.tpm.quote import read_pcrs
    root = Path(tempfile.mkdtemp(prefix="zerotouch-bench-tpm-"))
    ca = make_local_ca(root / "tpm-maker")
    manufacture(root / "tpm", ca)
    swtpm = start(root / "tpm", ca)
    store = await open_store(f"sqlite:///{root}/zt.db")
    try:
        maker = Manufacturer(root / "manufacturer")
        rv_key = generate_p256()
        info = RendezvousInfo(url="https://127.0.0.1:8443",
                              key_pem=public_key_pem(rv_key.public_key()).decode(), tls_ca_pem="")
        rendezvous = RendezvousService(store.rendezvous, SoftwareSigner(rv_key),
                                       RendezvousConfig(manufacturer_cas=[maker.ca.cert]))
        init_vault_dir(root / "vault")
        vault = LocalVault(root / "vault", store.secrets, store.certs)
        with Tpm(swtpm.tcti) as tpm:
            policy = PcrPolicy.capture(MODEL, read_pcrs(tpm, DEFAULT_PCRS))
        gateway = GatewayService(
            store, vault, GatewayConfig(manufacturer_cas=[maker.ca.cert], terminus_host="127.0.0.1",
                                        terminus_port=8883),
            tpm=TpmAttestation(EkVerifier.from_pem([ca.root_pem], [ca.intermediate_pem]),
                               {MODEL: policy}))
        dev = maker.make_device(root / "factory", info, identity="tpm", tcti=swtpm.tcti, model=MODEL)
        await rendezvous.register(dev.registration)
        owner_fp = vault.owner_fingerprint.hex()
        await rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip="127.0.0.1",
                               cport=8444, cfingerprint=owner_fp)
        await gateway.register_label(dev.label.url, "bench")
        before = _handles(swtpm.tcti)
        checks: list[dict] = []
        totals, server_s = [], 0.0
        identity = TpmIdentity(dev.device_dir, swtpm.tcti)
        n_device = identity.n_device()
        identity.close()
        commands0, tpm_s0 = identity.tpm_usage()

        async def server(call, body):
            nonlocal server_s
            t0 = time.perf_counter()
            try:
                return await call(body)
            finally:
                server_s += time.perf_counter() - t0

        for i in range(onboardings):
            t0 = time.perf_counter()
            core = DeviceOnboarding(serial=dev.serial, urn=dev.urn, rendezvous_key=rv_key.public_key(),
                                    n_device=n_device, identity=identity, clock=time.time,
                                    rng=os.urandom)
            try:
                core.receive_redirect(await server(rendezvous.find_owner, core.find_owner_request()))
                core.receive_challenge(await server(gateway.hello, core.hello_request()))
                core.receive_credentials(await server(gateway.prove, core.prove_request()))
                identity.commit_ldevid()
                core.receive_done_ack(await server(gateway.done, core.done_request()))
            finally:
                identity.close()   # as the agent does after each onboarding
            totals.append((time.perf_counter() - t0) * 1000)
            if (i + 1) % check_every == 0 or i + 1 == onboardings:
                checks.append({"after": i + 1, **_handles(swtpm.tcti)})
                if progress:
                    progress(i + 1, checks[-1])
        commands, tpm_s = identity.tpm_usage()
        n = len(totals)
        tpm_ms = (tpm_s - tpm_s0) * 1000 / n
        server_ms = server_s * 1000 / n
        totals.sort()
        return TpmBenchResult(
            onboardings=n, p50_ms=round(statistics.median(totals), 1),
            p95_ms=round(totals[min(n - 1, int(n * 0.95))], 1),
            tpm_commands_per_onboarding=round((commands - commands0) / n, 1),
            tpm_ms_per_onboarding=round(tpm_ms, 1), server_ms_per_onboarding=round(server_ms, 1),
            device_other_ms_per_onboarding=round(statistics.mean(totals) - tpm_ms - server_ms, 1),
            handles_before=before, handles_after=_handles(swtpm.tcti), handle_checks=checks)
    finally:
        await store.close()
        stop(swtpm.proc)


def run(onboardings: int, check_every: int, progress=None) -> TpmBenchResult:
    return asyncio.run(run_tpm_bench(onboardings, check_every, progress))
