"""``ferry certs``, ``ferry server`` and ``ferry client``: a real federation's keys, its
SuperLink (the operator's side) and one institution's SuperNode (next to its data)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The handlers import the layer they drive only when they run: importing it pulls in torch
# (seconds), and `ferry --help` or a refused option must stay fast.


def add_certs(sub) -> None:
    p = sub.add_parser(
        "certs", help="make a federation's CA, server certificate and institutions' keys"
    )
    p.add_argument("--out", default="certs", help="output directory (default: certs)")
    p.add_argument(
        "--ca-dir",
        help="where the CA's private key ca.key is written (or found): keep it apart from the "
        "server's files, offline (default: OUT-ca beside OUT)",
    )
    p.add_argument(
        "--host",
        action="append",
        help="server hostname or IP for the certificate (repeat; 127.0.0.1, localhost added)",
    )
    p.add_argument(
        "--institution", action="append", help="make a SuperNode key pair for NAME (repeat)"
    )
    p.add_argument("--federation", default="ferry", help="name in the CA certificate")
    p.add_argument("--days", type=int, default=365, help="certificate validity in days")
    p.add_argument(
        "--keys-only",
        action="store_true",
        help="only institution key pairs (an institution making its own; send the .pub)",
    )
    p.set_defaults(func=cmd_certs)


def cmd_certs(args: argparse.Namespace) -> int:
    from ferry.server.certs import make_certs

    report = make_certs(
        args.out,
        hosts=args.host,
        institutions=args.institution,
        federation=args.federation,
        days=args.days,
        keys_only=args.keys_only,
        ca_dir=args.ca_dir,
    )
    for warning in report.warnings:
        print(warning, file=sys.stderr)
    for path in report.created:
        secret = path.suffix == ".key"
        print(f"created {path}{'  (secret: mode 0600)' if secret else ''}")
    for path in report.kept:
        print(f"kept    {path}  (exists; not overwritten)")
    return 0


def add_server(sub) -> None:
    p = sub.add_parser("server", help="run the federation's SuperLink and the Ferry run")
    p.add_argument("--config", required=True, help="server.toml ([server], [institutions], [run])")
    p.add_argument(
        "--insecure", action="store_true", help="no TLS, no node authentication: local trials only"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run after its checkpoint")
    p.set_defaults(func=cmd_server)


def cmd_server(args: argparse.Namespace) -> int:
    from ferry.server.server_settings import load_server_config
    from ferry.server.superlink import run_server

    settings = load_server_config(args.config, insecure=args.insecure, resume=args.resume)
    return run_server(settings)


def add_client(sub) -> None:
    p = sub.add_parser("client", help="run one institution's SuperNode next to its data")
    p.add_argument("--server", required=True, help="the federation's SuperLink, HOST:PORT")
    p.add_argument("--root-cert", help="the federation's CA certificate (ca.pem)")
    p.add_argument("--key", help="this institution's private key (INSTITUTION.key)")
    p.add_argument("--data", required=True, help="image folder, one subfolder per class")
    p.add_argument("--state-dir", required=True, help="privacy spend, backbone and feature cache")
    p.add_argument("--cache-dir", help="backbone and feature cache (default: STATE_DIR/cache)")
    p.add_argument("--budget-epsilon", type=float, required=True, help="this institution's ε")
    p.add_argument("--budget-delta", type=float, required=True, help="this institution's δ")
    p.add_argument("--institution", required=True, help="this institution's name")
    p.add_argument(
        "--runtime-port", type=int, default=9094, help="local port of the SuperNode's runtime API"
    )
    p.add_argument("--insecure", action="store_true", help="no TLS: local trials only")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="share of records held out for evaluation (default 0.2), pinned with a secret "
        "salt in --state-dir on first start: the server cannot move records into it",
    )
    p.add_argument(
        "--classes",
        help="this institution's class list, e.g. no,yes (label order), pinned in --state-dir: "
        "a run must list the same classes (default: pinned by the first run that reads the data)",
    )
    p.add_argument(
        "--test-from",
        help="price series: the held-out cutoff date, pinned in --state-dir: a run must give the "
        "same (default: pinned by the first run that reads the data)",
    )
    p.set_defaults(func=cmd_client)


def cmd_client(args: argparse.Namespace) -> int:
    from ferry.client.supernode import InstitutionSettings, run_client

    def path(value: str | None) -> Path | None:
        return Path(value).expanduser().absolute() if value else None

    return run_client(
        InstitutionSettings(
            server=args.server,
            data=path(args.data),
            state_dir=path(args.state_dir),
            institution=args.institution,
            budget_epsilon=args.budget_epsilon,
            budget_delta=args.budget_delta,
            root_cert=path(args.root_cert),
            key=path(args.key),
            cache_dir=path(args.cache_dir),
            runtime_port=args.runtime_port,
            insecure=args.insecure,
            test_fraction=args.test_fraction,
            classes=args.classes or "",
            test_from=args.test_from or "",
        )
    )
