"""One-shot operations behind CLI commands (inventory, status, manufacture, terminus)."""
from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..protocol.errors import ProtocolError
from ..util.files import read_json
from .manufacturer import Manufacturer, RendezvousInfo
from .roles import build_gateway, build_rendezvous, owner_ca

console = Console(stderr=True)


async def register_devices(rendezvous: RendezvousInfo, registrations: list[bytes], *,
                           concurrency: int = 16) -> list[tuple[int, bytes]]:
    """POST each signed registration to the rendezvous over HTTPS."""
    import aiohttp

    from ..transport.http.client import post_cbor
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:
        async def one(reg: bytes):
            async with sem:
                return await post_cbor(f"{rendezvous.url}/rv/v1/devices", reg,
                                       ca_pem=rendezvous.tls_ca_pem, session=session)
        return await asyncio.gather(*(one(r) for r in registrations))


def manufacturer_init(directory: Path, name: str = "zerotouch manufacturer") -> str:
    factory = Manufacturer(directory, name=name)
    return f"manufacturer CA: {factory.dir / 'manufacturer-ca.pem'}"


async def manufacture(directory: Path, rendezvous_info: Path, *, count: int, identity: str,
                      register: bool, factory_est: str | None = None,
                      station: Path | None = None, tcti: str | None = None,
                      model: str | None = None) -> int:
    if identity == "tpm" and count != 1:
        console.print("[red]--identity tpm makes one device per TPM: use --count 1 and one --tcti each")
        return 2
    info = RendezvousInfo.load(rendezvous_info)
    factory = Manufacturer(directory)
    via = None
    if factory_est:
        # IDevIDs from the factory's EST service, the station authenticating with its credential;
        # only each device's CSR leaves its directory.
        from .factory_est import idevid_via_est
        st = Path(station)
        via = idevid_via_est(factory_est, station_cert=st / "station.pem", station_key=st / "station.key",
                             ca_pem=(st / "manufacturer-ca.pem").read_text())
    made = [factory.make_device(directory, info, identity=identity, idevid_via=via, tcti=tcti,
                                model=model) for _ in range(count)]
    failed = 0
    if register:
        for dev, (status, body) in zip(made, await register_devices(info, [d.registration for d in made])):
            if status != 201:
                failed += 1
                console.print(f"[red]{dev.serial}: rendezvous refused registration ({status}): {body[:200]!r}")
    for dev in made:
        print(f"{dev.serial}  {dev.label.url}  {dev.device_dir}")
    return 1 if failed else 0


async def rendezvous_status(directory: Path, serial: str | None) -> int:
    rv = await build_rendezvous(directory)
    try:
        if serial:
            rec = await rv.store.rendezvous.get(serial)
            if rec is None:
                console.print(f"no device {serial}")
                return 1
            print(json.dumps({"serial": rec.serial, "urn": rec.urn, "status": rec.status.value,
                              "gateway_url": rec.gateway_url,
                              "owner_fp": rec.owner_fp.hex() if rec.owner_fp else None}, indent=2))
        else:
            print(json.dumps(await rv.store.rendezvous.count_by_status(), indent=2))
    finally:
        await rv.store.close()
    return 0


async def rendezvous_revoke(directory: Path, serial: str) -> int:
    rv = await build_rendezvous(directory)
    try:
        rec = await rv.service.revoke(serial)
        print(f"{rec.serial}: {rec.status.value}")
        return 0
    except ProtocolError as exc:
        console.print(f"[red]refused:[/red] {exc.message}")
        return 1
    finally:
        await rv.store.close()


async def gateway_register(directory: Path, label_url: str | None, csv_path: Path | None,
                           description: str) -> int:
    gw = await build_gateway(directory)
    try:
        if csv_path:
            recs = await gw.service.register_csv(Path(csv_path).read_text())
        elif label_url:
            recs = [await gw.service.register_label(label_url, description)]
        else:
            console.print("give a label URL or --csv FILE")
            return 2
        for r in recs:
            print(f"added {r.serial} ({r.description or 'no description'})")
        return 0
    except ProtocolError as exc:
        console.print(f"[red]refused:[/red] {exc.message}")
        return 1
    finally:
        await gw.store.close()


async def gateway_inventory(directory: Path, as_json: bool) -> int:
    gw = await build_gateway(directory)
    try:
        recs = await gw.store.inventory.list(limit=100_000)
    finally:
        await gw.store.close()
    if as_json:
        print(json.dumps([{"serial": r.serial, "state": r.state.value, "description": r.description,
                           "last_error": r.last_error, "attestation": r.attestation}
                          for r in recs], indent=2))
        return 0
    table = Table(title="inventory")
    for col in ("serial", "state", "description", "attestation", "last error"):
        table.add_column(col)
    for r in recs:
        table.add_row(r.serial, r.state.value, r.description, r.attestation or "", r.last_error or "")
    Console().print(table)
    return 0


def _psk_source(gw):
    from .terminus import terminus_psk_keys
    if not hasattr(gw.service.vault, "channel_secret"):
        raise SystemExit("the TLS-PSK listener needs the vault in this process (a remote vault "
                         "does not hand out channel secrets)")
    return lambda: terminus_psk_keys(gw.store, gw.service.vault)


async def terminus_serve(gateway_dir: Path, directory: Path | None, *,
                         crl_interval: float = 10.0) -> int:
    """Mosquitto for the gateway's devices, refusing revoked ones: every `crl_interval` seconds
    the CRL is rebuilt from the gateway's database (any replica's revocations) and, when it
    changed, written to the terminus crlfile and reloaded (see services.terminus_crl)."""
    from .revocation import RevocationService
    from .terminus import find_mosquitto
    from .terminus_crl import run_terminus_with_crl
    if find_mosquitto() is None:
        console.print("[red]Mosquitto is not installed: apt-get install mosquitto")
        return 1
    cfg = read_json(Path(gateway_dir) / "config.json")
    # SIGTERM stops Mosquitto too; by default it would kill only us and orphan the broker
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    gw = await build_gateway(gateway_dir)
    try:
        crls = RevocationService(gw.store, gw.service.vault)
        await run_terminus_with_crl(
            directory or Path(gateway_dir) / "terminus", ca=owner_ca(gateway_dir),
            host=cfg["terminus_host"], port=cfg["terminus_port"], source=crls.current_crl,
            interval=crl_interval, stop=stop,
            # PSK-profile devices: TLS-PSK listener, keys from the channel secrets in the vault
            psk_port=cfg.get("terminus_psk_port"),
            psk_source=_psk_source(gw) if cfg.get("terminus_psk_port") else None,
            on_ready=lambda term: print(f"terminus listening on {term.url}"
                                        + (f" and TLS-PSK on port {term.files.psk_port}"
                                           if term.files.psk_port else ""), flush=True))
    finally:
        await gw.close()
    return 0
