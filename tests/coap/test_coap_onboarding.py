"""A whole onboarding over CoAP on real loopback sockets: UDP (with block-wise) and TLS (RFC 8323)."""
from __future__ import annotations

import json
import random
import ssl

import pytest
from cryptography import x509

from zerotouch.agent.backoff import Backoff
from zerotouch.agent.runtime import Agent
from zerotouch.agent.state import STATE_FILE
from zerotouch.pki.keys import cert_der, generate_p256, save_cert, save_private_key
from zerotouch.protocol.errors import TryLater
from zerotouch.services.vault import load_owner_ca
from zerotouch.transport.coap import start_coap_server
from zerotouch.transport.coap.client import CoapDeviceTransport
from zerotouch.transport.coap.common import MAX_PAYLOAD

from coap_harness import HOST, UdpRelay, count
from zerotouch.storage.schema import gw_sessions

#: A CoAP datagram that fits one IPv6 minimum-MTU packet (1280 - 40 IPv6 - 8 UDP).
IPV6_MIN_MTU_PAYLOAD = 1232


async def claim_to(fleet, dev, port: int) -> None:
    await fleet.rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip=HOST,
                                 cport=port, cfingerprint=fleet.owner_fp_hex)


def agent(dev, transport) -> Agent:
    return Agent(dev.device_dir, transport=transport, backoff=Backoff(rand=random.Random(1)),
                 max_attempts=1, operational=False)


def check_onboarded(fleet, dev, owner_ca_der: bytes) -> None:
    state = json.loads((dev.device_dir / STATE_FILE).read_text())
    assert state["phase"] == "onboarded" and state["owner_fp"] == fleet.owner_fp_hex
    owner_ca = x509.load_der_x509_certificate(owner_ca_der)
    ldevid = x509.load_pem_x509_certificate((dev.device_dir / "ldevid.pem").read_bytes())
    ldevid.verify_directly_issued_by(owner_ca)


async def test_agent_onboards_over_coap_udp_and_reports_bytes(fleet, coap_server, relay, capsys):
    dev = await fleet.make(claim=False)
    # The owner claims with its CoAP address: the redirect says https://127.0.0.1:<port>,
    # which the CoAP transport reaches as coap://127.0.0.1:<port>.
    await claim_to(fleet, dev, relay.port)
    t = CoapDeviceTransport(rendezvous_url=relay.url)
    report = await agent(dev, t).run(telemetry=0)
    assert report.onboarded, report.error
    check_onboarded(fleet, dev, await fleet.vault.owner_ca_der())

    # Hard bounds: every device message fits the server's limit, and block-wise keeps every
    # datagram the device sends inside one IPv6 minimum-MTU packet.
    assert t.requests == 4
    assert 0 < t.largest_sent <= MAX_PAYLOAD
    assert t.largest_received <= MAX_PAYLOAD
    assert relay.up.largest <= IPV6_MIN_MTU_PAYLOAD
    assert relay.down.largest <= IPV6_MIN_MTU_PAYLOAD
    assert report.bytes_sent == t.bytes_sent and report.bytes_received == t.bytes_received

    with capsys.disabled():
        print(f"\n[coap/udp onboarding] payload: device sent {t.bytes_sent} B, received "
              f"{t.bytes_received} B in {t.requests} requests; largest device message "
              f"{t.largest_sent} B, largest answer {t.largest_received} B\n"
              f"[coap/udp onboarding] datagrams: up {relay.up.datagrams} / {relay.up.bytes} B "
              f"(largest {relay.up.largest} B), down {relay.down.datagrams} / {relay.down.bytes} B "
              f"(largest {relay.down.largest} B); up sizes {relay.up.sizes}")


async def test_unclaimed_device_is_told_to_try_later(fleet, coap_server):
    dev = await fleet.make(claim=False)
    core = fleet.core(dev)
    t = CoapDeviceTransport()
    try:
        with pytest.raises(TryLater) as err:
            await t.find_owner(coap_server.url, core.find_owner_request())
    finally:
        await t.close()
    assert err.value.status == 503 and err.value.retry_after is not None and err.value.retry_after > 0


async def test_agent_waits_while_unclaimed_then_onboards(fleet, coap_server):
    dev = await fleet.make(claim=False)
    delays = []

    async def sleep(delay):
        delays.append(delay)
        if len(delays) == 1:
            await claim_to(fleet, dev, coap_server.port)   # the introducer claims meanwhile

    t = CoapDeviceTransport(rendezvous_url=coap_server.url)
    a = Agent(dev.device_dir, transport=t, backoff=Backoff(rand=random.Random(1)), sleep=sleep,
              max_attempts=3, operational=False)
    report = await a.run(telemetry=0)
    assert report.onboarded, report.error
    assert len(delays) == 1 and delays[0] >= 1   # honoured the server's Max-Age / retry_after
    assert await count(fleet.store, gw_sessions) == 1


async def test_blockwise_carries_large_requests_and_answers(tmp_path):
    """A Prove-sized request > 1 KiB goes up in Block1, a several-KiB answer comes back in Block2."""
    class Echo:
        seen: list[int] = []

        async def hello(self, body):
            return body

        async def prove(self, body):
            self.seen.append(len(body))
            return body * 4

        async def done(self, body):
            return b""

    echo = Echo()
    server = await start_coap_server(gateway=echo, bind=(HOST, 0))
    relay = await UdpRelay((HOST, server.port)).start()
    t = CoapDeviceTransport()
    try:
        body = bytes(random.Random(2).randbytes(3000))
        answer = await t.gateway(relay.url, "prove", body)
        assert answer == body * 4 and echo.seen == [3000]
        assert relay.up.datagrams >= 3 and relay.down.datagrams >= 12   # really block-wise
        assert relay.up.largest <= IPV6_MIN_MTU_PAYLOAD and relay.down.largest <= IPV6_MIN_MTU_PAYLOAD
        # the largest body the server takes still gets through
        big = bytes(MAX_PAYLOAD)
        assert await t.gateway(relay.url, "hello", big) == big
    finally:
        await t.close()
        relay.close()
        await server.shutdown()


def _tls_server_context(tmp_path, owner_ca) -> tuple[ssl.SSLContext, bytes]:
    key = generate_p256()
    cert = owner_ca.issue_server(key.public_key(), common_name=HOST, hosts=[HOST])
    save_private_key(tmp_path / "gw.key", key)
    save_cert(tmp_path / "gw.pem", cert)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tmp_path / "gw.pem"), str(tmp_path / "gw.key"))
    return ctx, cert_der(cert)


async def test_agent_onboards_over_coap_over_tls(fleet, tmp_path, capsys):
    owner_ca = load_owner_ca(tmp_path / "vault")
    ctx, gw_cert = _tls_server_context(tmp_path, owner_ca)
    server = await start_coap_server(fleet.rendezvous, fleet.gateway, bind=(HOST, 0), ssl_context=ctx)
    try:
        assert server.url.startswith("coaps+tcp://")
        dev = await fleet.make(claim=False)
        await claim_to(fleet, dev, server.port)
        owner_ca_pem = (await fleet.vault.owner_ca_der())
        from zerotouch.pki.keys import cert_pem
        t = CoapDeviceTransport(rendezvous_url=server.url, https_as="coaps+tcp",
                                rendezvous_ca_pem=cert_pem(owner_ca.cert).decode())
        report = await agent(dev, t).run(telemetry=0)
        assert report.onboarded, report.error
        # The agent checked the gateway's TLS certificate against the proven owner CA.
        assert t.gateway_peer_cert == gw_cert
        check_onboarded(fleet, dev, owner_ca_pem)
        with capsys.disabled():
            print(f"\n[coaps+tcp onboarding] payload: sent {t.bytes_sent} B, received "
                  f"{t.bytes_received} B; largest device message {t.largest_sent} B")
    finally:
        await server.shutdown()


async def test_tls_gateway_with_a_foreign_certificate_is_refused(fleet, tmp_path):
    from zerotouch.pki.ca import CertificateAuthority, make_root
    from zerotouch.pki.keys import cert_pem
    k = generate_p256()
    other = CertificateAuthority(k, make_root(k, "not the owner CA"))
    ctx, _ = _tls_server_context(tmp_path, other)
    server = await start_coap_server(fleet.rendezvous, fleet.gateway, bind=(HOST, 0), ssl_context=ctx)
    try:
        dev = await fleet.make(claim=False)
        await claim_to(fleet, dev, server.port)
        t = CoapDeviceTransport(rendezvous_url=server.url, https_as="coaps+tcp",
                                rendezvous_ca_pem=cert_pem(other.cert).decode())
        report = await agent(dev, t).run(telemetry=0)
        assert not report.onboarded
        assert "not issued by the proven owner" in (report.error or "")
        assert not (dev.device_dir / "ldevid.pem").exists()
    finally:
        await server.shutdown()
