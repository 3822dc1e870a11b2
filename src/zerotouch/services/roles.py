"""Composition roots: each role's directory, its one-time set-up, and its running service.

rendezvous dir: rendezvous.key (signing, 0600), tls-ca.pem/.key, tls.pem/.key, config.json,
                public.json (what the manufacturer gives devices: URL, key pin, TLS CA)
gateway dir:    vault/ (owner key encrypted, owner CA, vault key), tls.pem/.key (from the
                owner CA), admin.token (0600), config.json, terminus/ (Mosquitto config)
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from ..pki.ca import CertificateAuthority, make_root
from ..pki.keys import (cert_pem, generate_p256, load_cert, load_private_key, public_key_pem,
                        save_cert, save_private_key)
from ..protocol.cose import SoftwareSigner
from ..storage import open_store
from ..util.files import atomic_write, atomic_write_json, read_json
from .est import EstPolicy, EstService
from .gateway import GatewayConfig, GatewayService
from .manufacturer import RendezvousInfo
from .rendezvous import RendezvousConfig, RendezvousService
from .vault import LocalVault, init_vault_dir, load_owner_ca


def _url(host: str, port: int, scheme: str = "https") -> str:
    h = f"[{host}]" if ":" in host else host
    return f"{scheme}://{h}:{port}"


def _read_pems(paths: list[str]) -> list[x509.Certificate]:
    out = []
    for p in paths:
        out.extend(x509.load_pem_x509_certificates(Path(p).read_bytes()))
    return out


def _edhoc_fingerprint(directory: Path) -> str:
    from ..transport.coap.security import edhoc_fingerprint  # the CoAP/EDHOC key, made once
    return edhoc_fingerprint(directory)


def default_db(directory: Path) -> str:
    return f"sqlite:///{Path(directory).resolve()}/state.db"


# --- rendezvous -------------------------------------------------------------------------------
def init_rendezvous(directory: Path, *, host: str, port: int, manufacturer_cas: list[str],
                    db: str | None = None, public_host: str | None = None) -> RendezvousInfo:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    url = _url(public_host or host, port)
    if not (d / "rendezvous.key").exists():
        save_private_key(d / "rendezvous.key", generate_p256())
        tls_ca_key = generate_p256()
        tls_ca = make_root(tls_ca_key, "zerotouch rendezvous TLS CA")
        save_private_key(d / "tls-ca.key", tls_ca_key)
        save_cert(d / "tls-ca.pem", tls_ca)
        key = generate_p256()
        cert = CertificateAuthority(tls_ca_key, tls_ca).issue_server(
            key.public_key(), common_name=public_host or host,
            hosts=sorted({public_host or host, host, "localhost"}))
        save_private_key(d / "tls.key", key)
        save_cert(d / "tls.pem", cert)
    atomic_write_json(d / "config.json", {
        "host": host, "port": port, "url": url, "db": db or default_db(d),
        "manufacturer_cas": [str(Path(p).resolve()) for p in manufacturer_cas]})
    signing = load_private_key(d / "rendezvous.key")
    info = RendezvousInfo(url=url, key_pem=public_key_pem(signing.public_key()).decode(),
                          tls_ca_pem=(d / "tls-ca.pem").read_text(),
                          edhoc_fingerprint=_edhoc_fingerprint(d))
    info.save(d / "public.json")
    return info


@dataclass
class RunningRendezvous:
    service: RendezvousService
    store: object
    config: dict
    directory: Path


async def build_rendezvous(directory: Path) -> RunningRendezvous:
    d = Path(directory)
    cfg = read_json(d / "config.json")
    store = await open_store(cfg["db"])
    from .rendezvous_psk import RvPskKeys, load_at_rest_key
    service = RendezvousService(store.rendezvous, SoftwareSigner(load_private_key(d / "rendezvous.key")),
                                RendezvousConfig(manufacturer_cas=_read_pems(cfg["manufacturer_cas"])),
                                # PSK devices: K_rv encrypted at rest (DIR/psk-at-rest.key)
                                psk_keys=RvPskKeys(store.secrets, load_at_rest_key(d)))
    return RunningRendezvous(service, store, cfg, d)


# --- owner gateway ----------------------------------------------------------------------------
def init_gateway(directory: Path, *, host: str, port: int, manufacturer_cas: list[str],
                 terminus_host: str = "127.0.0.1", terminus_port: int = 8883,
                 rendezvous_info: str | None = None, db: str | None = None,
                 public_host: str | None = None, owner_name: str = "zerotouch owner",
                 bundle_settings: dict | None = None, terminus_psk_port: int | None = None) -> dict:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    init_vault_dir(d / "vault", owner_name=owner_name)
    ca = load_owner_ca(d / "vault")
    if not (d / "tls.pem").exists():
        key = generate_p256()
        cert = ca.issue_server(key.public_key(), common_name=public_host or host,
                               hosts=sorted({public_host or host, host, "localhost"}))
        save_private_key(d / "tls.key", key)
        save_cert(d / "tls.pem", cert)
    if not (d / "admin.token").exists():
        atomic_write(d / "admin.token", secrets.token_urlsafe(32).encode(), mode=0o600)
    rv = RendezvousInfo.load(Path(rendezvous_info)) if rendezvous_info else None
    cfg = {"host": host, "port": port, "url": _url(public_host or host, port),
           "db": db or default_db(d),
           "manufacturer_cas": [str(Path(p).resolve()) for p in manufacturer_cas],
           "terminus_host": terminus_host, "terminus_port": terminus_port,
           "rendezvous_url": rv.url if rv else None, "rendezvous_tls_ca_pem": rv.tls_ca_pem if rv else None,
           "owner_fingerprint": LocalVault.fingerprint_of(ca),
           "edhoc_fingerprint": _edhoc_fingerprint(d)}
    if bundle_settings is not None:
        cfg["bundle_settings"] = bundle_settings
    if terminus_psk_port is not None:   # the terminus' TLS-PSK listener (PSK-profile devices)
        cfg["terminus_psk_port"] = terminus_psk_port
    if (d / "config.json").exists():
        # Re-running init updates what it sets and keeps the rest (e.g. a separate vault's URL).
        cfg = {**read_json(d / "config.json"), **cfg}
    atomic_write_json(d / "config.json", cfg)
    return cfg


def owner_ca(directory: Path) -> CertificateAuthority:
    return load_owner_ca(Path(directory) / "vault")


def init_vault_service(gateway_dir: Path, *, host: str = "127.0.0.1", port: int) -> dict:
    """Make the vault a separate service: TLS server cert, gateway client cert, shared token.

    Writes GATEWAY_DIR/vault/service.json and sets `vault_url` in config.json, after which
    build_gateway talks to `vault serve` instead of opening the vault in-process. Keys and
    token are kept on a re-run; the server certificate is re-issued (the host may change).
    """
    from ..pki.keys import spki_fingerprint
    from ..transport.http.vault_app import GATEWAY_CN
    d = Path(gateway_dir)
    v = d / "vault"
    ca = load_owner_ca(v)  # after init_gateway: the owner CA vouches for both ends
    key_file = v / "vault-tls.key"
    key = load_private_key(key_file) if key_file.exists() else generate_p256()
    save_private_key(key_file, key)
    save_cert(v / "vault-tls.pem", ca.issue_server(key.public_key(), common_name=host,
                                                   hosts=sorted({host, "localhost"})))
    if not (v / "gateway-client.key").exists():
        ckey = generate_p256()
        save_private_key(v / "gateway-client.key", ckey)
        save_cert(v / "gateway-client.pem", ca.issue_server(ckey.public_key(), common_name=GATEWAY_CN,
                                                            hosts=[GATEWAY_CN]))
    if not (v / "service.token").exists():
        atomic_write(v / "service.token", secrets.token_urlsafe(32).encode(), mode=0o600)
    client = load_cert(v / "gateway-client.pem")
    svc = {"url": _url(host, port), "host": host, "port": port,
           "ca_cert": str((v / "owner-ca.pem").resolve()),
           "server_cert": str((v / "vault-tls.pem").resolve()),
           "server_key": str(key_file.resolve()),
           "client_cert": str((v / "gateway-client.pem").resolve()),
           "client_key": str((v / "gateway-client.key").resolve()),
           "client_cn": GATEWAY_CN,
           # the vault accepts this one key, not any owner-CA cert that says CN=zt-gateway
           "client_spki_sha256": spki_fingerprint(client.public_key()).hex(),
           "token_file": str((v / "service.token").resolve())}
    atomic_write_json(v / "service.json", svc, mode=0o600)
    cfg = read_json(d / "config.json")
    cfg["vault_url"] = svc["url"]
    atomic_write_json(d / "config.json", cfg)
    return svc


@dataclass
class RunningGateway:
    service: GatewayService
    store: object
    config: dict
    directory: Path
    reporter: object = None
    remote_vault: object = None  # a RemoteVault build_gateway opened (and so closes)
    est: EstService | None = None
    psk_file: object = None      # transport.coap.security.PskFile: DIR/psk.json, the core's copy

    async def close(self) -> None:
        if self.reporter is not None:
            await self.reporter.close()
        if self.remote_vault is not None:
            await self.remote_vault.close()
        await self.store.close()

    @property
    def admin_token(self) -> str:
        return (self.directory / "admin.token").read_text().strip()


def _psk_file(directory: Path):
    """PSK-profile devices' keys: `DIR/psk.json` (a PskFile, followed as it changes), or None."""
    try:
        from ..transport.coap.security import PskFile
    except ImportError:   # no aiocoap: no CoAP, and so no PSK devices
        return None
    return PskFile(directory)


async def build_gateway(directory: Path, *, vault=None) -> RunningGateway:
    d = Path(directory)
    cfg = read_json(d / "config.json")
    store = await open_store(cfg["db"])
    remote = None
    if vault is None and cfg.get("vault_url"):
        # The vault runs as its own service (`vault serve`); the gateway then needs no vault key.
        from .vault_remote import RemoteVault
        vault = remote = RemoteVault.from_gateway_dir(d, cfg["vault_url"])
    vault = vault or LocalVault(d / "vault", store.secrets, store.certs)
    notifier = None
    if cfg.get("rendezvous_url"):
        from ..transport.http.client import RendezvousReporter
        notifier = RendezvousReporter(cfg["rendezvous_url"], cfg.get("rendezvous_tls_ca_pem"))
    cas = _read_pems(cfg["manufacturer_cas"])
    gcfg = GatewayConfig(manufacturer_cas=cas, terminus_host=cfg["terminus_host"],
                         terminus_port=cfg["terminus_port"])
    # What the owner tells its devices in the signed bundle (e.g. est_operational).
    gcfg.settings.update(cfg.get("bundle_settings", {}))
    gcfg.admission = cfg.get("admission", "introduced")
    gcfg.terminus_psk_port = cfg.get("terminus_psk_port")
    from .gateway_inventory import rendezvous_status_client
    query = (rendezvous_status_client(cfg["rendezvous_url"], cfg.get("rendezvous_tls_ca_pem"))
             if cfg.get("rendezvous_url") else None)
    from .attestation import TpmAttestation
    # TPM maker roots and PCR policies from the gateway dir (zerotouch tpm trust / policy install)
    psk_file = _psk_file(d)
    service = GatewayService(store, vault, gcfg, notify_rendezvous=notifier, query_rendezvous=query,
                             tpm=TpmAttestation.load(d),
                             psk_lookup=psk_file.psk_for if psk_file is not None else None)
    # EST on the same store and vault; config.json "est" holds its policy (docs/est.md).
    est = EstService(store, vault, EstPolicy.from_config(cfg.get("est")), manufacturer_cas=cas)
    return RunningGateway(service, store, cfg, d, notifier, remote, est, psk_file)


__all__ = ["init_rendezvous", "build_rendezvous", "init_gateway", "build_gateway", "owner_ca",
           "init_vault_service",
           "cert_pem", "load_cert"]
