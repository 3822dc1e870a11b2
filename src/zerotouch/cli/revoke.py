"""`zerotouch gateway revoke`: argument parsing only (the work is services.revocation)."""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ..services.revocation import REASONS


def cmd_gateway_revoke(args) -> int:
    from ..protocol.errors import NotFound, ProtocolError
    from ..services.revocation import describe_crl, gateway_revoke
    try:
        result, snap = asyncio.run(gateway_revoke(args.dir, device=args.device, cert=args.cert,
                                                  reason=args.reason))
    except NotFound as exc:
        print(f"not found: {exc.message}", file=sys.stderr)
        return 1
    except ProtocolError as exc:
        print(f"refused: {exc.message}", file=sys.stderr)
        return 2
    print(result.describe())
    print(f"{describe_crl(snap)}; written to {Path(args.dir) / 'crl.pem'}")
    return 0


def add_revoke_parser(gateway_subparsers) -> argparse.ArgumentParser:
    p = gateway_subparsers.add_parser(
        "revoke", help="revoke a device's certificates (or one certificate) and rewrite the CRL")
    p.add_argument("--dir", required=True, type=Path)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--device", metavar="SERIAL", help="every certificate of this device; "
                       "the device is marked revoked and cannot onboard again")
    which.add_argument("--cert", metavar="HEX", help="one certificate, by serial number (hex)")
    # choices: argparse itself names the valid reasons on a typo
    p.add_argument("--reason", choices=REASONS, default=None,
                   help="RFC 5280 reason (default: cessationOfOperation for --device, "
                        "unspecified for --cert)")
    # this subparser's default wins over the `gateway` parser's func
    p.set_defaults(func=_dispatch)
    return p


def _dispatch(args) -> int:
    if args.reason is None:
        args.reason = "cessationOfOperation" if args.device else "unspecified"
    return cmd_gateway_revoke(args)
