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
    p.add_argument(
        "--institution",
        default="",
        metavar="NAME",
        help="with --report: the institution whose privacy report to write",
    )
    p.add_argument(
        "--report",
        default="",
        metavar="FILE",
        help="write the institution's privacy report for its DPO (.html or .md): every round "
        "it trained, its ε against its budget, what was released outside ε, the verdict",
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
        institution=args.institution,
        institution_report=args.report,
    )


def add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="(re)draw a run's report.html from its files: curves, institutions, privacy"
    )
    p.add_argument("run", help="run directory (holding summary.json and metrics.jsonl)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ferry.common.errors import FerryError
    from ferry.server.run_report import write_report

    run = Path(args.run)
    if not (run / "summary.json").is_file():
        raise FerryError(
            f"{run} holds no summary.json: give the directory of a finished run (its --out)"
        )
    print(f"report: {write_report(run)}")
    return 0
