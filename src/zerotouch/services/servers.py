"""Long-running servers for each role (what `zerotouch <role> serve` runs)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from ..storage import open_store
from ..transport.http.common import server_ssl_context
from ..transport.http.est_app import est_server_ssl_context
from ..transport.http.gateway_app import gateway_app
from ..transport.http.rendezvous_app import rendezvous_app
from ..transport.http.server import serve_forever
from ..transport.http.vault_app import vault_app, vault_server_ssl_context
from ..util.files import read_json
from .roles import build_gateway, build_rendezvous
from .vault import LocalVault

log = logging.getLogger("zerotouch.serve")


@contextlib.asynccontextmanager
async def coap_alongside(host: str, port: int, *, rendezvous=None, gateway=None, enabled: bool = True,
                         directory: Path | None = None, security: str = "none", rate_limit=None,
                         psk_file=None):
    """CoAP over UDP on the same port number as the HTTPS server (TCP), on the same service
    objects, for the lifetime of the block, protected per `security` (transport/coap/security.py;
    EDHOC's key is in `directory`). While it runs, SIGTERM stops the process cleanly
    (the HTTPS site and the CoAP context are both shut down), like Ctrl-C. `psk_file`
    (oscore-psk): the gateway core's PskFile, shared, and reloaded on SIGHUP by whoever passed
    it; without it the server loads its own and this block reloads it on SIGHUP."""
    if not enabled:
        yield None
        return
    from ..transport.coap.security import start_role_coap_server
    server = await start_role_coap_server(directory, host, port, rendezvous=rendezvous, gateway=gateway,
                                          security=security, rate_limit=rate_limit,
                                          psk_file=psk_file)
    log.info("CoAP (%s) listening on %s", security, server.url)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    handled = False
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        handled = True
    # oscore-psk with its own copy of psk.json: SIGHUP re-reads it (it is also re-read when it
    # changes); a shared copy is reloaded by the caller (serve_gateway)
    own_psk_file = getattr(server, "psk_file", None) if psk_file is None else None
    try:
        with psk_reload_on_sighup(own_psk_file):
            yield server
    except asyncio.CancelledError:
        pass  # SIGTERM: a clean stop, not an error
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGTERM)
        await server.shutdown()


async def serve_rendezvous(directory: Path, *, port: int | None = None, on_ready=None,
                           coap: bool = False, coap_security: str = "none", coap_rate=None) -> None:
    rv = await build_rendezvous(directory)
    d = Path(directory)
    app = rendezvous_app(rv.service, public_info={"url": rv.config["url"]})
    ctx = server_ssl_context(d / "tls.pem", d / "tls.key")
    host, port = rv.config["host"], port or rv.config["port"]
    try:
        async with coap_alongside(host, port, rendezvous=rv.service, enabled=coap, directory=d,
                                  security=coap_security, rate_limit=coap_rate):
            await serve_forever(app, host, port, ctx, on_ready)
    finally:
        await rv.store.close()


async def serve_gateway(directory: Path, *, port: int | None = None, on_ready=None,
                        reuse_port: bool = False, coap: bool = False, coap_security: str = "none",
                        coap_rate=None) -> None:
    gw = await build_gateway(directory)
    d = Path(directory)
    try:
        from .revocation import RevocationService
        app = gateway_app(gw.service, admin_token=gw.admin_token, est_service=gw.est,
                          trusted_proxies=gw.est.policy.trusted_proxies,
                          revocation=RevocationService(gw.store, gw.service.vault))
        # EST clients authenticate with an IDevID (manufacturer CAs) or an owner-issued
        # certificate; the certificate stays optional for devices onboarding over CBOR.
        ctx = est_server_ssl_context(d / "tls.pem", d / "tls.key",
                                     [await gw.est.owner_ca(), *gw.est.manufacturer_cas])
        host, port = gw.config["host"], port or gw.config["port"]
        # one copy of psk.json for the core (hello/prove/done MACs) and OSCORE-PSK; SIGHUP
        # re-reads it for both, with or without CoAP
        with psk_reload_on_sighup(gw.psk_file):
            async with coap_alongside(host, port, gateway=gw.service, enabled=coap, directory=d,
                                      security=coap_security, rate_limit=coap_rate,
                                      psk_file=gw.psk_file):
                await serve_forever(app, host, port, ctx, on_ready, reuse_port=reuse_port)
    finally:
        await gw.close()


@contextlib.contextmanager
def psk_reload_on_sighup(psk_file):
    """While the block runs, SIGHUP re-reads `psk_file` (DIR/psk.json) at once."""
    if psk_file is None:
        yield
        return
    loop = asyncio.get_running_loop()

    def reload_psks():
        psk_file.reload()
        log.info("SIGHUP: re-read %s", psk_file.path)
    installed = False
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, reload_psks)
        installed = True
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGHUP)


def vault_site(directory: Path, vault) -> tuple[object, object, dict]:
    """(app, TLS context, service.json) of the vault service described in GATEWAY_DIR/vault."""
    svc = read_json(Path(directory) / "vault" / "service.json")
    fp = svc.get("client_spki_sha256")
    app = vault_app(vault, token=Path(svc["token_file"]).read_text().strip(),
                    client_cn=svc["client_cn"], client_fingerprint=bytes.fromhex(fp) if fp else None)
    ctx = vault_server_ssl_context(Path(svc["server_cert"]), Path(svc["server_key"]),
                                   Path(svc["ca_cert"]))
    return app, ctx, svc


async def serve_vault(directory: Path, on_ready=None) -> None:
    """The vault as its own process, on its own store (the gateway's database URL)."""
    d = Path(directory)
    store = await open_store(read_json(d / "config.json")["db"])
    try:
        app, ctx, svc = vault_site(d, LocalVault(d / "vault", store.secrets, store.certs))
        await serve_forever(app, svc["host"], svc["port"], ctx, on_ready)
    finally:
        await store.close()
