"""The owner a claim is for, from command-line options (shared by `introducer` and `box`)."""
from __future__ import annotations

import json
import sys


def owner_from_args(args):
    """`--gateway-dir` (address, fingerprint and admin token from the owner's gateway), or the
    explicit `--owner-address/--owner-port/--owner-fingerprint`; None (after saying why) if neither."""
    from ..introducer.claim import Owner
    gw_cfg, token, gw_ca = {}, None, None
    if args.gateway_dir:
        gw_cfg = json.loads((args.gateway_dir / "config.json").read_text())
        token = (args.gateway_dir / "admin.token").read_text().strip()
        gw_ca = (args.gateway_dir / "vault" / "owner-ca.pem").read_text()
    elif not (args.owner_address and args.owner_port and args.owner_fingerprint):
        print("give --gateway-dir, or --owner-address, --owner-port and --owner-fingerprint",
              file=sys.stderr)
        return None
    return Owner(address=args.owner_address or gw_cfg.get("host", ""),
                 port=args.owner_port or gw_cfg.get("port", 0),
                 fingerprint=args.owner_fingerprint or gw_cfg.get("owner_fingerprint", ""),
                 gateway_url=gw_cfg.get("url"), admin_token=token, gateway_ca_pem=gw_ca,
                 edhoc_fingerprint=getattr(args, "owner_edhoc_fingerprint", None)
                 or gw_cfg.get("edhoc_fingerprint"))
