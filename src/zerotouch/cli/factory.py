"""`zerotouch factory ...`: the factory line's EST service for IDevIDs (argument parsing only)."""
from __future__ import annotations

import sys
from pathlib import Path


def cmd_factory(args) -> int:
    from ..services import factory_est
    from ..services.manufacturer import Manufacturer
    if args.action == "est-serve":
        from .main import _ready, _run_server   # at call time: main imports this module
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        _run_server(factory_est.serve_factory_est(
            args.dir, args.host, args.port,
            on_ready=_ready("factory EST", f"https://{host}:{args.port}/.well-known/est/idevid")))
        return 0
    if args.action == "station":
        try:
            cred = factory_est.issue_station(Manufacturer(args.dir), args.name, args.out)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        print(f"station {args.name}: {cred.cert_file}, {cred.key_file} (0600); trust {cred.ca_file}")
        return 0
    return 2


def add_factory_parser(sub) -> None:
    """`sub`: the top-level subparsers of `zerotouch`."""
    f = sub.add_parser("factory", help="the factory line: IDevIDs over EST for provisioning stations")
    fs = f.add_subparsers(dest="action", required=True)
    fe = fs.add_parser("est-serve", help="EST server at /.well-known/est/idevid/ (station "
                                         "client certificates required)")
    fe.add_argument("--dir", required=True, type=Path, help="manufacturer directory (its CA)")
    fe.add_argument("--host", default="127.0.0.1")
    fe.add_argument("--port", type=int, default=8445)
    st = fs.add_parser("station", help="issue a provisioning station's credential "
                                       "(from the provisioning CA, made on first use)")
    st.add_argument("--dir", required=True, type=Path, help="manufacturer directory")
    st.add_argument("--name", required=True, help="station name (its certificate's CN)")
    st.add_argument("--out", required=True, type=Path,
                    help="where station.pem, station.key and manufacturer-ca.pem go")
    f.set_defaults(func=cmd_factory)
