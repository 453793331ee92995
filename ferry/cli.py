"""The ``ferry`` command: one front door for pretraining, simulation, deployment and audit.

Errors the user can fix print one line (``ferry: error: ...``) and exit 2; ``--debug`` shows
the traceback. Every option can also come from a TOML file (``--config FILE``, keys spelled
like the options without dashes in front); the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

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
    audit.add_report,
    model.add_export,
    model.add_predict,
    deployment.add_certs,
    deployment.add_server,
    deployment.add_client,
)


class _Formatter(argparse.HelpFormatter):
    """Help lines wrapped at spaces only: ``hospital-imaging`` is never split at its hyphen."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """argparse with Ferry's error format: one line, ``ferry: error: ...``, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"ferry: error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def version_line() -> str:
    """Ferry's version and the versions of what its guarantees rest on (read from the
    installed metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from ferry import __version__

    parts = []
    for name in ("flwr", "opacus", "torch", "dp-accounting"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} missing")
    return f"ferry {__version__} ({', '.join(parts)})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ferry", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    for command in sub.choices.values():
        loud = command.add_mutually_exclusive_group()
        loud.add_argument(
            "--quiet", action="store_true", help="print only warnings and errors (no progress)"
        )
        loud.add_argument("--verbose", action="store_true", help="also print debug lines")
    return parser


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a line is logged."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(quiet: bool = False, verbose: bool = False) -> None:
    """The ``ferry`` loggers on stdout, one plain line per record: progress (INFO) unless
    ``quiet``, debug lines with ``verbose``."""
    logger = logging.getLogger("ferry")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = _Stdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "quiet", False), getattr(args, "verbose", False))
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
