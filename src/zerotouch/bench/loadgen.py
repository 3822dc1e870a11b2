"""Load generation with wrk (a C load generator nobody here wrote) and an nginx floor.

Every request opens a new TLS connection (`Connection: close`), so the figure includes the
TLS handshake, as a fleet of devices each enrolling once would.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    non_2xx: int
    errors: str
    latency_p50_ms: float | None
    raw: str


def find_tool(name: str) -> str | None:
    return shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)


def _lua(method: str, body_file: Path | None, headers: dict[str, str]) -> str:
    hdrs = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    body = ""
    if body_file is not None:
        body = f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); f:close()'
    return textwrap.dedent(f"""
        wrk.method = "{method}"
        {body}
        {hdrs}
        wrk.headers["Connection"] = "close"
        """)


def run_wrk(url: str, *, seconds: int, connections: int, threads: int = 2, method: str = "GET",
            body_file: Path | None = None, headers: dict[str, str] | None = None) -> WrkResult:
    wrk = find_tool("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed: apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(_lua(method, body_file, headers or {}))
        script = fh.name
    proc = subprocess.run([wrk, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                           "--latency", "-s", script, url], capture_output=True, text=True,
                          timeout=seconds + 60)
    out = proc.stdout + proc.stderr
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    if not m:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    n, dur, unit = int(m.group(1)), float(m.group(2)), m.group(3)
    dur = dur / 1000 if unit == "ms" else dur * 60 if unit == "m" else dur
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: (.*)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    lat = None
    if p50:
        v, u = float(p50.group(1)), p50.group(2)
        lat = v / 1000 if u == "us" else v * 1000 if u == "s" else v
    return WrkResult(requests=n, seconds=dur, rps=n / dur if dur else 0.0,
                     non_2xx=int(non2xx.group(1)) if non2xx else 0,
                     errors=errs.group(1) if errs else "", latency_p50_ms=lat, raw=out)


def _nginx_conf(d: Path, workers: int, server: str, upstream: str = "") -> str:
    return textwrap.dedent(f"""
        worker_processes {workers};
        daemon off;
        pid {d}/nginx.pid;
        error_log {d}/error.log warn;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            client_body_temp_path {d}/body;
            proxy_temp_path {d}/proxy;
            fastcgi_temp_path {d}/fastcgi;
            uwsgi_temp_path {d}/uwsgi;
            scgi_temp_path {d}/scgi;
            {upstream}
            {server}
        }}
        """)


class NginxProcess:
    def __init__(self, directory: Path, conf: str):
        self.dir = Path(directory)
        self.conf = conf
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self) -> None:
        nginx = find_tool("nginx")
        if nginx is None:
            raise RuntimeError("nginx is not installed: apt-get install nginx-light")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "nginx.conf").write_text(self.conf)
        self.proc = subprocess.Popen([nginx, "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx did not start: {(self.dir / 'error.log').read_text()[-1000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def nginx_tls_proxy(directory: Path, *, port: int, cert: Path, key: Path, upstream_port: int,
                    workers: int = 1) -> NginxProcess:
    """nginx terminating TLS and passing requests to the gateway over kept-alive TLS: the
    deployment the gateway's trusted-proxy mode is for. In production nginx also verifies the
    client certificate and sets X-SSL-Client-Cert from $ssl_client_escaped_cert (overwriting
    whatever a client sent); wrk cannot present one, so here the header comes from wrk."""
    d = Path(directory)
    upstream = f"upstream gw {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}"
    server = (f"server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; "
              f"ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3; "
              "location / { proxy_pass https://gw; proxy_http_version 1.1; "
              'proxy_set_header Connection ""; proxy_ssl_session_reuse on; } }')
    return NginxProcess(d, _nginx_conf(d, workers, server, upstream))


def nginx_floor(directory: Path, *, port: int, cert: Path, key: Path, body: str,
                workers: int = 2) -> NginxProcess:
    """nginx answering a constant body over the same TLS set-up (certificate, key type, port)."""
    d = Path(directory)
    server = (f"server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; "
              f"ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3; "
              f'location / {{ default_type application/pkcs7-mime; return 200 "{body}"; }} }}')
    proc = NginxProcess(d, _nginx_conf(d, workers, server))
    proc.port = port
    return proc
