"""A real vault_app on a real TLS socket, with certificates from the owner CA (for vault tests)."""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from zerotouch.pki.keys import cert_pem, generate_p256, save_cert, save_private_key, spki_fingerprint
from zerotouch.services.vault import load_owner_ca
from zerotouch.services.vault_remote import RemoteVault
from zerotouch.transport.http.server import start_site
from zerotouch.transport.http.vault_app import GATEWAY_CN, vault_app, vault_server_ssl_context
from zerotouch.util.net import free_port


@dataclass
class VaultServer:
    url: str
    runner: object
    ca_pem: str
    client_cert: Path
    client_key: Path
    token: str
    peers: list = field(default_factory=list)     # (host, port) of the client of each request
    clients: list = field(default_factory=list)

    def client(self, **overrides) -> RemoteVault:
        args = dict(ca_pem=self.ca_pem, client_cert=self.client_cert, client_key=self.client_key,
                    token=self.token) | overrides
        rv = RemoteVault(self.url, **args)
        self.clients.append(rv)
        return rv

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        await self.runner.cleanup()


def issue_pair(ca, directory: Path, name: str, *, cn: str, hosts: list[str]) -> tuple[Path, Path]:
    key = generate_p256()
    cert = ca.issue_server(key.public_key(), common_name=cn, hosts=hosts)
    save_private_key(directory / f"{name}.key", key)
    save_cert(directory / f"{name}.pem", cert)
    return directory / f"{name}.pem", directory / f"{name}.key"


async def start_vault_server(vault, vault_dir: Path, workdir: Path) -> VaultServer:
    """Serve `vault` on 127.0.0.1:<free port>; the client side gets a CN=zt-gateway cert."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca = load_owner_ca(vault_dir)
    server_cert, server_key = issue_pair(ca, workdir, "server", cn="127.0.0.1",
                                         hosts=["127.0.0.1", "localhost"])
    client_cert, client_key = issue_pair(ca, workdir, "client", cn=GATEWAY_CN, hosts=[GATEWAY_CN])
    (workdir / "owner-ca.pem").write_bytes(cert_pem(ca.cert))
    from cryptography import x509
    fp = spki_fingerprint(x509.load_pem_x509_certificate(client_cert.read_bytes()).public_key())
    token = secrets.token_urlsafe(32)
    app = vault_app(vault, token=token, client_fingerprint=fp)
    ctx = vault_server_ssl_context(server_cert, server_key, workdir / "owner-ca.pem")
    peers: list = []

    @web.middleware
    async def record_peer(request, handler):   # to see whether connections are kept alive
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return await handler(request)

    app.middlewares.append(record_peer)
    port = free_port()
    runner = await start_site(app, "127.0.0.1", port, ctx)
    return VaultServer(f"https://127.0.0.1:{port}", runner, cert_pem(ca.cert).decode(),
                       client_cert, client_key, token, peers)
