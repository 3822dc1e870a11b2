"""The vault as its own service: who it refuses, how errors come back, a gateway that uses it.

The Vault contract itself runs against RemoteVault in test_vault_contract.py; this file is
about what only the remote form has: mutual TLS, the token, the wire, the set-up.
"""
from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import aiohttp
import cbor2
import pytest

from zerotouch.cli.main import main
from zerotouch.pki.ca import CertificateAuthority, make_root
from zerotouch.pki.keys import generate_p256, load_cert, public_key_pem
from zerotouch.protocol.cose import SoftwareSigner
from zerotouch.protocol.errors import MalformedMessage, NotAuthorized, NotFound, TryLater
from zerotouch.protocol.messages import ErrorReply
from zerotouch.protocol.states import DeviceState, InventoryState
from zerotouch.services import roles, servers
from zerotouch.services.manufacturer import Manufacturer, RendezvousInfo
from zerotouch.services.rendezvous import RendezvousConfig, RendezvousService
from zerotouch.services.vault import (VAULT_KEY, VAULT_KEY_ENV, LocalVault, init_vault_dir,
                                      load_owner_ca)
from zerotouch.services.vault_remote import (RemoteVault, VaultRefused, VaultUnavailable,
                                             error_from_reply)
from zerotouch.storage import open_store
from zerotouch.transport.http.server import start_site
from zerotouch.transport.http.vault_app import vault_app
from zerotouch.util.files import read_json
from zerotouch.util.net import free_port
from fleet import Fleet
from vault_harness import issue_pair, start_vault_server

CBOR = "application/cbor"


@pytest.fixture
async def served(tmp_path, sqlite_url, monkeypatch):
    monkeypatch.setenv(VAULT_KEY_ENV, "remote-test-" + os.urandom(8).hex())
    init_vault_dir(tmp_path / "vault")
    store = await open_store(sqlite_url)
    server = await start_vault_server(LocalVault(tmp_path / "vault", store.secrets, store.certs),
                                      tmp_path / "vault", tmp_path / "tls")
    try:
        yield server
    finally:
        await server.close()
        await store.close()


def raw_ctx(server, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=server.ca_pem)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


async def raw_post(server, op: str, body: dict, *, ctx, token: str | None) -> tuple[int, bytes]:
    headers = {"Content-Type": CBOR} | ({} if token is None else {"Authorization": f"Bearer {token}"})
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{server.url}/vault/v1/{op}", data=cbor2.dumps(body), headers=headers,
                          ssl=ctx) as resp:
            return resp.status, await resp.read()


# --- who gets in -----------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "", "wrong-token"], ids=["missing", "empty", "wrong"])
async def test_a_missing_or_wrong_token_is_refused_with_401(served, token):
    ctx = raw_ctx(served, served.client_cert, served.client_key)
    status, body = await raw_post(served, "has-device-secret", {"serial": "0a1b2c3d"}, ctx=ctx,
                                  token=token)
    assert status == 401 and ErrorReply.decode(body).code == "vault_unauthorized"


async def test_remote_vault_with_a_wrong_token_raises_vault_refused(served):
    vault = served.client(token="wrong-token")
    with pytest.raises(VaultRefused) as err:
        await vault.put_device_secret("0a1b2c3d", os.urandom(8))
    # a set-up fault of the gateway: the device must not read it as "your signature is bad"
    assert err.value.vault_status == 401 and err.value.status == 500
    assert not await served.client().has_device_secret("0a1b2c3d")


async def test_a_client_certificate_from_another_ca_fails_the_handshake(served, tmp_path):
    other = CertificateAuthority(key := generate_p256(), make_root(key, "someone else's CA"))
    cert, key_file = issue_pair(other, tmp_path, "other", cn="zt-gateway", hosts=["zt-gateway"])
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, OSError)):
        await raw_post(served, "owner-ca-der", {}, ctx=raw_ctx(served, cert, key_file),
                       token=served.token)
    with pytest.raises(VaultUnavailable):      # even with the right token
        await served.client(client_cert=cert, client_key=key_file).owner_ca_der()


async def test_no_client_certificate_fails_the_handshake(served):
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, OSError)):
        await raw_post(served, "owner-ca-der", {}, ctx=raw_ctx(served), token=served.token)


@pytest.mark.parametrize("cn", ["zt-gateway", "0a1b2c3d"], ids=["gateway-cn-other-key", "device-cn"])
async def test_another_owner_ca_certificate_is_refused_with_403(served, tmp_path, cn):
    # The owner CA also issues device LDevIDs (clientAuth). A device whose serial is
    # "zt-gateway" gets CN=zt-gateway: the pinned key, not the name, is what lets a caller in.
    ca = load_owner_ca(tmp_path / "vault")
    cert, key = issue_pair(ca, tmp_path, "device", cn=cn, hosts=["localhost"])
    status, body = await raw_post(served, "owner-ca-der", {}, ctx=raw_ctx(served, cert, key),
                                  token=served.token)
    assert status == 403 and ErrorReply.decode(body).code == "vault_forbidden"
    with pytest.raises(VaultRefused) as err:
        await served.client(client_cert=cert, client_key=key).owner_ca_der()
    assert err.value.vault_status == 403


async def test_the_app_refuses_a_request_without_tls(tmp_path, monkeypatch):
    monkeypatch.setenv(VAULT_KEY_ENV, "plain-" + os.urandom(8).hex())
    init_vault_dir(tmp_path / "vault")
    store = await open_store(f"sqlite:///{tmp_path}/plain.db")
    port = free_port()
    runner = await start_site(vault_app(LocalVault(tmp_path / "vault", store.secrets, store.certs),
                                        token="t"), "127.0.0.1", port, None)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/vault/v1/owner-ca-der", data=b"\xa0",
                              headers={"Content-Type": CBOR, "Authorization": "Bearer t"}) as resp:
                assert resp.status == 403
    finally:
        await runner.cleanup()
        await store.close()


# --- the wire ----------------------------------------------------------------------------------
async def test_not_found_round_trips_as_not_found_404(served):
    with pytest.raises(NotFound) as err:
        await served.client().owner_proof("ffffffff", os.urandom(16))
    assert err.value.status == 404 and err.value.code == "not_found"
    assert err.value.message == "device ffffffff is not in the owner's inventory"


@pytest.mark.parametrize("body", [
    {"serial": "0a1b2c3d", "extra": 1}, {}, {"serial": b"bytes"}, {"serial": "x" * 257},
], ids=["unknown-arg", "missing-arg", "wrong-type", "too-long"])
async def test_malformed_requests_are_400(served, body):
    ctx = raw_ctx(served, served.client_cert, served.client_key)
    status, reply = await raw_post(served, "has-device-secret", body, ctx=ctx, token=served.token)
    assert status == 400 and ErrorReply.decode(reply).code == "malformed"


async def test_days_must_be_a_finite_number(served):
    with pytest.raises(MalformedMessage):
        await served.client()._call("issue_ldevid", csr_der=b"", serial="s", urn="u", days=True)
    with pytest.raises(MalformedMessage):
        await served.client()._call("issue_ldevid", csr_der=b"", serial="s", urn="u",
                                    days=float("nan"))


def test_custom_codes_keep_their_class_status_and_retry_after():
    def reply(code, status, retry=None):
        return error_from_reply(status, ErrorReply(code=code, message="m", retry_after=retry).encode(), {})
    assert type(reply("revoked", 403)) is NotAuthorized and reply("revoked", 403).code == "revoked"
    later = reply("try_later", 503, 7)
    assert type(later) is TryLater and later.retry_after == 7 and later.status == 503
    plain = error_from_reply(500, b'{"error": "internal"}', {})
    assert plain.status == 500 and not isinstance(plain, VaultRefused)


async def test_an_unreachable_vault_is_503_try_again(served):
    vault = RemoteVault(f"https://127.0.0.1:{free_port()}", ca_pem=served.ca_pem,
                        client_cert=served.client_cert, client_key=served.client_key, token="t")
    try:
        with pytest.raises(VaultUnavailable) as err:
            await vault.owner_ca_der()
        assert err.value.status == 503 and err.value.retry_after
    finally:
        await vault.close()


async def test_one_connection_is_kept_alive(served):
    vault = served.client()
    for _ in range(5):
        await vault.has_device_secret("0a1b2c3d")
    assert len(served.peers) == 5 and len(set(served.peers)) == 1


# --- set-up and a gateway that uses it -----------------------------------------------------------
async def test_gateway_with_vault_url_onboards_a_device_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv(VAULT_KEY_ENV, "e2e-" + os.urandom(8).hex())
    manufacturer = Manufacturer(tmp_path / "manufacturer")
    gw_dir = tmp_path / "gateway"
    roles.init_gateway(gw_dir, host="127.0.0.1", port=free_port(),
                       manufacturer_cas=[str(manufacturer.dir / "manufacturer-ca.pem")])
    port = free_port()
    assert main(["vault", "init", "--gateway-dir", str(gw_dir), "--port", str(port)]) == 0
    assert read_json(gw_dir / "config.json")["vault_url"] == f"https://127.0.0.1:{port}"
    svc = read_json(gw_dir / "vault" / "service.json")
    assert svc["host"] == "127.0.0.1"                              # loopback by default
    assert load_cert(Path(svc["client_cert"])).subject.rfc4514_string() == "CN=zt-gateway"
    for secret in ("token_file", "client_key", "server_key"):
        assert (Path(svc[secret]).stat().st_mode & 0o077) == 0

    ready = asyncio.Event()
    serving = asyncio.create_task(servers.serve_vault(gw_dir, on_ready=ready.set))
    await asyncio.wait_for(ready.wait(), 10)
    monkeypatch.delenv(VAULT_KEY_ENV)                 # from here on only the vault process has it
    assert not (gw_dir / "vault" / VAULT_KEY).exists()
    gw = await roles.build_gateway(gw_dir)
    try:
        assert isinstance(gw.service.vault, RemoteVault)
        rv_key = generate_p256()
        info = RendezvousInfo(url="https://127.0.0.1:8443",
                              key_pem=public_key_pem(rv_key.public_key()).decode(), tls_ca_pem="")
        rendezvous = RendezvousService(gw.store.rendezvous, SoftwareSigner(rv_key),
                                       RendezvousConfig(manufacturer_cas=[manufacturer.ca.cert]))
        # tests/fleet.py drives the device core; its in-process vault has no place here
        fleet = Fleet(tmp=tmp_path, store=gw.store, manufacturer=manufacturer, rv_key=rv_key,
                      rendezvous=rendezvous, vault=None, gateway=gw.service, info=info)
        dev = manufacturer.make_device(tmp_path / "factory", info)
        await rendezvous.register(dev.registration)
        await rendezvous.claim(otp_hex=dev.label.otp, devid_hex=dev.label.devid, cip="127.0.0.1",
                               cport=8444, cfingerprint=gw.config["owner_fingerprint"])
        await gw.service.register_label(dev.label.url, "remote vault device")
        core = fleet.core(dev)
        await fleet.onboard(core)
        assert core.state is DeviceState.ONBOARDED
        assert core.result.bundle.serial == dev.serial
        assert core.redirect.owner_fp.hex() == gw.config["owner_fingerprint"]
        inv = await gw.store.inventory.get(dev.serial)
        assert inv.state is InventoryState.ONBOARDED and inv.ldevid_serial
        assert await gw.service.vault.has_device_secret(dev.serial)

        serving.cancel()                              # the vault goes away: devices come back later
        await asyncio.gather(serving, return_exceptions=True)
        dev2 = manufacturer.make_device(tmp_path / "factory", info)
        with pytest.raises(VaultUnavailable) as err:
            await gw.service.register_label(dev2.label.url, "while the vault is down")
        assert err.value.status == 503 and err.value.retry_after
        assert await gw.store.inventory.get(dev2.serial) is None    # nothing half-registered
    finally:
        await gw.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


def test_vault_cli_parses_init_and_serve():
    from zerotouch.cli.main import build_parser
    args = build_parser().parse_args(["vault", "serve", "--gateway-dir", "gw"])
    assert (args.action, args.gateway_dir) == ("serve", Path("gw"))
    args = build_parser().parse_args(["vault", "init", "--gateway-dir", "gw", "--port", "9000"])
    assert (args.action, args.host, args.port) == ("init", "127.0.0.1", 9000)
