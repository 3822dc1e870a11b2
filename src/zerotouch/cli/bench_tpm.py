"""`zerotouch bench tpm`: argument parsing only (the work is bench.tpm_bench)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def cmd_bench_tpm(args) -> int:
    from ..bench.tpm_bench import run
    print(f"{args.onboardings} consecutive onboardings of one TPM device against one swtpm "
          "(server cores in-process)", flush=True)
    result = run(args.onboardings, args.check_every,
                 progress=lambda i, h: print(f"  after {i:5d}: transient objects {h['transient']}, "
                                             f"sessions {h['sessions']}", flush=True))
    print(f"onboarding p50 {result.p50_ms} ms, p95 {result.p95_ms} ms")
    print(f"per onboarding: {result.tpm_commands_per_onboarding} TPM commands, "
          f"{result.tpm_ms_per_onboarding} ms in the TPM, {result.server_ms_per_onboarding} ms in the "
          f"server cores, {result.device_other_ms_per_onboarding} ms other device work")
    print(f"TPM handles before {result.handles_before}, after {result.handles_after}")
    if args.json:
        print(json.dumps(asdict(result)))
    leaked = result.handles_after != result.handles_before
    return 1 if leaked else 0


def add_bench_tpm_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser("tpm", help="consecutive TPM onboardings: handle leaks and "
                                                "where the time goes")
    p.add_argument("--onboardings", type=int, default=1000)
    p.add_argument("--check-every", type=int, default=100, help="count TPM handles this often")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_tpm)
    return p
