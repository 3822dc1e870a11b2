"""EST with a TLS client key in the TPM: `EstClient` run in a child process with OpenSSL's tpm2
provider active.

Python's `ssl` only uses a TSS2 PRIVATE KEY when the tpm2 provider was activated by the
OpenSSL configuration read at start-up (identity/tpm/openssl_env.py), so — as for telemetry
(agent/telemetry.py) — the TLS client runs in a child started with `tpm_tls_environment`. The
child does exactly one request with the unchanged `EstClient` (same verification of the
gateway, same size bounds and strict decoding) and hands back the certificate, or the error as
data from which the parent rebuilds the same exception class (Pending with its Retry-After,
TryLater, EstRefused with its status, MalformedMessage, NotAuthorized), so the agent's swap
logic (agent/renewal.py) treats a TPM device exactly as a software one.

Why a child per request and not a long-lived helper: enrollments happen once a day or so, a
child costs ~0.3 s, and it holds no TPM connection (the provider's) between renewals. Key
creation and CSR signing stay in the agent (tpm2-pytss, identity/tpm/opkeys.py): the child
only needs the key file for the handshake.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..protocol.errors import MalformedMessage, NotAuthorized, ProtocolError, TryLater
from .est_client import EstClient, EstRefused, Pending

CHILD_TIMEOUT = 120.0   # the whole child: start, handshake (hashes in the TPM), request
_ERRORS = {cls.__name__: cls for cls in (Pending, TryLater, EstRefused, MalformedMessage,
                                          NotAuthorized, ProtocolError)}


class TpmEstClient:
    """EstClient's enrollment interface (`simpleenroll`, `simplereenroll`, `close`, byte
    counters) for a client certificate whose key is a TSS2 key file in the TPM at `tcti`."""

    def __init__(self, base_url: str, *, ca_pem: str | bytes, client_cert_file: Path,
                 client_key_file: Path, tcti: str, workdir: Path, timeout: float = 15.0):
        if not Path(client_cert_file).is_file() or not Path(client_key_file).is_file():
            raise OSError(f"EST client credential missing: {client_cert_file}, {client_key_file}")
        self.base_url, self.tcti, self.workdir = base_url, tcti, Path(workdir)
        self.ca_pem = ca_pem.decode() if isinstance(ca_pem, bytes) else ca_pem
        self.cert_file, self.key_file = Path(client_cert_file), Path(client_key_file)
        self.timeout = timeout
        self.bytes_sent = self.bytes_received = 0

    async def close(self) -> None:
        pass   # nothing kept between requests

    async def simpleenroll(self, csr_der: bytes, label: str | None = None) -> x509.Certificate:
        return await self._run("simpleenroll", csr_der, label)

    async def simplereenroll(self, csr_der: bytes, label: str | None = None) -> x509.Certificate:
        return await self._run("simplereenroll", csr_der, label)

    async def _run(self, op: str, csr_der: bytes, label: str | None) -> x509.Certificate:
        from ..identity.tpm.openssl_env import tpm_tls_environment
        env = dict(os.environ, **tpm_tls_environment(self.tcti, self.workdir))
        env.setdefault("TSS2_LOG", "all+none")
        job = {"base_url": self.base_url, "ca_pem": self.ca_pem, "cert_file": str(self.cert_file),
               "key_file": str(self.key_file), "op": op, "label": label,
               "csr": base64.b64encode(csr_der).decode(), "timeout": self.timeout}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "zerotouch.agent.est_tpm", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        try:
            out, err = await asyncio.wait_for(proc.communicate(json.dumps(job).encode()),
                                              CHILD_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise TryLater(f"EST {op} with the TPM key did not finish within {CHILD_TIMEOUT:.0f} s")
        try:
            result = json.loads(out)
        except ValueError:
            raise OSError(f"EST {op} with the TPM key: the TLS child failed: "
                          f"{err.decode(errors='replace')[-300:]}") from None
        self.bytes_sent += int(result.get("bytes_sent", 0))
        self.bytes_received += int(result.get("bytes_received", 0))
        if "cert" in result:
            return x509.load_pem_x509_certificate(result["cert"].encode())
        raise _rebuild(result.get("error") or {})


def _rebuild(error: dict) -> Exception:
    message = str(error.get("message", "EST request failed in the TLS child"))
    cls = _ERRORS.get(error.get("type", ""))
    if cls is None:
        return OSError(message)          # transport trouble: the caller retries with backoff
    kwargs = {k: error[k] for k in ("status", "code", "retry_after") if error.get(k) is not None}
    return cls(message, **kwargs)


def _describe(exc: BaseException) -> dict:
    if isinstance(exc, ProtocolError):
        name = next((n for n, c in _ERRORS.items() if type(exc) is c), None)
        if name is None:   # a subclass we do not rebuild: keep its status and message
            name = next(n for n, c in _ERRORS.items() if isinstance(exc, c))
        return {"type": name, "message": exc.message, "status": exc.status, "code": exc.code,
                "retry_after": exc.retry_after}
    return {"type": "OSError", "message": f"{type(exc).__name__}: {exc}"}


async def _child_job(job: dict) -> dict:
    client = EstClient(job["base_url"], ca_pem=job["ca_pem"], client_cert_file=Path(job["cert_file"]),
                       client_key_file=Path(job["key_file"]), timeout=float(job["timeout"]))
    try:
        enroll = client.simplereenroll if job["op"] == "simplereenroll" else client.simpleenroll
        cert = await enroll(base64.b64decode(job["csr"]), label=job["label"])
        result = {"cert": cert.public_bytes(Encoding.PEM).decode()}
    except Exception as exc:   # noqa: BLE001 - everything goes back to the parent as data
        result = {"error": _describe(exc)}
    finally:
        await client.close()
    return {**result, "bytes_sent": client.bytes_sent, "bytes_received": client.bytes_received}


def _child_main() -> int:
    """One job as JSON on stdin; {"cert": PEM} or {"error": {...}} (and byte counts) on stdout."""
    job = json.load(sys.stdin)
    try:
        result = asyncio.run(_child_job(job))
    except Exception as exc:   # noqa: BLE001 - e.g. the TSS2 key does not load (ssl.SSLError)
        result = {"error": _describe(exc)}
    print(json.dumps(result))
    return 0 if "cert" in result else 1


if __name__ == "__main__":
    raise SystemExit(_child_main())
