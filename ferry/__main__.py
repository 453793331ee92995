"""``python -m ferry``: the same front door as the ``ferry`` command."""

from ferry.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
