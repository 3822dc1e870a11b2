"""`zerotouch box ...`: bulk boxes (make and claim); argument parsing only, the work is in
services/bulk.py."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path


def cmd_box(args) -> int:
    from ..services import bulk
    if args.action == "make":
        if args.count < 1 or args.count > bulk.MAX_BOX:
            print(f"--count must be 1 to {bulk.MAX_BOX}", file=sys.stderr)
            return 2
        return asyncio.run(bulk.make_box_cli(args.dir, args.rendezvous_info, count=args.count,
                                             identity=args.identity, register=not args.no_register))
    if args.action == "claim":
        from ..introducer.claim import ClaimRefused
        from ..protocol.errors import ProtocolError
        from .owner import owner_from_args
        owner = owner_from_args(args)
        if owner is None:
            return 2
        ca = args.rendezvous_ca.read_text() if args.rendezvous_ca else None
        try:
            result = asyncio.run(bulk.claim_box_remote(args.box_url, owner, rendezvous_ca_pem=ca,
                                                       description=args.description))
        except (ClaimRefused, ProtocolError) as exc:
            print(exc.message, file=sys.stderr)
            return 1
        print(json.dumps(result, indent=2))
        claim = result["claim"]
        if args.gateway_dir:
            if not _add_psks(args, claim):
                return 1
        if claim.get("conflicts"):
            print(f"WARNING: {claim['conflicts']} device(s) of the box were already claimed — if "
                  "that was not you, the box label may have been copied.", file=sys.stderr)
        return 0 if claim.get("failed", 1) == 0 else 1
    return 2


def _add_psks(args, claim: dict) -> bool:
    """The claimed devices' PSKs into the gateway's psk.json (a running gateway follows it)."""
    from ..services import bulk
    claimed = [d["devid"] for d in claim.get("devices", []) if d.get("status") == 200]
    try:
        psks = bulk.box_psks(bulk.parse_box_label(args.box_url), claimed)
    except ValueError as exc:
        print(f"could not derive the box's PSKs: {type(exc).__name__}", file=sys.stderr)
        return False
    return add_psks_to_gateway(args.gateway_dir, psks, what="the box's PSKs")


def add_psks_to_gateway(gateway_dir: Path, psks: dict, *, what: str = "the device's PSK") -> bool:
    """Device PSKs into GATEWAY_DIR/psk.json (0600, atomic, under a lock); says how many, never
    a key. Shared by `box claim` and `introducer claim --device-psk`."""
    from ..transport.coap.security import PSK_FILE, PskFileError, add_device_psks
    try:
        n = add_device_psks(gateway_dir, psks)
    except (OSError, PskFileError, ValueError) as exc:
        # never the keys: the error names the file and the entry at most
        print(f"could not add {what} to {gateway_dir / PSK_FILE}: "
              f"{exc if isinstance(exc, PskFileError) else (exc.strerror if isinstance(exc, OSError) else type(exc).__name__)}", file=sys.stderr)
        return False
    print(f"{n} device PSK(s) added to {gateway_dir / PSK_FILE} (a running gateway uses "
          "them without a restart)", file=sys.stderr)
    return True


def add_box_parser(sub) -> None:
    """`sub`: the top-level subparsers of `zerotouch`."""
    b = sub.add_parser("box", help="bulk boxes: one label (master secret + Device ID range) "
                                   "for many devices")
    bs = b.add_subparsers(dest="action", required=True)
    bm = bs.add_parser("make", help="make a box of devices with derived OTPs and print its label")
    bm.add_argument("--dir", required=True, type=Path, help="factory directory (CA, devices/, labels/)")
    bm.add_argument("--rendezvous-info", required=True, type=Path, help="the rendezvous' public.json")
    bm.add_argument("--count", required=True, type=int, help="devices in the box (≤ 10000)")
    bm.add_argument("--identity", default="software", choices=("software", "psk"),
                    help="identity backend: software, or psk (the PSK profile: no key pair, the "
                         "box's derived PSK; onboard with agent run --transport coap "
                         "--coap-security oscore-psk)")
    bm.add_argument("--no-register", action="store_true", help="do not register at the rendezvous")
    bc = bs.add_parser("claim", help="claim every device of a box for an owner in one step")
    bc.add_argument("box_url", help="box label URL (https://<rendezvous>/.well-known/tte/box?...)")
    bc.add_argument("--gateway-dir", type=Path,
                    help="owner gateway dir: address, fingerprint, admin token (adds the devices "
                         "to its inventory)")
    bc.add_argument("--owner-address", help="cip: the owner gateway's host")
    bc.add_argument("--owner-port", type=int, help="cport")
    bc.add_argument("--owner-fingerprint", help="cfingerprint: SHA-256 of the owner key (hex)")
    bc.add_argument("--owner-edhoc-fingerprint",
                    help="cedhoc: SHA-256 of the gateway's CoAP EDHOC key (hex; --gateway-dir "
                         "sends the gateway's)")
    bc.add_argument("--rendezvous-ca", type=Path, help="PEM to verify the rendezvous TLS certificate")
    bc.add_argument("--description", default="", help="inventory description (default: box range)")
    b.set_defaults(func=cmd_box)
