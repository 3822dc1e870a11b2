"""`zerotouch` command line: argument parsing only; the work is in services/."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from .bench_led import add_bench_led_parser
from .box import add_box_parser
from .est import add_est_parser
from .tpm import add_tpm_parsers
from .factory import add_factory_parser
from .revoke import add_revoke_parser
from .vault import add_vault_parser


def _common_logging(args) -> None:
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _run_server(coro) -> None:
    """Servers run on uvloop where it is installed: its TLS and I/O paths are in C, which
    roughly halves the per-connection cost of a Python server (measured with `zerotouch bench est`)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def _ready(name: str, url: str, args=None):
    def cb():
        print(f"{name} listening on {url}", flush=True)
        if args is not None and getattr(args, "coap", False):
            from ..transport.coap.security import edhoc_fingerprint
            extra = (f", EDHOC key {edhoc_fingerprint(args.dir)}" if args.coap_security == "edhoc" else "")
            print(f"{name} CoAP ({args.coap_security}) on udp port {url.rsplit(':', 1)[1]}{extra}",
                  flush=True)
    return cb


def _coap_options(args) -> dict:
    from ..transport.coap.ratelimit import RateLimit
    return {"coap_security": args.coap_security,
            "coap_rate": RateLimit(rate=args.coap_rate, burst=max(1.0, 2 * args.coap_rate),
                                   handshake_rate=args.coap_handshake_rate,
                                   handshake_burst=max(1.0, 2 * args.coap_handshake_rate))}


def _add_coap_serve_options(sp) -> None:
    from ..transport.coap.security import DEFAULT_MODE, MODES
    sp.add_argument("--coap", action="store_true",
                    help="also serve CoAP over UDP on the same port number (same process)")
    sp.add_argument("--coap-security", choices=MODES, default=DEFAULT_MODE,
                    help="CoAP protection: EDHOC+OSCORE (key in DIR/edhoc.key, the default), "
                         "OSCORE with device PSKs (gateway only, DIR/psk.json), or none")
    sp.add_argument("--coap-rate", type=float, default=200.0,
                    help="CoAP requests per second per source address (burst 2x; 0 = no limit)")
    sp.add_argument("--coap-handshake-rate", type=float, default=20.0,
                    help="EDHOC handshakes per second per source address (burst 2x; 0 = no limit)")


def cmd_manufacture(args) -> int:
    from ..services.admin import manufacture, manufacturer_init
    if args.init:
        print(manufacturer_init(args.dir, args.name))
        return 0
    if args.rendezvous_info is None:
        print("--rendezvous-info is required to make devices", file=sys.stderr)
        return 2
    if args.factory_est and not args.station:
        print("--factory-est needs --station DIR (from `zerotouch factory station`)", file=sys.stderr)
        return 2
    return asyncio.run(manufacture(args.dir, args.rendezvous_info, count=args.count,
                                   identity=args.identity, register=not args.no_register,
                                   factory_est=args.factory_est, station=args.station,
                                   tcti=args.tcti, model=args.model))


def cmd_rendezvous(args) -> int:
    from ..services import roles, servers
    if args.action == "init":
        info = roles.init_rendezvous(args.dir, host=args.host, port=args.port,
                                     manufacturer_cas=args.manufacturer_ca, db=args.db,
                                     public_host=args.public_host)
        print(f"rendezvous initialised in {args.dir}; devices get {Path(args.dir) / 'public.json'} ({info.url})"
              f"\n  CoAP EDHOC key fingerprint: {info.edhoc_fingerprint}")
        return 0
    if args.action == "serve":
        cfg = json.loads((Path(args.dir) / "config.json").read_text())
        _run_server(servers.serve_rendezvous(args.dir, port=args.port, coap=args.coap,
                                             on_ready=_ready("rendezvous", cfg["url"], args),
                                             **_coap_options(args)))
        return 0
    if args.action == "status":
        from ..services.admin import rendezvous_status
        return asyncio.run(rendezvous_status(args.dir, args.serial))
    if args.action == "revoke":
        from ..services.admin import rendezvous_revoke
        return asyncio.run(rendezvous_revoke(args.dir, args.serial))
    return 2


def cmd_gateway(args) -> int:
    from ..services import admin, roles, servers
    if args.action == "init":
        cfg = roles.init_gateway(args.dir, host=args.host, port=args.port,
                                 manufacturer_cas=args.manufacturer_ca, terminus_host=args.terminus_host,
                                 terminus_port=args.terminus_port, rendezvous_info=args.rendezvous_info,
                                 db=args.db, public_host=args.public_host,
                                 bundle_settings={"est_operational": True} if args.operational_certs else None,
                                 terminus_psk_port=args.terminus_psk_port)
        print(f"gateway initialised in {args.dir}\n  url: {cfg['url']}\n"
              f"  owner key fingerprint: {cfg['owner_fingerprint']}\n"
              f"  CoAP EDHOC key fingerprint: {cfg['edhoc_fingerprint']}")
        return 0
    if args.action == "serve":
        cfg = json.loads((Path(args.dir) / "config.json").read_text())
        url = cfg["url"] if not args.port else cfg["url"].rsplit(":", 1)[0] + f":{args.port}"
        _run_server(servers.serve_gateway(args.dir, port=args.port, on_ready=_ready("gateway", url, args),
                                          reuse_port=args.reuse_port, coap=args.coap,
                                          **_coap_options(args)))
        return 0
    if args.action == "register":
        return asyncio.run(admin.gateway_register(args.dir, args.label_url, args.csv, args.description))
    if args.action == "inventory":
        return asyncio.run(admin.gateway_inventory(args.dir, args.json))
    if args.action == "status":
        from ..services.gateway_inventory import gateway_status
        return asyncio.run(gateway_status(args.dir, args.json))
    return 2


def cmd_terminus(args) -> int:
    from ..services.admin import terminus_serve
    return asyncio.run(terminus_serve(args.gateway_dir, args.dir))


def cmd_agent(args) -> int:
    from ..agent.runtime import Agent, device_transport
    from ..services.manufacturer import read_factory
    transport = device_transport(args.transport, read_factory(args.device_dir),
                                 **({"security": args.coap_security, "device_dir": args.device_dir}
                                    if args.transport == "coap" else {}))
    agent = Agent(args.device_dir, transport=transport, max_attempts=args.max_attempts,
                  deadline_s=args.deadline)
    report = asyncio.run(agent.run(telemetry=args.telemetry))
    print(json.dumps(report.__dict__, indent=2), flush=True)
    if args.maintain and report.onboarded and not report.error:
        try:  # renew the operational certificate at its due time, until stopped
            asyncio.run(agent.maintain())
        except KeyboardInterrupt:
            pass
    return 0 if report.onboarded and not report.error else 1


def cmd_introducer(args) -> int:
    from ..introducer.claim import claim_device, label_status, resolve_label
    from ..protocol.errors import ProtocolError
    if args.action == "status":
        ca = args.rendezvous_ca.read_text() if args.rendezvous_ca else None
        try:
            st = asyncio.run(label_status(resolve_label(args.label), rendezvous_ca_pem=ca))
        except ProtocolError as exc:
            print(exc.message, file=sys.stderr)
            return 1
        print(json.dumps(st, indent=2))
        if st.get("status") != "not_mapped":
            print("WARNING: this OTP was already used: the device is claimed.", file=sys.stderr)
        return 0
    from .owner import owner_from_args
    owner = owner_from_args(args)
    if owner is None:
        return 2
    ca = args.rendezvous_ca.read_text() if args.rendezvous_ca else None
    try:
        device_psk = None
        if args.device_psk is not None:
            from ..introducer.claim import read_device_psk
            device_psk = read_device_psk(args.device_psk)
        result = asyncio.run(claim_device(args.label, owner, rendezvous_ca_pem=ca,
                                          description=args.description, device_psk=device_psk))
    except ProtocolError as exc:  # refused claims, unreadable photos, an unreadable PSK
        print(exc.message, file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    if device_psk is not None and args.gateway_dir:
        from .box import add_psks_to_gateway
        if not add_psks_to_gateway(args.gateway_dir, {result["devid"]: device_psk}):
            return 1
    return 0


def cmd_bench(args) -> int:
    from dataclasses import asdict
    from ..bench.est_bench import print_est_bench, run_est_bench
    result = run_est_bench(seconds=args.seconds, connections=args.connections,
                           processes=args.processes, db=args.db)
    print_est_bench(result)
    if args.json:
        print(json.dumps(asdict(result)))
    return 0 if result.est_non_2xx == 0 else 1


def cmd_demo(args) -> int:
    from ..services.demo import run_demo_cli
    return run_demo_cli(args)


class DemoDefault(str):
    """A demo option's default value, told apart from the same value given explicitly
    (`demo --identity psk` picks CoAP with oscore-psk unless told otherwise, and then refuses)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerotouch", description="Zero-touch device onboarding")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("manufacture", help="make devices: identity, IDevID, OTP, label; register them")
    m.add_argument("--dir", required=True, type=Path, help="factory directory (CA, devices/, labels/)")
    m.add_argument("--init", action="store_true", help="only create the manufacturer CA")
    m.add_argument("--rendezvous-info", type=Path, help="the rendezvous' public.json")
    m.add_argument("--count", type=int, default=1)
    m.add_argument("--name", default="zerotouch manufacturer", help="manufacturer name (new CA only)")
    m.add_argument("--identity", default="software", choices=("software", "tpm", "psk"),
                   help="identity backend: software (key files), tpm (keys in the device's TPM) "
                        "or psk (no public-key crypto: a PSK and N_device, the PSK profile)")
    m.add_argument("--tcti", help="the device's TPM with --identity tpm, e.g. "
                   "swtpm:host=127.0.0.1,port=2321 or device:/dev/tpmrm0 (one device per TPM)")
    m.add_argument("--model", help="device type written into the IDevID (the owner's PCR policy "
                   "is chosen by it)")
    m.add_argument("--no-register", action="store_true", help="do not register at the rendezvous")
    m.add_argument("--factory-est", metavar="URL",
                   help="enroll IDevIDs over EST at this factory service (zerotouch factory est-serve)")
    m.add_argument("--station", type=Path, help="station credential directory (zerotouch factory station)")
    m.set_defaults(func=cmd_manufacture)

    r = sub.add_parser("rendezvous", help="the rendezvous service")
    rs = r.add_subparsers(dest="action", required=True)
    ri = rs.add_parser("init")
    ri.add_argument("--dir", required=True, type=Path)
    ri.add_argument("--host", default="127.0.0.1")
    ri.add_argument("--public-host", help="host name devices use, if not --host")
    ri.add_argument("--port", type=int, default=8443)
    ri.add_argument("--manufacturer-ca", action="append", required=True, help="trusted manufacturer CA PEM")
    ri.add_argument("--db", help="database URL (default: sqlite in --dir)")
    rsv = rs.add_parser("serve")
    rsv.add_argument("--dir", required=True, type=Path)
    rsv.add_argument("--port", type=int, help="override the configured port")
    _add_coap_serve_options(rsv)
    rst = rs.add_parser("status")
    rst.add_argument("--dir", required=True, type=Path)
    rst.add_argument("serial", nargs="?")
    rrv = rs.add_parser("revoke", help="never redirect this device again")
    rrv.add_argument("--dir", required=True, type=Path)
    rrv.add_argument("serial")
    r.set_defaults(func=cmd_rendezvous)

    g = sub.add_parser("gateway", help="the owner gateway (with its vault)")
    gs = g.add_subparsers(dest="action", required=True)
    gi = gs.add_parser("init")
    gi.add_argument("--dir", required=True, type=Path)
    gi.add_argument("--host", default="127.0.0.1")
    gi.add_argument("--public-host")
    gi.add_argument("--port", type=int, default=8444)
    gi.add_argument("--manufacturer-ca", action="append", required=True)
    gi.add_argument("--terminus-host", default="127.0.0.1")
    gi.add_argument("--terminus-port", type=int, default=8883)
    gi.add_argument("--terminus-psk-port", type=int,
                    help="the terminus' TLS-PSK listener for PSK-profile devices (no certificates)")
    gi.add_argument("--rendezvous-info", help="rendezvous public.json (to report devices as registered)")
    gi.add_argument("--db")
    gi.add_argument("--operational-certs", action="store_true",
                    help="devices enroll short-lived operational certificates over EST (label "
                         "'operational') and use them at the terminus")
    gsv = gs.add_parser("serve")
    gsv.add_argument("--dir", required=True, type=Path)
    gsv.add_argument("--port", type=int, help="override the configured port (run several replicas)")
    gsv.add_argument("--reuse-port", action="store_true",
                     help="share the port with other gateway processes on this host (SO_REUSEPORT)")
    _add_coap_serve_options(gsv)
    gr = gs.add_parser("register", help="add devices to the inventory from labels")
    gr.add_argument("--dir", required=True, type=Path)
    gr.add_argument("label_url", nargs="?")
    gr.add_argument("--csv", type=Path, help="CSV with columns label_url[,description]")
    gr.add_argument("--description", default="")
    gv = gs.add_parser("inventory", help="list the inventory")
    gv.add_argument("--dir", required=True, type=Path)
    gv.add_argument("--json", action="store_true")
    add_revoke_parser(gs)
    gst = gs.add_parser("status", help="ask the rendezvous about devices not heard from")
    gst.add_argument("--dir", required=True, type=Path)
    gst.add_argument("--json", action="store_true")
    add_est_parser(gs)
    g.set_defaults(func=cmd_gateway)

    t = sub.add_parser("terminus", help="the owner's MQTT broker (Mosquitto)")
    ts = t.add_subparsers(dest="action", required=True)
    tsv = ts.add_parser("serve")
    tsv.add_argument("--gateway-dir", required=True, type=Path)
    tsv.add_argument("--dir", type=Path, help="where the Mosquitto config goes (default GATEWAY_DIR/terminus)")
    t.set_defaults(func=cmd_terminus)

    a = sub.add_parser("agent", help="the device agent")
    as_ = a.add_subparsers(dest="action", required=True)
    ar = as_.add_parser("run")
    ar.add_argument("--device-dir", required=True, type=Path)
    ar.add_argument("--telemetry", type=int, default=3, help="telemetry messages to publish")
    ar.add_argument("--max-attempts", type=int, default=None)
    ar.add_argument("--deadline", type=float, default=None, help="give up after this many seconds")
    ar.add_argument("--transport", choices=("http", "coap"), default="http",
                    help="how the device reaches the rendezvous and gateway (coap: UDP, same port numbers)")
    ar.add_argument("--coap-security", choices=("none", "edhoc", "oscore-psk"), default="edhoc",
                    help="with --transport coap: EDHOC+OSCORE with pinned keys (default), OSCORE "
                         "with the device's PSK towards the gateway, or none")
    ar.add_argument("--maintain", action="store_true",
                    help="keep running and renew the operational certificate when due")
    a.set_defaults(func=cmd_agent)

    i = sub.add_parser("introducer", help="claim devices for an owner")
    is_ = i.add_subparsers(dest="action", required=True)
    ic = is_.add_parser("claim")
    ic.add_argument("label", help="label URL (https://<rendezvous>/.well-known/tte?otp=..&devid=..), "
                                  "or a photo (PNG/JPEG) of its QR code")
    ic.add_argument("--gateway-dir", type=Path, help="owner gateway dir: address, fingerprint, admin token")
    ic.add_argument("--owner-address", help="cip: the owner gateway's host")
    ic.add_argument("--owner-port", type=int, help="cport")
    ic.add_argument("--owner-fingerprint", help="cfingerprint: SHA-256 of the owner key (hex)")
    ic.add_argument("--owner-edhoc-fingerprint",
                    help="cedhoc: SHA-256 of the gateway's CoAP EDHOC key (hex; from gateway init)")
    ic.add_argument("--rendezvous-ca", type=Path, help="PEM to verify the rendezvous TLS certificate")
    ic.add_argument("--description", default="")
    ic.add_argument("--device-psk", metavar="FILE|HEX",
                    help="a PSK-profile device: its PSK (the device's psk.secret file, or hex — "
                         "a file keeps it off the command line); the claim sends only K_rv "
                         "derived from it, and with --gateway-dir the PSK goes into the "
                         "gateway's psk.json")
    ist = is_.add_parser("status", help="a label's status at its rendezvous")
    ist.add_argument("label", help="label URL or photo")
    ist.add_argument("--rendezvous-ca", type=Path)
    i.set_defaults(func=cmd_introducer)

    add_vault_parser(sub)
    add_factory_parser(sub)
    add_box_parser(sub)
    add_tpm_parsers(sub)

    b = sub.add_parser("bench", help="benchmarks with figures in their output")
    bs = b.add_subparsers(dest="action", required=True)
    be = bs.add_parser("est", help="simpleenroll per second vs. an nginx floor (wrk, new TLS "
                                   "connection per request)")
    be.add_argument("--seconds", type=int, default=10)
    be.add_argument("--connections", type=int, default=32)
    be.add_argument("--processes", type=int, default=2, help="gateway processes (SO_REUSEPORT)")
    be.add_argument("--db", help="database URL (default SQLite)")
    be.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    from .bench_tpm import add_bench_tpm_parser
    add_bench_tpm_parser(bs)
    add_bench_led_parser(bs)

    d = sub.add_parser("demo", help="a whole fleet end to end on loopback")
    d.add_argument("--devices", type=int, default=20)
    d.add_argument("--db", help="database URL, e.g. postgresql://127.0.0.1/test (default SQLite)")
    d.add_argument("--state-dir", type=Path, help="keep everything here (default: a temp dir)")
    d.add_argument("--concurrency", type=int, default=4,
                   help="devices onboarding at once (latency vs. throughput; see README)")
    d.add_argument("--telemetry", type=int, default=3, help="messages each device publishes")
    d.add_argument("--gateways", type=int, default=2, help="gateway processes on one database")
    d.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    d.add_argument("--serve", action="store_true", help="keep every role running afterwards")
    d.add_argument("--operational", action="store_true",
                   help="devices also enroll a 24 h operational certificate over EST and use it")
    d.add_argument("--identity", choices=("software", "tpm", "psk"), default="software",
                   help="tpm: every device gets its own software TPM (swtpm) holding its keys; "
                        "psk: devices of the PSK profile (no public-key crypto), claimed with "
                        "their cpsk, onboarding over CoAP with oscore-psk and publishing over "
                        "the terminus' TLS-PSK listener")
    d.add_argument("--transport", choices=("http", "coap"), default=DemoDefault("http"),
                   help="devices onboard over HTTPS or CoAP/UDP (servers run with --coap); "
                        "default http, coap with --identity psk")
    d.add_argument("--coap-security", choices=("none", "edhoc", "oscore-psk"), default=DemoDefault("edhoc"),
                   help="with --transport coap: how CoAP is protected (default EDHOC+OSCORE; "
                        "oscore-psk with --identity psk)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _common_logging(args)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
