"""``ferry simulate`` and ``ferry bench``: federations of virtual institutions on one machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from ferry.commands.run_options import add_run_options, run_config
from ferry.common.errors import FerryError

# The handlers import the layer they drive only when they run: importing it pulls in torch
# (seconds), and `ferry --help` or a refused option must stay fast.


def add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="simulate a federation of virtual institutions")
    p.add_argument("--config", help="TOML file with any of the options below")
    p.add_argument(
        "--baseline",
        default="",
        metavar="local",
        help="local: after the run, train each institution alone at the same ε and δ and "
        "report its accuracy beside the federated model's, on its own held-out split",
    )
    p.add_argument(
        "--log-to",
        default="",
        metavar="tensorboard:DIR",
        help="also log every round's metrics and ε to TensorBoard event files in DIR",
    )
    add_run_options(p)
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    import logging

    from ferry.simulations.runner import simulate

    log = logging.getLogger("ferry").info
    simulate(run_config(args), log=log, baseline=args.baseline, log_to=args.log_to)
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure Ferry against its baselines (BENCHMARKS.md)")
    p.add_argument("--quick", action="store_true", help="small sizes, a few minutes (CI)")
    p.add_argument("--out", default=".", help="directory for BENCHMARKS.md and .json")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from ferry.simulations.bench.suite import run_bench

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FerryError(f"--out {out} cannot be a directory ({exc.strerror})") from None
    run_bench(args.quick, out / "BENCHMARKS.md", out / "BENCHMARKS.json")
    return 0
