"""``ferry audit``: verify a run's privacy ledger and replay it with an independent accountant."""

from __future__ import annotations

import argparse

# The handlers import the layer they drive only when they run: importing it pulls in torch
# (seconds), and `ferry --help` or a refused option must stay fast.


def add_audit(sub) -> None:
    p = sub.add_parser(
        "audit", help="verify a run's privacy ledger and replay it with an independent accountant"
    )
    p.add_argument("path", help="run directory holding ledger.jsonl, or the ledger file")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--no-plot", action="store_true", help="skip the ε-per-round plot")
    p.add_argument(
        "--keys",
        action="append",
        metavar="DIR_OR_FILE",
        help="institutions' public keys: a directory of NAME.pub files (`ferry certs`), a "
        "client state root, or one .pub file; repeatable (default: a simulation's own keys, "
        "in RUN/clients)",
    )
    p.add_argument(
        "--receipts",
        nargs="+",
        metavar="STATE_DIR",
        help="institutions' state directories (or their root): cross-check their receipt "
        "chains with the ledger",
    )
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from ferry.server.audit import run_audit

    return run_audit(
        args.path,
        as_json=args.json,
        plot=not args.no_plot,
        keys=args.keys,
        receipts=args.receipts,
    )
