"""The audit's presence checks: institutions the ledger shows took part, but whose reports
are not in it.

A report dropped from the *end* of an institution's chain leaves no gap that later reports
could show, and an institution left out entirely leaves no chain at all. The ledger alone can
betray such a drop only where other records still name the institution; these checks find
those traces. Each is a *report missing* finding:

* a ``round_aggregated`` record lists the institution as a participant of round R, and no
  ``client_trained`` record of it for round R is in the ledger (the server aggregates only
  updates whose report it logged first);
* a ``backbone_shipped`` record sends the backbone to a node in round R, and no record of
  that node's training in round R follows (trained, refused, rejected or dropped), unless a
  ``run_resumed`` record says the round was cut short by a crash;
* an institution with a trusted key (``--keys``, or a key in the run's client state root), or
  named by a ``client_dropped`` at stage "train" or an ``update_rejected`` record, has no
  ``client_trained`` record at all. An institution named only by refusals (or by drops before
  training) trained nothing the ledger could hold: that is a note, not a finding.

What none of this can show, a report dropped from the end of a chain, or an institution
left out with every trace of it (and its key, when the keys come from the run directory),
is visible only in the institution's own receipts (``--receipts``); the audit's verdict says
so when they were not given.
"""

from __future__ import annotations

from collections.abc import Iterable

REPORT_MISSING = "report missing"
# what the server records about a node it sent a train message to
_OUTCOMES = ("client_trained", "client_refused", "client_dropped", "update_rejected")


def _name(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _round(record: dict) -> int | None:
    rnd = record.get("round")
    return rnd if type(rnd) is int else None


def _where(line: int, rnd: int | None) -> str:
    return f"line {line}" + (f" (round {rnd})" if rnd is not None else "")


def missing_reports(
    records: list[dict], key_names: Iterable[str], key_source: str
) -> tuple[dict[str, list[str]], list[str]]:
    """({institution: [where: detail, ...]}, notes) for the checks in the module docstring.
    ``records`` are the verified chain's records, in order (line = index + 1). Hostile values
    (a participants field that is not a list, a round that is not an int) are skipped: they
    name no institution."""
    trained: dict[str, set] = {}
    node_names: dict[str, str] = {}
    answered: dict[tuple[str, int | None], int] = {}  # (node, round) -> last outcome line
    last_resume = 0
    for line, rec in enumerate(records, start=1):
        event, name, node = rec.get("event"), _name(rec.get("institution")), rec.get("node_id")
        rnd = _round(rec)
        if event == "run_resumed":
            last_resume = line
        if event in _OUTCOMES and isinstance(node, str):
            answered[(node, rnd)] = line
            if name is not None:
                node_names.setdefault(node, name)
        if event == "client_trained" and name is not None:
            trained.setdefault(name, set()).add(rnd)
    found: dict[str, list[str]] = {}
    notes: list[str] = []
    traces: dict[str, list[str]] = {}  # institution without any report -> why it should have
    refused_only: dict[str, str] = {}

    def missing(name: str, detail: str) -> None:
        if name in trained:
            found.setdefault(name, []).append(detail)
        else:
            traces.setdefault(name, []).append(detail)

    for line, rec in enumerate(records, start=1):
        event, rnd = rec.get("event"), _round(rec)
        where = _where(line, rnd)
        if event == "round_aggregated" and isinstance(rec.get("participants"), list):
            for name in filter(None, map(_name, rec["participants"])):
                if rnd not in trained.get(name, ()):
                    missing(
                        name,
                        f"{where}: a participant of that round, but no report of it for that "
                        "round is in this ledger",
                    )
        elif event == "backbone_shipped" and isinstance(rec.get("node_id"), str):
            node = rec["node_id"]
            if answered.get((node, rnd), 0) < line and last_resume < line:
                missing(
                    node_names.get(node, f"node {node}"),
                    f"{where}: sent the backbone to train, then no record of its training "
                    "in that round is in this ledger",
                )
        elif event in ("client_dropped", "update_rejected"):
            name = _name(rec.get("institution"))
            if name is None or name in trained:
                continue
            if event == "update_rejected" or rec.get("stage") == "train":
                what = "its update was rejected" if event == "update_rejected" else "dropped"
                traces.setdefault(name, []).append(
                    f"{where}: {what} while training, and no report of it is in this ledger "
                    "(the spend of that round is not in it)"
                )
            else:
                refused_only.setdefault(name, f"{where}: dropped at {rec.get('stage')!r}")
        elif event == "client_refused":
            name = _name(rec.get("institution"))
            if name is not None and name not in trained:
                refused_only.setdefault(name, f"{where}: refused ({str(rec.get('reason'))[:60]})")
    for name in sorted(set(key_names) - set(trained) - set(traces)):
        if name in refused_only:
            continue
        traces[name] = [
            f"has a public key in {key_source} but no record in this ledger: its reports were "
            "left out, or it took no part in this run (then audit without its key)"
        ]
    for name, details in traces.items():
        found.setdefault(name, []).extend(details)
    for name, first in sorted(refused_only.items()):
        if name not in traces and name not in trained:
            notes.append(
                f"{name} has no report in this ledger: it refused or was dropped before "
                f"training ({first}); such records are the server's, unsigned, so only its "
                "receipts (--receipts) show it trained nothing"
            )
    return found, notes
