"""`zerotouch bench led`: argument parsing only (the work is bench.led_bench)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def cmd_bench_led(args) -> int:
    from ..bench.led_bench import HEADER, format_cell, run_led_bench
    print(f"LED decoder, {args.trials} seeded round trips per cell (seed {args.seed}); "
          "clock drift is always tracked")
    print(HEADER)
    result = run_led_bench(trials=args.trials, drifts=args.drift, noises=args.noise, seed=args.seed,
                           track_drift=args.track_drift,
                           on_cell=lambda c: print(format_cell(c), flush=True))
    if args.json:
        print(json.dumps(asdict(result)))
    return 0


def add_bench_led_parser(bench_subparsers) -> argparse.ArgumentParser:
    from ..bench.led_bench import DEFAULT_DRIFTS, DEFAULT_NOISES
    p = bench_subparsers.add_parser("led", help="LED decoder failure rate per clock drift and noise")
    p.add_argument("--trials", type=int, default=400, help="round trips per drift/noise cell")
    p.add_argument("--drift", type=_floats, default=DEFAULT_DRIFTS,
                   help="LED clock error vs. camera, comma-separated (default %(default)s)")
    p.add_argument("--noise", type=_floats, default=DEFAULT_NOISES,
                   help="camera noise std in units of the LED swing (default %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--track-drift", action="store_true",
                   help="no-op, kept for old scripts: the decoder always tracks clock drift")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_led)
    return p
