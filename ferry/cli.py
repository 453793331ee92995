"""The ``ferry`` command: one front door for pretraining, simulation, deployment and audit.

Errors the user can fix print one line (``ferry: error: ...``) and exit 2; ``--debug`` shows
the traceback. Every option can also come from a TOML file (``--config FILE``, keys spelled
like the options without dashes in front); the command line wins.
"""

from __future__ import annotations

import argparse
import os
import sys

from ferry.commands import audit, backbone, deployment, model, simulation
from ferry.common.errors import FerryError

# The subcommands, in the order `ferry --help` lists them; each module adds its own options
# and handler (ferry.commands).
COMMANDS = (
    backbone.add_pretrain,
    backbone.add_import_backbone,
    simulation.add_bench,
    simulation.add_simulate,
    backbone.add_tune,
    audit.add_audit,
    model.add_export,
    model.add_predict,
    deployment.add_certs,
    deployment.add_server,
    deployment.add_client,
)


class _Parser(argparse.ArgumentParser):
    """argparse with Ferry's error format: one line, ``ferry: error: ...``, exit 2."""

    def error(self, message: str):
        print(f"ferry: error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ferry", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FerryError as exc:
        if args.debug:
            raise
        print(f"ferry: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ferry: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
