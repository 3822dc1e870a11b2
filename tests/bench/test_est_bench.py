"""The EST benchmark command works end to end (figures are printed, never asserted)."""
from __future__ import annotations

from zerotouch.bench.est_bench import run_est_bench
from zerotouch.bench.loadgen import find_tool
from support import need


def test_est_bench_issues_a_recorded_certificate_per_request():
    for tool, pkg in (("wrk", "wrk"), ("nginx", "nginx-light")):
        if find_tool(tool) is None:
            need(tool, f"apt-get install {pkg}")
    r = run_est_bench(seconds=1, connections=4, processes=1)
    assert r.est_requests > 0 and r.est_non_2xx == 0
    # every answered request issued a certificate that revocation can find
    assert r.certificates_recorded >= r.est_requests
    assert r.nginx_rps > 0 and r.ratio > 0 and r.proxied_rps > 0
