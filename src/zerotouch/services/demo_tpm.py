"""The TPM side of `zerotouch demo --identity tpm`: one swtpm per device, a TPM maker the
owner trusts, a PCR policy captured from a known-good device, and each device's agent as its
own process (as on real hardware: its TPM's TCTI and OpenSSL's tpm2 provider are per process,
so the TLS key in the TPM works for the agent's MQTT connection)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..agent.runtime import AgentReport
from ..util.swtpm import (ABRMD_INSTALL_HINT, INSTALL_HINT, SwTPM, have_abrmd, have_swtpm,
                          make_local_ca, manufacture, start, start_abrmd, start_session_bus, stop,
                          stop_abrmd, stop_session_bus)
from .tpm_admin import capture_policy, install_policy, trust_tpm_maker

DEMO_MODEL = "zt-demo-gateway"   # the device type in the IDevIDs; the policy is installed for it


class SwtpmFleet:
    """Each swtpm sits behind its own tpm2-abrmd (a resource manager, as /dev/tpmrm0 is on a
    real device): swtpm takes one client at a time and has three object slots, while a device
    uses its TPM from the agent and from the TLS child (OpenSSL's tpm2 provider) at once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tpms: list[SwTPM] = []      # .tcti goes through the device's resource manager
        self._raw: list[SwTPM] = []
        self._rms: list = []
        self._bus = None
        self.ca = None

    async def start(self, count: int) -> list[SwTPM]:
        """A TPM maker CA and `count` manufactured, running swtpms (set up two at a time)."""
        if not have_swtpm():
            raise RuntimeError(f"--identity tpm needs swtpm: {INSTALL_HINT}")
        if not have_abrmd():
            raise RuntimeError(f"--identity tpm needs tpm2-abrmd: {ABRMD_INSTALL_HINT}")
        self.ca = make_local_ca(self.root / "tpm-maker")
        # one private D-Bus session bus; this process and its agents reach the abrmds on it
        self._bus = start_session_bus(self.root / "dbus")
        os.environ.update(self._bus.env)
        loop = asyncio.get_running_loop()

        def one(i: int) -> SwTPM:
            state = self.root / "tpms" / f"{i:04d}"
            manufacture(state, self.ca)
            raw = start(state, self.ca)
            self._raw.append(raw)
            rm = start_abrmd(raw, self._bus)
            self._rms.append(rm)
            return dataclasses.replace(raw, tcti=rm.tcti)
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
        for rm in self._rms:
            stop_abrmd(rm)
        for t in self._raw:
            stop(t.proc)
        if self._bus is not None:
            stop_session_bus(self._bus)
        self.tpms, self._raw, self._rms, self._bus = [], [], [], None


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
