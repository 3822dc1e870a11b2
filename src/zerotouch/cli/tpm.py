"""`zerotouch tpm ...` and `zerotouch policy ...`: argument parsing only (services/tpm_admin.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def cmd_policy(args) -> int:
    from ..services import tpm_admin
    try:
        if args.action == "capture":
            policy = tpm_admin.capture_policy(args.name, device_dir=args.device, tcti=args.tcti,
                                              pcrs=tpm_admin.parse_pcrs(args.pcrs))
            text = policy.to_json()
            if args.out:
                args.out.write_text(text)
                print(f"policy {policy.name!r} ({len(policy.pcrs)} PCRs) written to {args.out}")
            else:
                print(text)
            return 0
        if args.action == "install":
            out = tpm_admin.install_policy(args.dir, args.file, args.type)
            print(f"installed {out}")
            return 0
        if args.action == "list":
            for dtype, policy in tpm_admin.list_policies(args.dir):
                pcrs = ",".join(str(i) for i in sorted(policy.pcrs))
                print(f"{dtype:20} policy {policy.name!r}  PCRs {pcrs}")
            return 0
    except (ValueError, OSError) as exc:
        return _fail(exc)
    return 2


def cmd_tpm(args) -> int:
    from ..services import tpm_admin
    try:
        if args.action == "trust":
            for path in tpm_admin.trust_tpm_maker(args.dir, args.root, args.intermediate or []):
                print(f"trusted {path}")
            return 0
        if args.action == "extend":
            value = tpm_admin.extend_pcr(args.pcr, args.data.encode(), device_dir=args.device,
                                         tcti=args.tcti)
            print(f"PCR {args.pcr} is now {value.hex()}")
            return 0
    except (ValueError, OSError) as exc:
        return _fail(exc)
    return 2


def add_tpm_parsers(sub) -> None:
    p = sub.add_parser("policy", help="PCR policies: capture from a known-good device, install")
    ps = p.add_subparsers(dest="action", required=True)
    c = ps.add_parser("capture", help="read a known-good device's PCRs into a policy")
    c.add_argument("--name", required=True, help="policy name (the device type it is for)")
    c.add_argument("--device", type=Path, help="device directory (its factory.json names its TPM)")
    c.add_argument("--tcti", help="or the TPM itself, e.g. swtpm:host=127.0.0.1,port=2321")
    c.add_argument("--pcrs", default="0-7", help="PCRs to pin (default 0-7)")
    c.add_argument("--out", type=Path, help="write here (default: print)")
    i = ps.add_parser("install", help="install a policy on a gateway for a device type")
    i.add_argument("--dir", required=True, type=Path, help="gateway directory")
    i.add_argument("--type", help="device type (IDevID OU; default: the policy's name; "
                   "'default' for any type without its own)")
    i.add_argument("file", type=Path)
    ls = ps.add_parser("list", help="policies installed on a gateway")
    ls.add_argument("--dir", required=True, type=Path)
    p.set_defaults(func=cmd_policy)

    t = sub.add_parser("tpm", help="TPM trust (owner) and PCR extension (device)")
    ts = t.add_subparsers(dest="action", required=True)
    tr = ts.add_parser("trust", help="trust a TPM maker's EK root (and intermediates) on a gateway")
    tr.add_argument("--dir", required=True, type=Path, help="gateway directory")
    tr.add_argument("--root", required=True, type=Path, action="append")
    tr.add_argument("--intermediate", type=Path, action="append")
    ex = ts.add_parser("extend", help="extend a PCR of a device's TPM (a simulated software change)")
    ex.add_argument("--device", type=Path)
    ex.add_argument("--tcti")
    ex.add_argument("--pcr", type=int, required=True)
    ex.add_argument("--data", required=True, help="what was measured (hashed with SHA-256)")
    t.set_defaults(func=cmd_tpm)
