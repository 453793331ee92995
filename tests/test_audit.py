"""``ferry audit``: ledgers written with the real Ledger and honest clients' own numbers (noise
from ``noise_multiplier_for_target``, cumulative epsilon from Opacus PRV), signed by each
institution with the client's own code (:func:`client.receipts.sign_and_keep`, keys in the
run's client state root where the audit finds a simulation's keys), pass; every kind of
violation a client signs is flagged with exit 1; unreadable input exits 2 with one line.
What a server can do to signed reports is in ``test_attack_forged_ledger.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry.cli import main
from ferry.client.receipts import sign_and_keep
from ferry.common.privacy.accounting import (
    MechanismSegment,
    epsilon_for_history,
    noise_multiplier_for_target,
)
from ferry.common.privacy.dp_events import event_to_json, segment_event
from ferry.server import audit, audit_replay
from ferry.server.ledger import LEDGER_FILE, Ledger

DELTA = 1e-5
ROUNDS = 4
BATCH = 10
# (institution, sample rate, steps per round, budget epsilon): q = 1/ceil(n/B), one epoch
INSTITUTIONS = [("hospital-a", 0.05, 20, 4.0), ("clinic-b", 0.02, 50, 3.0)]


@pytest.fixture(scope="module")
def honest() -> dict[str, list[dict]]:
    """Each institution's client_trained fields per round, as an honest client reports them."""
    out = {}
    for name, q, steps, budget in INSTITUTIONS:
        sigma = noise_multiplier_for_target(budget, DELTA, q, steps * ROUNDS, "prv")
        history: list[MechanismSegment] = []
        out[name] = []
        for rnd in range(1, ROUNDS + 1):
            history.append(MechanismSegment(sigma, q, steps))
            out[name].append(
                dict(
                    run_id="run-a",
                    round=rnd,
                    institution=name,
                    node_id=name,
                    dp_event=event_to_json(segment_event(history[-1])),
                    sampling="poisson",
                    noise_multiplier=sigma,
                    sample_rate=q,
                    steps=steps,
                    max_grad_norm=1.0,
                    delta=DELTA,
                    accountant="prv",
                    accountant_library="opacus 1.6.0",
                    epsilon_reported=epsilon_for_history(history, DELTA, "prv"),
                    client_rounds=rnd,
                    budget_epsilon=budget,
                    budget_delta=DELTA,
                    examples=round(BATCH / q),
                )
            )
    return out


def signed_by_client(directory: Path, fields: dict) -> dict:
    """``fields`` with the signed report the institution's own code makes of them (its key
    and receipt chain in ``directory/clients/NAME``, the simulation's client state root)."""
    report = {
        "run-id": fields["run_id"],
        "round": fields["round"],
        "institution": fields["institution"],
        "unit": "one example (record) at one institution",
        "non-private": False,
        "dp-event": fields["dp_event"],
        "sampling": fields["sampling"],
        "noise-multiplier": fields["noise_multiplier"],
        "sample-rate": fields["sample_rate"],
        "steps": fields["steps"],
        "max-grad-norm": fields["max_grad_norm"],
        "batch-size": BATCH,
        "local-epochs": max(1, round(fields["steps"] * fields["sample_rate"])),
        "examples": fields["examples"],
        "delta": fields["delta"],
        "epsilon": fields["epsilon_reported"],
        "accountant": fields["accountant"],
        "accountant-library": fields["accountant_library"],
        "rounds": fields["client_rounds"],
        "budget-epsilon": fields["budget_epsilon"],
        "budget-delta": fields["budget_delta"],
    }
    state_dir = directory / "clients" / fields["institution"]
    signed = sign_and_keep(state_dir, fields["institution"], report)
    return {
        **fields,
        "signed_report": {"body": signed["signed-report"], "signature": signed["signature"]},
    }


def write_run(directory: Path, records: dict[str, list[dict]], drops: dict | None = None) -> Path:
    """A run's ledger holding ``records`` (institution -> its client_trained fields, each
    signed by its institution), a ``client_dropped`` at stage "train" for each ``drops``
    entry (institution -> round), and a ``round_aggregated`` per round naming the
    institutions with a report in it."""
    directory.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(directory)
    ledger.append("run_started", run_id="run-a", config={}, backbone_sha256="ab" * 32)
    rounds = sorted({r["round"] for recs in records.values() for r in recs})
    for rnd in rounds:
        participants = []  # as the server lists them: the institutions it logged a report of
        for name, recs in records.items():
            for fields in recs:
                if fields["round"] == rnd:
                    ledger.append("client_trained", **signed_by_client(directory, fields))
                    participants.append(name)
        for name, dropped_round in (drops or {}).items():
            if dropped_round == rnd:
                ledger.append(
                    "client_dropped",
                    run_id="run-a",
                    round=rnd,
                    institution=name,
                    node_id=name,
                    stage="train",
                    reason="no reply within 60 s",
                )
        ledger.append(
            "round_aggregated",
            run_id="run-a",
            round=rnd,
            participants=participants,
            payload_bytes=1000,
        )
    return directory


def modified(honest: dict, name: str, change, rounds=None) -> dict[str, list[dict]]:
    """A copy of the honest records with ``change(fields)`` applied to ``name``'s rounds."""
    out = {k: [dict(f) for f in v] for k, v in honest.items()}
    for fields in out[name]:
        if rounds is None or fields["round"] in rounds:
            change(fields)
    return out


def ferry_audit(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["audit", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_honest_ledger_passes_and_pld_replay_matches_the_reported_prv(
    tmp_path: Path, honest: dict, capsys
) -> None:
    run = write_run(tmp_path / "run", honest)
    code, out, err = ferry_audit(capsys, run, "--no-plot")
    assert code == 0, out + err
    assert out.strip().splitlines()[-1].startswith("PASS")
    report = audit.audit_ledger(run)
    assert [i.status for i in report.institutions] == ["ok", "ok"]
    for inst in report.institutions:
        assert inst.rounds == ROUNDS
        for rec, replayed in zip(inst.records, inst.curve, strict=True):
            assert rec.epsilon_reported == pytest.approx(replayed, rel=0.01)
        assert inst.epsilon_replayed <= inst.epsilon_rdp  # RDP: the looser upper bound


def test_client_claiming_half_its_epsilon_is_flagged_under_reported(
    tmp_path: Path, honest: dict, capsys
) -> None:
    def halve(fields: dict) -> None:
        fields["epsilon_reported"] /= 2

    run = write_run(tmp_path / "run", modified(honest, "clinic-b", halve))
    code, out, _ = ferry_audit(capsys, run, "--no-plot")
    assert code == 1
    report = audit.audit_ledger(run)
    status = {i.institution: i.status for i in report.institutions}
    assert status == {"hospital-a": "ok", "clinic-b": "under-reported"}
    assert "clinic-b: under-reported: line" in out
    assert out.strip().splitlines()[-1].startswith("FAIL")


def test_under_reporting_a_single_round_is_flagged(tmp_path: Path, honest: dict) -> None:
    def shave(fields: dict) -> None:
        fields["epsilon_reported"] *= 0.97  # beyond the 1 % tolerance, in round 2 only

    run = write_run(tmp_path / "run", modified(honest, "hospital-a", shave, rounds={2}))
    (inst,) = [i for i in audit.audit_ledger(run).institutions if i.flags]
    assert inst.institution == "hospital-a" and inst.flags == ["under-reported"]
    assert "(round 2)" in inst.details[0]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"budget_epsilon": 2.5}, id="epsilon"),  # spends ~3 of a budget of 2.5
        pytest.param({"budget_delta": 1e-6}, id="delta"),  # runs at delta 1e-5
    ],
)
def test_budget_overrun_is_flagged(tmp_path: Path, honest: dict, change: dict, capsys) -> None:
    run = write_run(tmp_path / "run", modified(honest, "clinic-b", lambda f: f.update(change)))
    code, out, _ = ferry_audit(capsys, run, "--no-plot")
    assert code == 1
    status = {i.institution: i.status for i in audit.audit_ledger(run).institutions}
    assert status == {"hospital-a": "ok", "clinic-b": "budget overrun"}


def _without_replacement(fields: dict) -> None:
    fields["dp_event"] = {
        "module_name": "dp_accounting.dp_event",
        "class_name": "SelfComposedDpEvent",
        "count": fields["steps"],
        "event": {
            "module_name": "dp_accounting.dp_event",
            "class_name": "SampledWithoutReplacementDpEvent",
            "source_dataset_size": fields["examples"],
            "sample_size": 32,
            "event": {
                "module_name": "dp_accounting.dp_event",
                "class_name": "GaussianDpEvent",
                "noise_multiplier": fields["noise_multiplier"],
            },
        },
    }


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda f: f.update(sampling="shuffle"), id="sampling-field"),
        pytest.param(_without_replacement, id="dp-event"),
    ],
)
def test_non_poisson_event_is_flagged(tmp_path: Path, honest: dict, change, capsys) -> None:
    run = write_run(tmp_path / "run", modified(honest, "hospital-a", change, rounds={3}))
    code, _, _ = ferry_audit(capsys, run, "--no-plot")
    assert code == 1
    (inst,) = [i for i in audit.audit_ledger(run).institutions if i.flags]
    assert inst.institution == "hospital-a"
    assert inst.flags == ["non-Poisson sampling"]


def test_dp_event_contradicting_the_record_fields_is_flagged(tmp_path: Path, honest: dict):
    def lie(fields: dict) -> None:
        fields["noise_multiplier"] *= 2  # the fields claim twice the noise the event says

    run = write_run(tmp_path / "run", modified(honest, "clinic-b", lie, rounds={1}))
    (inst,) = [i for i in audit.audit_ledger(run).institutions if i.flags]
    assert inst.institution == "clinic-b" and inst.flags == ["mechanism mismatch"]


@pytest.mark.parametrize("dropped", [False, True], ids=["unexplained", "after-a-drop"])
def test_missing_round_is_flagged(tmp_path: Path, honest: dict, dropped: bool, capsys) -> None:
    """Client round 2 never reached the ledger. A drop at "train" explains the gap but the
    spend of that round is still missing from the replay, so it is flagged either way."""
    records = {k: list(v) for k, v in honest.items()}
    del records["hospital-a"][1]
    run = write_run(tmp_path / "run", records, drops={"hospital-a": 2} if dropped else None)
    code, out, _ = ferry_audit(capsys, run, "--no-plot")
    assert code == 1
    status = {i.institution: i.status for i in audit.audit_ledger(run).institutions}
    assert status == {"hospital-a": "missing round", "clinic-b": "ok"}
    assert "client_rounds 1 -> 3" in out
    assert ("that round's spend is not in this ledger" in out) == dropped


def test_history_from_earlier_runs_is_partial_not_flagged(
    tmp_path: Path, honest: dict, capsys
) -> None:
    """Rounds 1-2 were in an earlier run's ledger: the reports (cumulative over all four
    rounds) exceed this ledger's replay, which is only a lower bound."""
    records = {k: v[2:] for k, v in honest.items()}
    run = write_run(tmp_path / "run", records)
    code, out, _ = ferry_audit(capsys, run, "--no-plot")
    assert code == 0, out
    report = audit.audit_ledger(run)
    assert {i.status for i in report.institutions} == {"partial"}
    assert "earlier rounds are not in this ledger" in out
    assert "2 partial" in out.strip().splitlines()[-1]


def _not_json(directory: Path) -> Path:
    (directory / LEDGER_FILE).write_text("this is not a ledger\n")
    return directory


def _empty(directory: Path) -> Path:
    (directory / LEDGER_FILE).write_bytes(b"")
    return directory / LEDGER_FILE


def _other_json_lines(directory: Path) -> Path:
    (directory / "metrics.jsonl").write_text('{"round": 1, "loss": 0.5}\n')
    return directory / "metrics.jsonl"


def _only_a_partial_line(directory: Path) -> Path:
    (directory / LEDGER_FILE).write_text('{"seq": 0, "prev": "00')
    return directory


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda d: d / "nowhere", id="missing"),
        pytest.param(lambda d: d, id="directory-without-ledger"),
        pytest.param(_empty, id="empty"),
        pytest.param(_not_json, id="not-json"),
        pytest.param(_other_json_lines, id="json-lines-but-not-a-ledger"),
        pytest.param(_only_a_partial_line, id="no-complete-record"),
    ],
)
def test_unreadable_input_exits_2_with_one_line(tmp_path: Path, make, capsys) -> None:
    code, out, err = ferry_audit(capsys, make(tmp_path))
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("ferry: error: ")
    assert "Traceback" not in err


def test_broken_chain_exits_1_naming_the_line(tmp_path: Path, honest: dict, capsys) -> None:
    run = write_run(tmp_path / "run", honest)
    lines = (run / LEDGER_FILE).read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"epsilon_reported":', '"epsilon_reported":0.1,"was":')
    (run / LEDGER_FILE).write_text("".join(lines))
    code, out, err = ferry_audit(capsys, run)
    assert code == 1
    assert out.strip().splitlines() == [
        "FAIL: ledger chain broken: line 4: prev hash does not match line 3 "
        "(line edited, deleted or reordered)"
    ]
    assert "Traceback" not in out + err
    assert not (run / audit.PLOT_FILE).exists()  # nothing is drawn from an untrusted ledger


def test_emptied_ledger_with_its_head_left_is_tampering_not_unreadable(
    tmp_path: Path, honest: dict, capsys
) -> None:
    run = write_run(tmp_path / "run", honest)
    (run / LEDGER_FILE).write_bytes(b"")
    code, out, _ = ferry_audit(capsys, run)
    assert code == 1
    assert out.startswith("FAIL: ledger chain broken: ledger.jsonl is empty but ledger.head")


def test_incomplete_last_line_is_a_warning_not_a_failure(
    tmp_path: Path, honest: dict, capsys
) -> None:
    run = write_run(tmp_path / "run", honest)
    with open(run / LEDGER_FILE, "a") as f:
        f.write('{"event":"client_trained","institution":"hosp')
    code, out, _ = ferry_audit(capsys, run, "--no-plot")
    assert code == 0
    assert "warning: line 14 is incomplete" in out


def test_json_output_is_one_object_with_the_table(tmp_path: Path, honest: dict, capsys) -> None:
    def halve(fields: dict) -> None:
        fields["epsilon_reported"] /= 2

    run = write_run(tmp_path / "run", modified(honest, "hospital-a", halve))
    code, out, _ = ferry_audit(capsys, run, "--json", "--no-plot")
    data = json.loads(out)
    assert code == data["exit_code"] == 1
    assert data["chain"] == "intact" and data["records"] == 1 + 2 * ROUNDS + ROUNDS
    rows = {row["institution"]: row for row in data["institutions"]}
    assert rows["hospital-a"]["flags"] == ["under-reported"]
    assert rows["clinic-b"]["status"] == "ok"
    assert rows["clinic-b"]["epsilon_replayed_pld"] == pytest.approx(
        rows["clinic-b"]["epsilon_reported"], rel=0.01
    )
    assert data["verdict"].startswith("FAIL")


def test_plot_is_written_next_to_the_ledger(tmp_path: Path, honest: dict, capsys) -> None:
    run = write_run(tmp_path / "run", honest)
    code, out, _ = ferry_audit(capsys, run)
    assert code == 0
    png = run / audit.PLOT_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in out


def test_read_only_directory_skips_the_plot_without_failing(
    tmp_path: Path, honest: dict, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    def refuse(self, path, **kwargs):  # what savefig meets in a read-only directory
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Figure, "savefig", refuse)
    run = write_run(tmp_path / "run", honest)
    code, out, _ = ferry_audit(capsys, run)
    assert code == 0
    assert "plot not written" in out and "Permission denied" in out


@pytest.mark.parametrize(
    ("sigma", "q", "refined"),
    [
        pytest.param(0.8, 0.05, False, id="moderate-epsilon"),
        # epsilon ~0.16 after 500 steps: at the default interval the replay is 15 % high
        pytest.param(1.2, 0.002, True, id="small-epsilon-needs-a-finer-interval"),
    ],
)
def test_replay_stays_within_half_a_percent_of_a_fine_pld(
    sigma: float, q: float, refined: bool
) -> None:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    rounds, steps = 50, 10
    segments = (MechanismSegment(sigma, q, steps),) * rounds
    curve, interval, rdp = audit_replay.replay(segments, (DELTA,) * rounds)
    fine = PLDAccountant(value_discretization_interval=1e-4)
    fine.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
            rounds * steps,
        )
    )
    assert curve[-1] == pytest.approx(fine.get_epsilon(DELTA), rel=0.005)
    assert all(a < b for a, b in zip(curve, curve[1:], strict=False))
    assert curve[-1] <= rdp
    assert (interval < audit_replay.PLD_INTERVAL) == refined


@pytest.mark.slow
def test_replay_on_worker_processes_matches_the_replay_in_process(
    tmp_path: Path, honest: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = write_run(tmp_path / "run", honest)
    curves = {}
    for mode in ("in-process", "workers"):
        monkeypatch.setattr(audit_replay, "_EPSILON", {})  # no memo: both replay from scratch
        monkeypatch.setattr(audit_replay, "_FINAL", {})
        if mode == "workers":
            monkeypatch.setattr(audit_replay, "PARALLEL_MIN_JOBS", 1)
            monkeypatch.setattr(audit_replay.os, "sched_getaffinity", lambda pid: {0, 1})
        report = audit.audit_ledger(run)
        curves[mode] = {i.institution: i.curve for i in report.institutions}
        assert report.ok
    assert curves["workers"] == curves["in-process"]
