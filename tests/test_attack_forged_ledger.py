"""The operator rewrites its own ledger: ``ferry audit`` must notice.

The adversary runs the server. It holds the ledger and every reply, and it rewrites the
ledger with the ledger's own functions (read, edit, append again through
:class:`server.ledger.Ledger`, so the hash chain and head verify). It cannot sign as an
institution. Each attack below passed the audit before institutions signed their reports;
each must now fail it with exit 1, naming the institution and the line. A hostile
institution's numbers (it can sign anything) get a verdict, never a traceback.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from test_audit import BATCH, DELTA, ROUNDS, ferry_audit, signed_by_client, write_run

from ferry.common.privacy.accounting import MechanismSegment, epsilon_for_history
from ferry.common.privacy.dp_events import event_to_json, segment_event
from ferry.common.privacy.report import (
    SIGNATURE_CONTEXT,
    PrivacyReport,
    digest,
    fingerprint,
    load_private_key,
    public_key_text,
    sign,
)
from ferry.server import audit
from ferry.server.ledger import HEAD_FILE, LEDGER_FILE, Ledger, read_ledger

# What a PASS must say it did not check (the README quotes these lines).
NO_RECEIPTS = (
    "a report dropped from the end of an institution's chain, or an institution left out "
    "entirely, is visible only with --receipts"
)
SELF_CONSISTENT = (
    "signatures are self-consistent; the keys were found in the run directory written by the "
    "operator, so they do not show who signed: give --keys from the institutions for an "
    "independent check"
)
SIGMA = {"hospital-a": 1.1, "clinic-b": 1.3}
Q = {"hospital-a": 0.05, "clinic-b": 0.02}


def honest_fields(run_id: str = "run-a") -> dict[str, list[dict]]:
    """Each institution's client_trained fields per round, with its honest PRV epsilon."""
    out: dict[str, list[dict]] = {}
    for name, sigma in SIGMA.items():
        q = Q[name]
        steps = round(1 / q)  # one epoch
        history: list[MechanismSegment] = []
        out[name] = []
        for rnd in range(1, ROUNDS + 1):
            history.append(MechanismSegment(sigma, q, steps))
            out[name].append(
                dict(
                    run_id=run_id,
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
                    budget_epsilon=10.0,
                    budget_delta=DELTA,
                    examples=round(BATCH / q),
                )
            )
    return out


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = write_run(tmp_path_factory.mktemp("honest") / "run", honest_fields())
    return run


@pytest.fixture
def run(honest_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of the honest run (ledger and the clients' state) for one attack."""
    return Path(shutil.copytree(honest_run, tmp_path / "run"))


def records_of(run: Path) -> list[dict]:
    return read_ledger(run / LEDGER_FILE).records


def rechain(run: Path, records: list[dict]) -> None:
    """The operator's rewrite: the edited records, appended again in a fresh, valid chain."""
    (run / LEDGER_FILE).unlink()
    (run / HEAD_FILE).unlink()
    ledger = Ledger(run)
    for record in records:
        fields = {k: v for k, v in record.items() if k not in ("seq", "prev", "time", "event")}
        ledger.append(record["event"], **fields)
    assert read_ledger(run / LEDGER_FILE).records  # the chain verifies: only signatures tell


def line_of(records: list[dict], name: str, rnd: int) -> int:
    return next(
        i
        for i, r in enumerate(records, start=1)
        if r.get("event") == "client_trained" and r["institution"] == name and r["round"] == rnd
    )


def edit_body(record: dict, **changes) -> None:
    """Change the signed body's values (the signature stays the institution's)."""
    body = json.loads(record["signed_report"]["body"])
    body.update(changes)
    record["signed_report"] = {**record["signed_report"], "body": json.dumps(body)}


def assert_fails_naming(capsys, run: Path, name: str, line: int, *kinds: str) -> str:
    code, out, err = ferry_audit(capsys, run, "--no-plot")
    assert code == 1, out
    assert out.strip().splitlines()[-1].startswith("FAIL")
    assert "Traceback" not in out + err
    for kind in kinds:
        assert f"{name}: {kind}: line {line}" in out, out
    return out


def test_honest_ledger_passes(run: Path, capsys) -> None:
    code, out, _ = ferry_audit(capsys, run, "--no-plot", "--receipts", run / "clients")
    assert code == 0, out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("PASS") and "receipts of 2 institution(s) match" in verdict
    assert NO_RECEIPTS not in verdict  # the receipts covered what the ledger cannot
    assert SELF_CONSISTENT in verdict  # but the keys are the run's own


def test_halved_sample_rate_rechained_fails(run: Path, capsys) -> None:
    """The operator claims clinic-b ran at half its q in round 2 (a smaller spend), in the
    server's fields and in the signed body, and re-chains the ledger."""
    records = records_of(run)
    line = line_of(records, "clinic-b", 2)
    rec = records[line - 1]
    half = rec["sample_rate"] / 2
    rec["sample_rate"] = half
    rec["dp_event"] = event_to_json(segment_event(MechanismSegment(SIGMA["clinic-b"], half, 50)))
    edit_body(rec, sample_rate=half, dp_event=rec["dp_event"])
    rechain(run, records)
    assert_fails_naming(capsys, run, "clinic-b", line, "forged or altered report")


def test_halved_sample_rate_in_server_fields_only_is_a_contradiction(run: Path, capsys) -> None:
    records = records_of(run)
    line = line_of(records, "clinic-b", 2)
    records[line - 1]["sample_rate"] /= 2
    rechain(run, records)
    out = assert_fails_naming(capsys, run, "clinic-b", line, "server contradicts report")
    assert "sample_rate 0.01 but the signed report says 0.02" in out


def test_changed_epsilon_rechained_fails(run: Path, capsys) -> None:
    """The operator raises hospital-a's reported epsilon in round 1 (to call its budget
    spent); above the replay and under budget, the unsigned audit saw nothing wrong."""
    records = records_of(run)
    line = line_of(records, "hospital-a", 1)
    rec = records[line - 1]
    rec["epsilon_reported"] *= 1.5
    edit_body(rec, epsilon=rec["epsilon_reported"])
    rechain(run, records)
    assert_fails_naming(capsys, run, "hospital-a", line, "forged or altered report")


def test_dropped_report_rechained_fails(run: Path, capsys) -> None:
    """The operator deletes hospital-a's round-2 report and renumbers the later rounds' counts
    in its own fields, so no gap shows there."""
    records = records_of(run)
    dropped = line_of(records, "hospital-a", 2)
    del records[dropped - 1]
    for rec in records:
        if rec.get("institution") == "hospital-a" and rec.get("round", 0) > 2:
            rec["client_rounds"] -= 1
    rechain(run, records)
    nxt = line_of(records, "hospital-a", 3)
    assert_fails_naming(capsys, run, "hospital-a", nxt, "report chain broken", "missing round")


def test_inserted_report_signed_with_another_key_fails(run: Path, capsys) -> None:
    """The operator adds a fifth round for hospital-a, well-formed and signed with its own key:
    a tiny spend whose claimed epsilon stays above the replay and under budget."""
    records = records_of(run)
    last = records[line_of(records, "hospital-a", ROUNDS) - 1]
    previous = json.loads(last["signed_report"]["body"])
    seg = MechanismSegment(50.0, Q["hospital-a"], 20)
    operator_key = ec.generate_private_key(ec.SECP384R1())
    forged = PrivacyReport(
        **{
            **previous,
            "round": ROUNDS + 1,
            "client_rounds": ROUNDS + 1,
            "noise_multiplier": seg.noise_multiplier,
            "dp_event": event_to_json(segment_event(seg)),
            "epsilon": previous["epsilon"] * 1.01,
            "prev_report": digest(last["signed_report"]["body"]),
            "signer": fingerprint(operator_key.public_key()),
        }
    )
    signed = sign(forged, operator_key)
    fields = {k: v for k, v in last.items() if k not in ("seq", "prev", "time", "event")}
    fields.update(
        round=ROUNDS + 1,
        client_rounds=ROUNDS + 1,
        noise_multiplier=seg.noise_multiplier,
        dp_event=forged.dp_event,
        epsilon_reported=forged.epsilon,
        signed_report=signed.to_json(),
    )
    records.append({**fields, "event": "client_trained"})
    rechain(run, records)
    out = assert_fails_naming(capsys, run, "hospital-a", len(records), "forged or altered report")
    assert "signed by a key that is not hospital-a's" in out


def test_report_moved_from_another_run_fails(run: Path, capsys) -> None:
    """clinic-b also trained in run-b (same key, same numbers). The operator swaps run-b's
    round-2 report into run-a's ledger in place of run-a's, its run id field rewritten."""
    other = honest_fields("run-b")["clinic-b"][1]
    from_b = signed_by_client(run, other)  # what clinic-b signed in run-b
    records = records_of(run)
    line = line_of(records, "clinic-b", 2)
    records[line - 1] = {**records[line - 1], "signed_report": from_b["signed_report"]}
    rechain(run, records)
    out = assert_fails_naming(capsys, run, "clinic-b", line, "report moved")
    assert "signed for run 'run-b', not this ledger's 'run-a'" in out


def test_report_moved_to_another_round_fails(run: Path, capsys) -> None:
    """The operator swaps the round labels of clinic-b's rounds 2 and 3 and their order."""
    records = records_of(run)
    two, three = line_of(records, "clinic-b", 2), line_of(records, "clinic-b", 3)
    records[two - 1], records[three - 1] = records[three - 1], records[two - 1]
    records[two - 1]["round"], records[three - 1]["round"] = 2, 3
    rechain(run, records)
    assert_fails_naming(capsys, run, "clinic-b", two, "report moved")


def _leave_out(records: list[dict], name: str, rounds: set[int] | None = None) -> list[dict]:
    """The operator's cut: ``name``'s reports of ``rounds`` (all when None) deleted, and
    ``name`` struck from those rounds' participants, so no other record names them."""
    out = []
    for rec in records:
        if rounds is None or rec.get("round") in rounds:
            if rec.get("institution") == name:
                continue
            if rec.get("event") == "round_aggregated":
                rec = {**rec, "participants": [p for p in rec["participants"] if p != name]}
        out.append(rec)
    return out


def test_last_report_dropped_but_still_a_participant_fails(run: Path, capsys) -> None:
    """The operator deletes clinic-b's last report (no later report shows a gap in its chain)
    and re-chains; the round it aggregated still names clinic-b as a participant."""
    records = records_of(run)
    dropped = line_of(records, "clinic-b", ROUNDS)
    del records[dropped - 1]
    rechain(run, records)
    aggregated = next(
        i
        for i, r in enumerate(records, start=1)
        if r.get("event") == "round_aggregated" and r["round"] == ROUNDS
    )
    out = assert_fails_naming(capsys, run, "clinic-b", aggregated, "report missing")
    assert f"(round {ROUNDS}): a participant of that round, but no report" in out


def test_last_report_left_out_entirely_is_a_stated_blind_spot_then_caught_by_receipts(
    run: Path, capsys
) -> None:
    """The operator deletes hospital-a's last report and strikes it from that round's
    participants: the ledger alone cannot show it. The verdict must say so rather than read
    as a plain PASS, and the institution's receipts must fail the audit naming the round."""
    records = _leave_out(records_of(run), "hospital-a", {ROUNDS})
    rechain(run, records)
    code, out, _ = ferry_audit(capsys, run, "--no-plot")
    assert code == 0, out  # nothing in the ledger itself betrays the drop...
    assert out.strip().splitlines()[-1].endswith(f"not checked: {NO_RECEIPTS}")
    code, out, _ = ferry_audit(capsys, run, "--no-plot", "--json")
    assert json.loads(out)["not_checked"] == [NO_RECEIPTS]
    code, out, _ = ferry_audit(capsys, run, "--no-plot", "--receipts", run / "clients")
    assert code == 1  # ...but the institution's own receipt chain does
    assert out.strip().splitlines()[-1].startswith("FAIL")
    assert f"hospital-a: receipts differ: receipt {ROUNDS} (receipts.jsonl, round {ROUNDS})" in out
    assert "is missing from the ledger" in out


def _auditor_keys(run: Path, directory: Path) -> Path:
    """The institutions' NAME.pub files, as the auditor holds them (copied before any attack)."""
    directory.mkdir()
    for name in SIGMA:
        shutil.copy(run / "clients" / name / "report-signing.pub", directory / f"{name}.pub")
    return directory


def test_institution_left_out_entirely_fails_with_its_key(
    run: Path, tmp_path: Path, capsys
) -> None:
    """Every record of clinic-b deleted (and its name struck from every participants list):
    the auditor holds clinic-b's key, so an institution without a single report is a finding."""
    keys = _auditor_keys(run, tmp_path / "keys")
    rechain(run, _leave_out(records_of(run), "clinic-b"))
    code, out, err = ferry_audit(capsys, run, "--no-plot", "--keys", keys)
    assert code == 1, out
    assert "Traceback" not in out + err
    assert out.strip().splitlines()[-1].startswith("FAIL")
    assert "clinic-b: report missing: has a public key in" in out
    code, out, _ = ferry_audit(capsys, run, "--no-plot")  # the run's own keys: the same
    assert code == 1 and "clinic-b: report missing" in out


def test_institution_left_out_but_sent_the_backbone_fails(run: Path, capsys) -> None:
    """The operator leaves clinic-b out, its key and state directory too, but forgets that the
    ledger shows it was sent the backbone to train in round 1."""
    records = _leave_out(records_of(run), "clinic-b")
    shipped = dict(
        event="backbone_shipped",
        run_id="run-a",
        round=1,
        node_id="node-b",
        backbone_sha256="ab" * 32,
        bytes=10,
    )
    records.insert(1, shipped)
    rechain(run, records)
    shutil.rmtree(run / "clients" / "clinic-b")
    code, out, _ = ferry_audit(capsys, run, "--no-plot")
    assert code == 1, out
    assert "node node-b: report missing: line 2 (round 1): sent the backbone to train" in out


def test_institution_that_only_refused_is_a_note_not_a_finding(run: Path, capsys) -> None:
    """An honest run where clinic-c refused (its budget was spent in an earlier run): no
    report is expected, so the audit passes and says why clinic-c has none."""
    records = records_of(run)
    refusal = dict(
        event="client_refused",
        run_id="run-a",
        round=1,
        institution="clinic-c",
        node_id="node-c",
        reason="budget spent",
        kind="budget",
    )
    records.insert(1, refusal)
    rechain(run, records)
    code, out, _ = ferry_audit(capsys, run, "--no-plot")
    assert code == 0, out
    assert "warning: clinic-c has no report in this ledger: it refused" in out


def test_hostile_presence_records_get_a_verdict_not_a_traceback(run: Path, capsys) -> None:
    records = records_of(run)
    records += [
        dict(event="round_aggregated", run_id="run-a", round=[1], participants=[{"a": 1}, None]),
        dict(event="round_aggregated", run_id="run-a", round=2, participants="clinic-b"),
        dict(event="round_aggregated", run_id="run-a", round=1e300, participants=["ghost"]),
        dict(event="backbone_shipped", run_id="run-a", round={"r": 1}, node_id=["n"]),
        dict(event="client_dropped", run_id="run-a", round=None, institution=7, stage=[1]),
    ]
    rechain(run, records)
    code, out, err = ferry_audit(capsys, run, "--no-plot")
    assert code == 1 and "Traceback" not in out + err and err == ""
    assert "ghost: report missing: line" in out  # a participant without a report


def _resign(records: list[dict], name: str, key: ec.EllipticCurvePrivateKey) -> None:
    """Re-sign ``name``'s reports with ``key``, claiming twice the noise (a smaller epsilon)."""
    prev, history = "0" * 64, []
    for rec in records:
        if rec.get("event") == "client_trained" and rec["institution"] == name:
            body = json.loads(rec["signed_report"]["body"])
            sigma = body["noise_multiplier"] * 2
            history.append(MechanismSegment(sigma, body["sample_rate"], body["steps"]))
            body.update(
                noise_multiplier=sigma,
                dp_event=event_to_json(segment_event(history[-1])),
                epsilon=epsilon_for_history(history, body["delta"]),
                prev_report=prev,
                signer=fingerprint(key.public_key()),
            )
            signed = sign(PrivacyReport(**body), key)
            rec["signed_report"], prev = signed.to_json(), signed.digest
            rec.update(
                noise_multiplier=sigma, dp_event=body["dp_event"], epsilon_reported=body["epsilon"]
            )


def test_planted_key_naming_another_institution_fails(run: Path, tmp_path: Path, capsys) -> None:
    """The auditor's key directory gets an extra file, sorting first, whose OpenSSH comment
    says ferry-hospital-a; the operator re-signs hospital-a's reports with that key."""
    keys = _auditor_keys(run, tmp_path / "keys")
    operator = ec.generate_private_key(ec.SECP384R1())
    planted = keys / "aaa-node.pub"
    planted.write_bytes(public_key_text(operator.public_key()) + b" ferry-hospital-a\n")
    records = records_of(run)
    _resign(records, "hospital-a", operator)
    rechain(run, records)
    code, out, err = ferry_audit(capsys, run, "--no-plot", "--keys", keys)
    assert code == 1, out
    assert "Traceback" not in out + err
    assert f"hospital-a: key conflict: key file {planted} says it is ferry-hospital-a" in out
    assert "hospital-a: forged or altered report: line" in out  # its real key still rules


def test_two_keys_for_one_institution_fail(run: Path, tmp_path: Path, capsys) -> None:
    """Beside the auditor's clinic-b.pub, a state directory clinic-b/ holding another key."""
    keys = _auditor_keys(run, tmp_path / "keys")
    operator = ec.generate_private_key(ec.SECP384R1())
    (keys / "clinic-b").mkdir()
    (keys / "clinic-b" / "report-signing.pub").write_bytes(
        public_key_text(operator.public_key()) + b" ferry-clinic-b\n"
    )
    code, out, _ = ferry_audit(capsys, run, "--no-plot", "--keys", keys)
    assert code == 1, out
    assert "clinic-b: key conflict: key files" in out and "two different keys" in out


def test_keys_replaced_in_the_run_directory_show_only_self_consistency(
    run: Path, tmp_path: Path, capsys
) -> None:
    """A simulation's keys live in the run the operator writes: it replaces clinic-b's public
    key and re-signs its reports with twice the noise. The run's keys cannot show that; the
    verdict must say so, and the keys the institution handed over must fail the audit."""
    keys = _auditor_keys(run, tmp_path / "keys")
    operator = ec.generate_private_key(ec.SECP384R1())
    (run / "clients" / "clinic-b" / "report-signing.pub").write_bytes(
        public_key_text(operator.public_key()) + b" ferry-clinic-b\n"
    )
    records = records_of(run)
    _resign(records, "clinic-b", operator)
    rechain(run, records)
    code, out, _ = ferry_audit(capsys, run, "--no-plot")
    assert code == 0, out  # self-consistent: nothing in the run contradicts it...
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("PASS") and SELF_CONSISTENT in verdict
    assert "signatures verified" not in verdict
    code, out, _ = ferry_audit(capsys, run, "--no-plot", "--json")
    data = json.loads(out)
    assert data["keys"] == "found in the run directory"
    assert data["signature_check"] == SELF_CONSISTENT
    code, out, _ = ferry_audit(capsys, run, "--no-plot", "--keys", keys)
    assert code == 1  # ...the keys the institutions handed over do
    assert "clinic-b: forged or altered report: line" in out


def test_receipts_show_a_ledger_report_the_institution_never_kept(run: Path, capsys) -> None:
    receipts = run / "clients" / "clinic-b" / "receipts.jsonl"
    lines = receipts.read_text().splitlines(keepends=True)
    receipts.write_text("".join(lines[:-1]))  # as if round 4 had never been signed by it
    code, out, _ = ferry_audit(capsys, run, "--no-plot", "--receipts", run / "clients" / "clinic-b")
    assert code == 1
    line = line_of(records_of(run), "clinic-b", ROUNDS)
    assert f"clinic-b: receipts differ: line {line}: a report clinic-b never kept" in out


def test_unsigned_record_fails(run: Path, capsys) -> None:
    records = records_of(run)
    line = line_of(records, "clinic-b", 1)
    del records[line - 1]["signed_report"]
    rechain(run, records)
    assert_fails_naming(capsys, run, "clinic-b", line, "missing signature")


def test_no_keys_is_a_failure_not_a_pass(run: Path, capsys) -> None:
    shutil.rmtree(run / "clients")
    code, out, _ = ferry_audit(capsys, run, "--no-plot")
    assert code == 1
    assert out.strip().splitlines()[-1].startswith("FAIL: no public keys")


def test_keys_given_by_the_auditor_verify(run: Path, tmp_path: Path, capsys) -> None:
    """Deployment: the auditor holds the institutions' NAME.pub files, not the run's."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in SIGMA:
        shutil.copy(run / "clients" / name / "report-signing.pub", keys / f"{name}.pub")
    code, out, _ = ferry_audit(capsys, run, "--no-plot", "--keys", keys)
    assert code == 0, out
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    (keys / "clinic-b.pub").write_bytes(public_key_text(other) + b" ferry-clinic-b\n")
    code, out, _ = ferry_audit(capsys, run, "--no-plot", "--keys", keys)
    assert code == 1
    assert "clinic-b: forged or altered report: line" in out


# -- hostile numbers: a verdict for every record, never a traceback ---------------------------


HOSTILE = {
    "steps-1e18-float": {"steps": 1e18},
    "steps-1e18-int": {"steps": 10**18},
    "huge-int": {"examples": 10**400},
    "sigma-1e-6": {"noise_multiplier": 1e-6, "dp_event": "sigma"},
    "sigma-1e-300": {"noise_multiplier": 1e-300, "dp_event": "sigma"},
    "q-2": {"sample_rate": 2.0},
    "negative-sigma": {"noise_multiplier": -1.0, "dp_event": "sigma"},
    "nan-string": {"noise_multiplier": "NaN"},
    "steps-as-string": {"steps": "20"},
    "dp-event-list": {"dp_event": [1, 2]},
    "dp-event-count-nan": {"dp_event": "count-nan"},
    "epsilon-negative": {"epsilon": -3.0},
    "round-bool": {"round": True},
}


def _hostile_event(kind: str, body: dict) -> object:
    event = json.loads(json.dumps(body["dp_event"]))
    if kind == "sigma":
        event["event"]["event"]["noise_multiplier"] = body["noise_multiplier"]
    elif kind == "count-nan":
        event["count"] = "NaN"
    return event


@pytest.mark.parametrize("where", ["signed", "server"])
@pytest.mark.parametrize("change", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_numbers_get_a_verdict_not_a_traceback(
    run: Path, capsys, change: dict, where: str
) -> None:
    """``signed``: a hostile institution signs the numbers with its real key. ``server``:
    the operator writes them into its own fields (which the audit never replays)."""
    records = records_of(run)
    line = line_of(records, "hospital-a", 2)
    rec = records[line - 1]
    body = json.loads(rec["signed_report"]["body"])
    event = body["dp_event"]
    body.update(change)
    if isinstance(change.get("dp_event"), str):
        body["dp_event"] = _hostile_event(change["dp_event"], {**body, "dp_event": event})
    if where == "signed":
        key_file = run / "clients" / "hospital-a" / "report-signing.key"
        key = load_private_key(key_file.read_bytes())
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        signature = key.sign(SIGNATURE_CONTEXT + text.encode(), ec.ECDSA(hashes.SHA384()))
        rec["signed_report"] = {"body": text, "signature": base64.b64encode(signature).decode()}
    else:
        server_names = {"epsilon": "epsilon_reported"}
        for k, v in change.items():
            rec[server_names.get(k, k)] = body[k] if k == "dp_event" else v
    rechain(run, records)
    code, out, err = ferry_audit(capsys, run, "--no-plot")
    assert code == 1, out
    assert "Traceback" not in out + err and err == ""
    assert "hospital-a: " in out and f"line {line}" in out
    report = audit.audit_ledger(run)
    assert {i.institution for i in report.institutions} == set(SIGMA)
    assert [i.status for i in report.institutions if i.institution == "clinic-b"] == ["ok"]


@pytest.mark.parametrize("clip", [0.0, -1.0])
def test_signed_report_without_a_positive_clipping_norm_fails(run: Path, capsys, clip) -> None:
    """A report whose clipping norm C is not positive states no sensitivity bound: even signed,
    and with the server's copy agreeing, it is a finding."""
    records = records_of(run)
    last = max(r["round"] for r in records if r.get("institution") == "hospital-a")
    line = line_of(records, "hospital-a", last)  # the last: no later report chains to it
    rec = records[line - 1]
    body = json.loads(rec["signed_report"]["body"])
    body["max_grad_norm"] = clip
    key = load_private_key((run / "clients" / "hospital-a" / "report-signing.key").read_bytes())
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    signature = key.sign(SIGNATURE_CONTEXT + text.encode(), ec.ECDSA(hashes.SHA384()))
    rec["signed_report"] = {"body": text, "signature": base64.b64encode(signature).decode()}
    rec["max_grad_norm"] = clip
    rechain(run, records)
    code, out, err = ferry_audit(capsys, run, "--no-plot")
    assert code == 1, out
    assert "hospital-a: " in out and f"line {line}" in out and "max_grad_norm" in out


def test_replay_of_extreme_mechanisms_is_a_failure_value_not_an_exception() -> None:
    from ferry.server.audit_replay import ReplayFailure, replay_all

    jobs = {
        ((MechanismSegment(1e-6, 0.05, 10),), (DELTA,)),
        ((MechanismSegment(1.0, 0.05, 10**18),), (DELTA,)),
        ((MechanismSegment(1e-300, 0.05, 10),), (DELTA,)),
    }
    results = replay_all(jobs)
    assert all(isinstance(r, ReplayFailure) for r in results.values())


@pytest.mark.slow
def test_honest_small_simulation_audits_clean_with_its_own_keys(
    tmp_path: Path, capsys, without_ray
) -> None:
    """`ferry simulate` then `ferry audit RUN`: each virtual institution signed with the key
    in its state directory, the audit finds those keys and the receipts match the ledger
    (the federation runs in this process: the point is the keys, not Ray)."""
    from ferry.cli import main

    run = tmp_path / "run"
    args = ["--examples", "400", "--clients", "3", "--rounds", "2", "--weights", "random"]
    assert main(["simulate", *args, "--out", str(run)]) == 0
    code, out, _ = ferry_audit(capsys, run, "--no-plot", "--receipts", run / "clients")
    assert code == 0, out
    report = audit.audit_ledger(run, receipts=[run / "clients"])
    assert len(report.institutions) == 3 and report.ok
    for inst in report.institutions:
        assert inst.rounds == 2
        assert inst.epsilon_reported == pytest.approx(inst.epsilon_replayed, rel=0.01)
    for receipts in (run / "clients").glob("*/receipts.jsonl"):
        assert len(receipts.read_text().splitlines()) == 2


def test_deployed_institution_signs_with_its_ferry_certs_key(tmp_path: Path, capsys) -> None:
    """Deployment: `ferry client --key` hands the SuperNode key to the ClientApp (node config
    ``report-key``), which signs with it; the auditor verifies with ``ferry certs``' NAME.pub."""
    import tomllib

    from ferry.client.institution_settings import settings_for_deployment
    from ferry.client.receipts import LOCAL_KEY, sign_and_keep
    from ferry.client.supernode import InstitutionSettings, write_node_config
    from ferry.server.certs import make_auth_key_pair

    key, _ = make_auth_key_pair(tmp_path / "institutions", "clinic-b")
    state = tmp_path / "state"
    state.mkdir()
    node_config = write_node_config(
        InstitutionSettings("127.0.0.1:9092", tmp_path, state, "clinic-b", 3.0, 1e-5, key=key)
    )
    settings = settings_for_deployment(tomllib.loads(node_config.read_text()))
    assert settings.report_key == key.resolve()

    fields = honest_fields()["clinic-b"][0]
    signed = sign_and_keep(settings.state_dir, "clinic-b", _client_report(fields), key)
    assert not (state / LOCAL_KEY).exists()  # the registered identity signed, no local key
    run = tmp_path / "run"
    run.mkdir()
    ledger = Ledger(run)
    ledger.append("run_started", run_id="run-a", config={}, backbone_sha256="ab" * 32)
    ledger.append(
        "client_trained",
        **fields,
        signed_report={"body": signed["signed-report"], "signature": signed["signature"]},
    )
    code, out, _ = ferry_audit(capsys, run, "--no-plot")
    assert code == 1 and "FAIL: no public keys" in out  # nothing in the run to trust
    code, out, _ = ferry_audit(capsys, run, "--no-plot", "--keys", tmp_path / "institutions")
    assert code == 0, out


def _client_report(fields: dict) -> dict:
    return {
        "run-id": fields["run_id"],
        "round": fields["round"],
        "institution": fields["institution"],
        "unit": "one example (record) at one institution",
        "non-private": False,
        "dp-event": fields["dp_event"],
        "sampling": "poisson",
        "noise-multiplier": fields["noise_multiplier"],
        "sample-rate": fields["sample_rate"],
        "steps": fields["steps"],
        "max-grad-norm": 1.0,
        "batch-size": BATCH,
        "local-epochs": 1,
        "examples": fields["examples"],
        "delta": DELTA,
        "epsilon": fields["epsilon_reported"],
        "accountant": "prv",
        "accountant-library": "opacus 1.6.0",
        "rounds": fields["client_rounds"],
        "budget-epsilon": fields["budget_epsilon"],
        "budget-delta": DELTA,
    }
