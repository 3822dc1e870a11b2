"""`zerotouch vault ...`: run the owner vault as its own service (argument parsing only)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path


def cmd_vault(args) -> int:
    from ..services import roles, servers
    if args.action == "init":
        svc = roles.init_vault_service(args.gateway_dir, host=args.host, port=args.port)
        print(f"vault service configured in {Path(args.gateway_dir) / 'vault' / 'service.json'}\n"
              f"  url: {svc['url']} (the gateway now uses it; start it with `zerotouch vault serve`)")
        return 0
    if args.action == "serve":
        url = json.loads((Path(args.gateway_dir) / "vault" / "service.json").read_text())["url"]
        asyncio.run(servers.serve_vault(args.gateway_dir,
                                        on_ready=lambda: print(f"vault listening on {url}", flush=True)))
        return 0
    return 2


def add_vault_parser(sub) -> None:
    v = sub.add_parser("vault", help="the owner vault as a separate service (mutual TLS + token)")
    vs = v.add_subparsers(dest="action", required=True)
    vi = vs.add_parser("init", help="issue the vault's TLS and gateway client certificates, token")
    vi.add_argument("--gateway-dir", required=True, type=Path)
    vi.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    vi.add_argument("--port", required=True, type=int)
    vsv = vs.add_parser("serve")
    vsv.add_argument("--gateway-dir", required=True, type=Path)
    v.set_defaults(func=cmd_vault)
