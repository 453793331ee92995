"""Attack: an institution writes lines into the server's log in another's name.

A refusal's reason and a client error's reason are an institution's own text, and the
server logs them (``  hospital-002 refused: REASON``). A reason holding a newline (or a
terminal escape, or a Unicode line separator) started a line of its own in the operator's
log, so hospital-002 could print ``  hospital-000 update rejected (...)`` or a forged round
headline. Every untrusted text now reaches the log as one line, its control characters
escaped; the ledger keeps the same escaped text.
"""

from __future__ import annotations

import dataclasses

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from ferry.server.federation import run_federation
from tests import test_attack_hostile_replies as hostile
from tests import test_deploy_federation as deployed

make_plan, server_identity = deployed.make_plan, deployed.server_identity

FORGED = "  hospital-000 update rejected (the report's epsilon -1.0 is not a spend)"
REASONS = {
    "newline": f"out of memory\n{FORGED}",
    "carriage return and erase": f"out of memory\r\x1b[2K{FORGED}",
    "unicode line separator": f"out of memory\u2028{FORGED}",
}


def _refused(reason: str) -> hostile.Mutation:
    def mutate(msg, reply):
        refusal = ConfigRecord({"reason": reason, "kind": "error"})
        return Message(RecordDict({"refusal": refusal}), reply_to=msg)

    return mutate


def _failed(reason: str) -> hostile.Mutation:
    def mutate(msg, reply):
        return Message(Error(0, reason), reply_to=msg)  # the ClientApp "raised"

    return mutate


@pytest.mark.parametrize("stage", ["train", "evaluate"])
@pytest.mark.parametrize("how", [_refused, _failed])
@pytest.mark.parametrize("name", list(REASONS))
def test_a_reason_cannot_start_a_log_line_of_its_own(make_plan, stage, how, name):
    lines: list[str] = []
    plan = dataclasses.replace(make_plan(rounds=1), log=lambda text: lines.extend(text.split("\n")))

    run_federation(hostile.HostileGrid(stage, how(REASONS[name])), plan)

    shown = [line for line in lines if "out of memory" in line]
    assert shown, lines  # the hostile institution's reason was logged...
    for line in lines:  # ...on its own line, and no line is forged
        assert not line.replace("\r", "\n").replace("\u2028", "\n").count("\n")
        assert not any(c in line for c in "\r\x1b\u2028")
        assert not line.startswith(FORGED.strip()) and not line.startswith(FORGED)
