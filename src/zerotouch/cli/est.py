"""`zerotouch gateway est ...`: enrollment requests awaiting approval (argument parsing only)."""
from __future__ import annotations

import asyncio
from pathlib import Path


def cmd_est(args) -> int:
    from ..services.est import est_admin
    return asyncio.run(est_admin(args.dir, args.est_action, getattr(args, "request_id", None),
                                 show_all=getattr(args, "all", False)))


def add_est_parser(gateway_subparsers) -> None:
    e = gateway_subparsers.add_parser("est", help="EST enrollment requests awaiting approval")
    es = e.add_subparsers(dest="est_action", required=True)
    el = es.add_parser("list", help="requests awaiting approval (202 + Retry-After to the device)")
    el.add_argument("--dir", required=True, type=Path)
    el.add_argument("--all", action="store_true", help="also approved, rejected and issued ones")
    for name, text in (("approve", "the device's next identical request is issued"),
                       ("reject", "the device's next request gets 403")):
        p = es.add_parser(name, help=text)
        p.add_argument("--dir", required=True, type=Path)
        p.add_argument("request_id", help="hex SHA-256 of the CSR, as `list` shows it")
    e.set_defaults(func=cmd_est)
