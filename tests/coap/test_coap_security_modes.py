"""`--coap-security none|edhoc|oscore-psk`: role keys made at init, pins in public.json /
config.json / factory.json, and the device transport each mode builds."""
from __future__ import annotations

import json
import os

import pytest

from zerotouch.cli.main import build_parser
from zerotouch.transport.coap.security import (DEFAULT_MODE, device_coap_transport, edhoc_fingerprint,
                                               load_psk_store, start_role_coap_server)


def test_cli_defaults_to_edhoc_everywhere():
    p = build_parser()
    assert DEFAULT_MODE == "edhoc"
    assert p.parse_args(["rendezvous", "serve", "--dir", "r", "--coap"]).coap_security == "edhoc"
    assert p.parse_args(["gateway", "serve", "--dir", "g", "--coap"]).coap_security == "edhoc"
    assert p.parse_args(["agent", "run", "--device-dir", "d", "--transport", "coap"]).coap_security == "edhoc"
    assert p.parse_args(["demo", "--transport", "coap"]).coap_security == "edhoc"
    args = p.parse_args(["gateway", "serve", "--dir", "g", "--coap", "--coap-security", "oscore-psk",
                         "--coap-rate", "5"])
    assert args.coap_security == "oscore-psk" and args.coap_rate == 5
    with pytest.raises(SystemExit):
        p.parse_args(["agent", "run", "--device-dir", "d", "--coap-security", "dtls"])


def test_init_makes_edhoc_keys_and_the_factory_pins_the_rendezvous(tmp_path):
    from zerotouch.services.manufacturer import Manufacturer, read_factory
    from zerotouch.services.roles import init_gateway, init_rendezvous
    m = Manufacturer(tmp_path / "factory", name="t")
    ca = str(tmp_path / "factory" / "manufacturer-ca.pem")
    info = init_rendezvous(tmp_path / "rv", host="127.0.0.1", port=8443, manufacturer_cas=[ca])
    gw = init_gateway(tmp_path / "gw", host="127.0.0.1", port=8444, manufacturer_cas=[ca])
    assert oct((tmp_path / "rv" / "edhoc.key").stat().st_mode & 0o777) == "0o600"
    assert info.edhoc_fingerprint == edhoc_fingerprint(tmp_path / "rv")
    assert json.loads((tmp_path / "rv" / "public.json").read_text())["edhoc_fingerprint"] == info.edhoc_fingerprint
    assert gw["edhoc_fingerprint"] == edhoc_fingerprint(tmp_path / "gw") != info.edhoc_fingerprint
    # a second init keeps the key (devices already pin it)
    again = init_rendezvous(tmp_path / "rv", host="127.0.0.1", port=8443, manufacturer_cas=[ca])
    assert again.edhoc_fingerprint == info.edhoc_fingerprint
    dev = m.make_device(tmp_path / "factory", info)
    factory = read_factory(dev.device_dir)
    assert factory["rendezvous_edhoc_fp"] == info.edhoc_fingerprint

    pytest.importorskip("lakers")
    t = device_coap_transport(factory, security="edhoc", device_dir=dev.device_dir)
    assert t._edhoc_pins == {"coap://127.0.0.1:8443": bytes.fromhex(info.edhoc_fingerprint)}
    del factory["rendezvous_edhoc_fp"]
    with pytest.raises(ValueError, match="rendezvous EDHOC pin"):
        device_coap_transport(factory, security="edhoc", device_dir=dev.device_dir)
    with pytest.raises(ValueError, match="psk.secret"):
        device_coap_transport(factory, security="oscore-psk", device_dir=dev.device_dir)


def test_psk_device_resumes_sequence_numbers_ahead(tmp_path):
    pytest.importorskip("aiocoap.oscore_sitewrapper")
    (tmp_path / "psk.secret").write_text(os.urandom(32).hex())
    (tmp_path / "oscore-seq.json").write_text(json.dumps({"gateway": 10}))
    t = device_coap_transport({"serial": "0a000001"}, security="oscore-psk", device_dir=tmp_path)
    assert t.sequence_numbers == {"gateway": 10 + 64}   # only the gateway leg is protected


def test_gateway_psk_store_from_devices_and_boxes(tmp_path):
    pytest.importorskip("aiocoap.oscore_sitewrapper")
    from zerotouch.services.bulk import derive_psk
    master = bytes(range(16))
    (tmp_path / "psk.json").write_text(json.dumps({
        "devices": {"0b000001": "11" * 32},
        "boxes": [{"master": master.hex(), "first": "0a000000", "last": "0a00000f"}]}))
    store = load_psk_store(tmp_path)
    assert store._lookup("0b000001") == bytes.fromhex("11" * 32)
    assert store._lookup("0a000003") == derive_psk(master, "0a000003")
    assert store._lookup("0c000000") is None


async def test_rendezvous_refuses_psk_mode(tmp_path):
    with pytest.raises(ValueError, match="no device PSKs"):
        await start_role_coap_server(tmp_path, "127.0.0.1", 0, rendezvous=object(), security="oscore-psk")
