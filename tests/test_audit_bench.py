"""The audit benchmark times an audit that passes: its ledger is signed the way a real run's
is (each institution's reports through ``client.receipts.sign_and_keep``, keys in the run's
client state root), so ``ferry audit`` verifies and replays every report. A bench ledger
without signatures would time an audit that replays nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.common.privacy.accounting import MechanismSegment, epsilon_for_history
from ferry.common.privacy.report import RECEIPTS_FILE, SignedReport, fingerprint, load_public_key
from ferry.server.audit import audit_ledger
from ferry.server.audit_signatures import discover_keys, verify_record
from ferry.server.ledger import read_ledger
from ferry.simulations.bench.audit_bench import (
    DELTA,
    plan_institutions,
    sign_reports,
    write_ledger,
)

ROUNDS = 2
SIGMA = 2.0  # fixed instead of the bench's PRV bisection (seconds): far inside every budget


def _honest(plans) -> list[dict]:
    """What an honest client reports for SIGMA: its PRV epsilon after every round."""
    out = []
    for p in plans:
        seg = MechanismSegment(SIGMA, p.sample_rate, p.steps_per_round)
        eps = [epsilon_for_history([seg] * r, DELTA, "prv") for r in range(1, ROUNDS + 1)]
        out.append({"sigma": SIGMA, "epsilons": eps})
    return out


def _bench_run(out: Path, plans, honest) -> None:
    signed, _ = sign_reports(out, plans, honest, ROUNDS, workers=1)
    write_ledger(out, plans, signed, ROUNDS)


def _key_fingerprints(out: Path) -> dict[str, str]:
    return {
        f.parent.name: fingerprint(load_public_key(f.read_bytes())[0])
        for f in sorted((out / "clients").glob("*/report-signing.pub"))
    }


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One small bench ledger (2 institutions x 2 rounds): (run dir, plans, honest)."""
    out = tmp_path_factory.mktemp("bench-audit")
    plans = plan_institutions(2)
    honest = _honest(plans)
    _bench_run(out, plans, honest)
    return out, plans, honest


@pytest.mark.slow  # worker processes sign, as in the bench
def test_audit_bench_ledger_is_signed_per_institution_and_passes_the_audit(bench_run):
    out, plans, _ = bench_run
    report = audit_ledger(out)  # keys found in out/clients, as for a simulation
    assert report.ok, (
        report.verdict() + "\n" + "\n".join(d for i in report.institutions for d in i.details)
    )
    assert "signatures are self-consistent" in report.verdict()  # keys from the run
    assert [i.rounds for i in report.institutions] == [ROUNDS] * len(plans)
    trained = [
        r for r in read_ledger(out / "ledger.jsonl").records if r["event"] == "client_trained"
    ]
    assert len(trained) == ROUNDS * len(plans)
    ring = discover_keys(out)
    for record in trained:
        SignedReport.from_json(record["signed_report"])  # every record carries one
        assert verify_record(record, ring).authentic  # signed with its institution's key
    assert sorted(_key_fingerprints(out)) == [p.institution for p in plans]


@pytest.mark.slow
def test_audit_bench_rerun_reuses_each_institution_key_and_restarts_its_receipts(bench_run):
    out, plans, honest = bench_run
    keys = _key_fingerprints(out)
    _bench_run(out, plans, honest)

    assert _key_fingerprints(out) == keys  # no new key per run or per report
    for p in plans:
        receipts = (out / "clients" / p.institution / RECEIPTS_FILE).read_text()
        assert len(receipts.splitlines()) == ROUNDS  # one chain per fresh ledger
    assert audit_ledger(out).ok
