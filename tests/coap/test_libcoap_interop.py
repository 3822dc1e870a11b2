"""Interoperability with a CoAP client nobody here wrote: libcoap's `coap-client` (Debian
libcoap3-bin) against our CoAP/UDP endpoint and our CoAP-over-TLS (RFC 8323) endpoint."""
from __future__ import annotations

import asyncio
import re
import shutil
import ssl

import pytest

from zerotouch.protocol.messages import ErrorReply
from zerotouch.pki.keys import cert_pem, generate_p256, save_cert, save_private_key
from zerotouch.services.vault import load_owner_ca
from zerotouch.transport.coap import start_coap_server

from coap_harness import HOST
from support import need

CLIENTS = ("coap-client-openssl", "coap-client-gnutls", "coap-client")


@pytest.fixture
def coap_client() -> str:
    for name in CLIENTS:
        path = shutil.which(name)
        if path:
            return path
    need("libcoap", "apt-get install libcoap3-bin")


async def run_client(client: str, tmp_path, *args: str) -> tuple[bytes, str]:
    """(response payload, libcoap's verbose log) of one coap-client request."""
    out_file = tmp_path / f"coap-out-{len(list(tmp_path.glob('coap-out-*')))}"
    proc = await asyncio.create_subprocess_exec(client, "-v", "7", "-B", "10", "-o", str(out_file),
                                                *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    log = out.decode(errors="replace") + err.decode(errors="replace")
    return (out_file.read_bytes() if out_file.exists() else b""), log


#: libcoap -v 7 logs each PDU as "v:1 t:CON c:4.00 i:... [ options ] :: binary data length N"
#: followed by the payload in hex: "<<a30018...>>".
PDU = re.compile(r"c:(\d\.\d\d) [^\n]*(?:\n<<([0-9a-f]+)>>)?")


def received(log: str) -> list[tuple[str, bytes]]:
    """(response code, payload) of every response PDU in libcoap's verbose log."""
    return [(code, bytes.fromhex(payload or "")) for code, payload in PDU.findall(log)]


@pytest.fixture
async def tls_server(fleet, tmp_path):
    owner_ca = load_owner_ca(tmp_path / "vault")
    key = generate_p256()
    cert = owner_ca.issue_server(key.public_key(), common_name=HOST, hosts=[HOST])
    save_private_key(tmp_path / "gw.key", key)
    save_cert(tmp_path / "gw.pem", cert)
    (tmp_path / "ca.pem").write_bytes(cert_pem(owner_ca.cert))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tmp_path / "gw.pem"), str(tmp_path / "gw.key"))
    server = await start_coap_server(fleet.rendezvous, fleet.gateway, bind=(HOST, 0), ssl_context=ctx)
    yield server, tmp_path / "ca.pem"
    await server.shutdown()


def check_wkc(payload: bytes) -> None:
    links = payload.decode()
    for path in ("</rv/find-owner>", "</zt/hello>", "</zt/prove>", "</zt/done>"):
        assert path in links, links


def check_bad_request(log: str) -> None:
    answers = [payload for code, payload in received(log) if code == "4.00"]
    assert answers, log[-3000:]
    reply = ErrorReply.decode(answers[-1], max_size=4096)   # a CBOR ErrorReply, not text
    assert reply.code == "malformed", reply


async def test_libcoap_udp_discovers_our_resources(coap_client, coap_server, tmp_path):
    out, log = await run_client(coap_client, tmp_path, "-m", "get", f"{coap_server.url}/.well-known/core")
    assert "2.05" in [code for code, _ in received(log)], log[-3000:]
    check_wkc(out)


async def test_libcoap_udp_garbage_hello_is_4_00_with_cbor_error(coap_client, coap_server, tmp_path):
    out, log = await run_client(coap_client, tmp_path, "-m", "post", "-t", "60", "-e", "garbage",
                                f"{coap_server.url}/zt/hello")
    check_bad_request(log)


async def test_libcoap_over_tls_rfc8323(coap_client, tls_server, tmp_path):
    server, ca = tls_server
    assert server.url.startswith("coaps+tcp://")
    out, log = await run_client(coap_client, tmp_path, "-R", str(ca), "-m", "get", f"{server.url}/.well-known/core")
    assert "2.05" in [code for code, _ in received(log)], log[-3000:]
    check_wkc(out)
    out, log = await run_client(coap_client, tmp_path, "-R", str(ca), "-m", "post", "-t", "60", "-e", "garbage",
                                f"{server.url}/zt/hello")
    check_bad_request(log)
