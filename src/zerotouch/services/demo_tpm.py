"""The TPM side of `zerotouch demo --identity tpm`: one swtpm per device, a TPM maker the
owner trusts, a PCR policy captured from a known-good device, and each device's agent as its
own process (as on real hardware: its TPM's TCTI and OpenSSL's tpm2 provider are per process,
so the TLS key in the TPM works for the agent's MQTT connection)."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..agent.runtime import AgentReport
from ..util.swtpm import SwTPM, have_swtpm, make_local_ca, manufacture, start, stop, INSTALL_HINT
from .tpm_admin import capture_policy, install_policy, trust_tpm_maker

DEMO_MODEL = "zt-demo-gateway"   # the device type in the IDevIDs; the policy is installed for it


class SwtpmFleet:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tpms: list[SwTPM] = []
        self.ca = None

    async def start(self, count: int) -> list[SwTPM]:
        """A TPM maker CA and `count` manufactured, running swtpms (set up two at a time)."""
        if not have_swtpm():
            raise RuntimeError(f"--identity tpm needs swtpm: {INSTALL_HINT}")
        self.ca = make_local_ca(self.root / "tpm-maker")
        loop = asyncio.get_running_loop()

        def one(i: int) -> SwTPM:
            state = self.root / "tpms" / f"{i:04d}"
            manufacture(state, self.ca)
            return start(state, self.ca)
        with ThreadPoolExecutor(max_workers=2) as pool:
            self.tpms = list(await asyncio.gather(
                *(loop.run_in_executor(pool, one, i) for i in range(count))))
        return self.tpms

    def configure_gateway(self, gateway_dir: Path) -> str:
        """Trust the TPM maker; capture the PCR policy from the first (known-good) TPM."""
        ca_dir = self.root / "tpm-maker"
        trust_tpm_maker(gateway_dir, [ca_dir / "swtpm-localca-rootca-cert.pem"],
                        [ca_dir / "issuercert.pem"])
        policy = capture_policy(DEMO_MODEL, tcti=self.tpms[0].tcti)
        policy_file = self.root / "tpm-maker" / f"{DEMO_MODEL}.json"
        policy_file.write_text(policy.to_json())
        install_policy(gateway_dir, policy_file)
        return DEMO_MODEL

    def stop(self) -> None:
        for t in self.tpms:
            stop(t.proc)
        self.tpms = []


async def run_agent_process(device_dir: Path, *, telemetry: int, log_dir: Path) -> AgentReport:
    """`zerotouch agent run` for one device; its JSON report back as an AgentReport."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TSS2_LOG="all+none")
    log = open(log_dir / f"agent-{Path(device_dir).name}.log", "ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zerotouch.cli", "agent", "run", "--device-dir", str(device_dir),
        "--telemetry", str(telemetry), "--max-attempts", "5",
        stdout=asyncio.subprocess.PIPE, stderr=log, env=env)
    out, _ = await proc.communicate()
    log.close()
    try:
        data = json.loads(out.decode()[out.decode().index("{"):])
        fields = AgentReport.__dataclass_fields__
        return AgentReport(**{k: v for k, v in data.items() if k in fields})
    except ValueError:
        return AgentReport(serial=Path(device_dir).name,
                           error=f"agent exited {proc.returncode} without a report")
