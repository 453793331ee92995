"""Names both sides of a deployment agree on: the files of a federation's certificate
directory (``ferry certs`` writes them, ``ferry server`` and ``ferry client`` read them) and
what an institution may be called (its key file, its SuperNode, its ledger entries)."""

from __future__ import annotations

import re

from ferry.common.errors import FerryError

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
INSTITUTIONS_DIR = "institutions"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_institution_name(name: str) -> str:
    if not _NAME.match(name):
        raise FerryError(
            f"institution name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name
