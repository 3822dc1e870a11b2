"""`zerotouch box ...` argument parsing (wired into `zerotouch` by cli/main.py)."""
from __future__ import annotations

import argparse

from zerotouch.cli.box import add_box_parser
from zerotouch.pki.keys import generate_p256, public_key_pem
from zerotouch.services.bulk import parse_box_label
from zerotouch.services.manufacturer import RendezvousInfo


def _run(argv) -> int:
    p = argparse.ArgumentParser(prog="zerotouch")
    add_box_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_box_make_prints_one_box_label(tmp_path, capsys):
    info = tmp_path / "public.json"
    RendezvousInfo(url="https://rv.example:8443",
                   key_pem=public_key_pem(generate_p256().public_key()).decode(),
                   tls_ca_pem="").save(info)
    assert _run(["box", "make", "--dir", str(tmp_path / "f"), "--rendezvous-info", str(info),
                 "--count", "3", "--no-register"]) == 0
    url = capsys.readouterr().out.strip().splitlines()[-1]
    box = parse_box_label(url)
    assert box.count == 3 and box.rendezvous == "https://rv.example:8443"
    assert sorted(p.name for p in (tmp_path / "f" / "devices").iterdir()) == box.devids()
    labels = sorted(p.name for p in (tmp_path / "f" / "labels").iterdir())
    assert [n for n in labels if n.startswith("box-")] == [
        f"box-{box.first}-{box.last}.{e}" for e in ("png", "svg", "txt")]


def test_box_make_refuses_bad_count_and_claim_needs_an_owner(tmp_path, capsys):
    assert _run(["box", "make", "--dir", str(tmp_path), "--rendezvous-info", "x.json",
                 "--count", "10001"]) == 2
    assert _run(["box", "claim", "https://rv.example/.well-known/tte/box?master=00&first=00000001"
                 "&last=00000002"]) == 2
    assert "--gateway-dir" in capsys.readouterr().err
