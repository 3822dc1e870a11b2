"""`zerotouch bench est`: simpleenroll throughput against an nginx floor.

Both servers answer over the same TLS set-up (the gateway's P-256 certificate), loaded by wrk
with a new TLS connection per request. The device authenticates the way a gateway behind a
TLS-terminating proxy sees it: its IDevID forwarded in `X-SSL-Client-Cert` from a trusted
address (wrk cannot present client certificates); the gateway still parses and verifies the
chain, checks the inventory, checks the CSR, issues and records a certificate per request.
"""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from ..pki.keys import generate_p256
from ..protocol.est import certs_only, encode_body
from ..services.manufacturer import Manufacturer, RendezvousInfo
from ..services.roles import build_gateway, init_gateway
from ..util.files import atomic_write_json
from ..util.net import free_port, wait_for_port
from .loadgen import nginx_floor, nginx_tls_proxy, run_wrk


@dataclass
class EstBenchResult:
    seconds: int
    connections: int
    processes: int
    db: str
    est_requests: int
    est_rps: float
    est_non_2xx: int
    est_p50_ms: float | None
    certificates_recorded: int
    proxied_rps: float | None
    proxied_p50_ms: float | None
    nginx_rps: float
    nginx_p50_ms: float | None
    ratio: float


def _csr_body() -> bytes:
    key = generate_p256()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")]))
           .sign(key, hashes.SHA256()))
    return encode_body(csr.public_bytes(serialization.Encoding.DER))


async def _prepare(root: Path, db: str | None) -> tuple[dict, Path, str]:
    factory = Manufacturer(root / "factory")
    info = RendezvousInfo(url="https://127.0.0.1:1", key_pem="", tls_ca_pem="")
    dev = factory.make_device(root / "factory", info)
    port = free_port()
    cfg = init_gateway(root / "gw", host="127.0.0.1", port=port,
                       manufacturer_cas=[str(root / "factory" / "manufacturer-ca.pem")], db=db)
    cfg["est"] = {"trusted_proxies": ["127.0.0.1"]}
    atomic_write_json(root / "gw" / "config.json", cfg)
    gw = await build_gateway(root / "gw")
    try:
        await gw.service.register_label(dev.label.url, "bench device")
    finally:
        await gw.close()
    pem = (dev.device_dir / "idevid.pem").read_text()
    return cfg, dev.device_dir, quote(pem, safe="")


async def _count_certs(gw_dir: Path) -> int:
    from sqlalchemy import func, select
    from ..storage.schema import gw_certificates
    gw = await build_gateway(gw_dir)
    try:
        async with gw.store.engine.connect() as c:
            return (await c.execute(select(func.count()).select_from(gw_certificates))).scalar_one()
    finally:
        await gw.close()


def run_est_bench(*, seconds: int = 10, connections: int = 32, processes: int = 2,
                  db: str | None = None) -> EstBenchResult:
    root = Path(tempfile.mkdtemp(prefix="zerotouch-bench-"))
    schema = None
    if db and db.startswith("postgres"):
        from ..services.demo import _pg_schema
        import secrets
        schema = "zt_bench_" + secrets.token_hex(4)
        asyncio.run(_pg_schema(db, True, schema))
        db = f"{db}{'&' if '?' in db else '?'}schema={schema}"
    procs: list[subprocess.Popen] = []
    try:
        cfg, _dev_dir, cert_header = asyncio.run(_prepare(root, db))
        port = cfg["port"]
        for _ in range(processes):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "zerotouch.cli", "gateway", "serve", "--dir", str(root / "gw"),
                 "--reuse-port"], stdout=subprocess.DEVNULL, stderr=open(root / "gw.log", "ab")))
        asyncio.run(wait_for_port("127.0.0.1", port, 30))
        time.sleep(1.0)  # every process is listening, not only the first
        body = root / "csr.b64"
        body.write_bytes(_csr_body())
        url = f"https://127.0.0.1:{port}/.well-known/est/simpleenroll"
        before = asyncio.run(_count_certs(root / "gw"))
        est = run_wrk(url, seconds=seconds, connections=connections, method="POST", body_file=body,
                      headers={"Content-Type": "application/pkcs10", "X-SSL-Client-Cert": cert_header})
        issued = asyncio.run(_count_certs(root / "gw")) - before
        # The same gateway processes behind nginx terminating TLS (trusted-proxy mode).
        proxy_port = free_port()
        proxy_url = f"https://127.0.0.1:{proxy_port}/.well-known/est/simpleenroll"
        proxy = nginx_tls_proxy(root / "proxy", port=proxy_port, cert=root / "gw" / "tls.pem",
                                key=root / "gw" / "tls.key", upstream_port=port)
        proxy.start()
        try:
            px = run_wrk(proxy_url, seconds=seconds, connections=connections,
                         method="POST", body_file=body,
                         headers={"Content-Type": "application/pkcs10", "X-SSL-Client-Cert": cert_header})
        finally:
            proxy.stop()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    # The floor: nginx with the same certificate and key, a constant body of the same size.
    sample = encode_body(certs_only([x509.load_pem_x509_certificate(
        (root / "gw" / "tls.pem").read_bytes())])).decode().replace("\n", "")
    floor = nginx_floor(root / "nginx", port=free_port(), cert=root / "gw" / "tls.pem",
                        key=root / "gw" / "tls.key", body=sample, workers=processes)
    floor.start()
    try:
        ng = run_wrk(f"https://127.0.0.1:{floor.port}/", seconds=seconds, connections=connections,
                     method="POST", body_file=body, headers={"Content-Type": "application/pkcs10"})
    finally:
        floor.stop()
    if schema:
        from ..services.demo import _pg_schema
        asyncio.run(_pg_schema(db.split("?")[0], False, schema))
    return EstBenchResult(seconds=seconds, connections=connections, processes=processes,
                          db="postgresql" if schema else "sqlite", est_requests=est.requests,
                          est_rps=round(est.rps, 1), est_non_2xx=est.non_2xx,
                          est_p50_ms=est.latency_p50_ms, certificates_recorded=issued,
                          proxied_rps=round(px.rps, 1), proxied_p50_ms=px.latency_p50_ms,
                          nginx_rps=round(ng.rps, 1), nginx_p50_ms=ng.latency_p50_ms,
                          ratio=round(est.rps / ng.rps, 3) if ng.rps else 0.0)


def print_est_bench(r: EstBenchResult) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"simpleenroll, new TLS connection per request ({r.connections} connections, "
                    f"{r.seconds} s, wrk)")
    for col in ("server", "requests/s", "p50 ms", "notes"):
        t.add_column(col)
    t.add_row(f"zerotouch gateway x{r.processes} ({r.db})", f"{r.est_rps:.0f}", f"{r.est_p50_ms}",
              f"{r.est_requests} requests, {r.est_non_2xx} non-2xx, "
              f"{r.certificates_recorded} certificates issued and recorded")
    if r.proxied_rps is not None:
        t.add_row(f"nginx TLS proxy -> zerotouch gateway x{r.processes}", f"{r.proxied_rps:.0f}",
                  f"{r.proxied_p50_ms}", "TLS terminated by nginx, IDevID forwarded (trusted proxy)")
    t.add_row(f"nginx x{r.processes} (constant body)", f"{r.nginx_rps:.0f}", f"{r.nginx_p50_ms}", "the floor")
    Console().print(t)
    Console().print(f"ratio: {r.ratio:.1%} of the floor directly"
                    + (f", {r.proxied_rps / r.nginx_rps:.1%} behind the TLS proxy" if r.proxied_rps else ""))


__all__ = ["run_est_bench", "print_est_bench", "EstBenchResult", "asdict"]
