"""Attacks on an institution's budget, played by the operator (who picks every config and
schedules rounds) and by accidents on the institution's disk.

The institution's privacy state is the ground truth of its spend: concurrent rounds must not
pass the guard on a stale history or lose a write; a deleted, emptied, truncated or foreign
state must be refused with a one-line fix, never read as a fresh budget; a server-chosen
noise multiplier too small to account (σ = 0.01 made the PRV accountant ask for 26 GiB) or
an absurd number of local epochs must be refused before any accountant runs, as a refusal.

Names of the new API are imported inside the tests that need them, so that this file also
runs against the code before the fix and shows each attack succeeding there.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shutil
import threading
import time
import traceback
from pathlib import Path

import pytest

from ferry.client import institution_settings, runtime
from ferry.client.backbone_cache import BackboneCache
from ferry.client.budget_guard import Budget, BudgetExceeded, check_round
from ferry.client.privacy_state import PrivacyState
from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.heads import build_head
from ferry.common.privacy.accounting import MechanismSegment, epsilon_for_history
from ferry.common.training_defaults import round_plan

DELTA = 1e-5
STATE, BACKUP = "privacy_state.json", "privacy_state.json.bak"
RUN = RunConfig(examples=400, clients=2, rounds=4, epsilon=3.0, batch_size=32, local_epochs=1)
SEGMENT = MechanismSegment(1.1, 0.1, 20)  # an earlier honest round, as on disk


def _settings(root: Path, artifact, budget: Budget | None, name: str = "hospital-000"):
    settings = institution_settings.ClientSettings(
        name, root / "state", root / "cache", 0, 2, budget
    )
    BackboneCache(settings.cache_dir).store(artifact.manifest, artifact.tensors, artifact.sha256)
    return settings


def _head(artifact) -> dict:
    head = build_head("linear", int(artifact.manifest["feature_dim"]), 4)
    return {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}


def _request(artifact, rnd: int = 1, run: RunConfig = RUN) -> runtime.RoundRequest:
    return runtime.RoundRequest(run, rnd, artifact.sha256, 4, "run-a")


def _spend(state_dir: Path, institution: str, rounds: int) -> None:
    """``rounds`` earlier rounds on disk, written the way the client writes them."""
    for rnd in range(1, rounds + 1):
        PrivacyState.open(state_dir, institution).record(SEGMENT, round=rnd, run="run-0")


def _files(state_dir: Path) -> dict[str, bytes]:
    names = (STATE, BACKUP)
    return {p.name: p.read_bytes() for p in sorted(state_dir.iterdir()) if p.name in names}


def _planned(settings, artifact) -> MechanismSegment:
    """The mechanism one round of RUN runs at this institution (warms the feature cache)."""
    req = _request(artifact)
    n = runtime._local_data(settings, req).part.num_train
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    q, steps = round_plan(n, RUN.batch_size, RUN.local_epochs)
    # No report-signing key is made here: a key without a state or receipts is a lost state
    # (the racing rounds make it safely: tests/test_key_and_cache_races.py).
    return MechanismSegment(runtime.noise_for(req, n, settings.state_dir), q, steps)


def _budget_for_two_rounds(planned: MechanismSegment) -> Budget:
    two = epsilon_for_history([planned] * 2, DELTA)
    three = epsilon_for_history([planned] * 3, DELTA)
    budget = Budget(two + (three - two) / 10, DELTA)
    assert two <= budget.epsilon < three
    return budget


def _assert_one_line_fix(exc: BaseException, *needles: str) -> None:
    msg = str(exc)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


# --- concurrent rounds of one institution --------------------------------------------------


@pytest.mark.slow
def test_concurrent_rounds_in_threads_never_exceed_the_budget_nor_lose_a_spend(tmp_path, artifact):
    settings = _settings(tmp_path, artifact, None)
    budget = _budget_for_two_rounds(_planned(settings, artifact))
    settings = dataclasses.replace(settings, budget=budget)
    barrier = threading.Barrier(4)
    released, refused, crashed = [], [], []

    def one_round(rnd: int) -> None:
        barrier.wait()
        try:
            _, _, report = runtime.train_round(settings, _request(artifact, rnd), _head(artifact))
            released.append(report)
        except BudgetExceeded as exc:
            refused.append(exc)
        except Exception:  # noqa: BLE001 - reported below
            crashed.append(traceback.format_exc())

    threads = [threading.Thread(target=one_round, args=(rnd,)) for rnd in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not crashed, crashed
    state = PrivacyState.open(settings.state_dir, settings.institution)
    # Two rounds fit; the operator's four simultaneous rounds must not all pass the guard ...
    assert len(released) == 2 and len(refused) == 2
    # ... and every round that released an update is on disk, within the budget.
    assert state.rounds() == len(released)
    assert state.epsilon(DELTA) <= budget.epsilon


def _round_in_a_process(settings, req, head, barrier, results) -> None:
    barrier.wait()
    try:
        runtime.train_round(settings, req, head)
        results.put("released")
    except BudgetExceeded:
        results.put("refused")
    except Exception as exc:  # noqa: BLE001 - the parent asserts on it
        results.put(f"crashed: {exc!r}")


@pytest.mark.slow
def test_concurrent_rounds_in_processes_never_exceed_the_budget_nor_lose_a_spend(
    tmp_path, artifact
):
    settings = _settings(tmp_path, artifact, None)
    budget = _budget_for_two_rounds(_planned(settings, artifact))
    settings = dataclasses.replace(settings, budget=budget)
    # Forked from a warm server, as a deployed institution's tasks are (client.task_launcher).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["ferry.client.runtime"])
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(
            target=_round_in_a_process,
            args=(settings, _request(artifact, rnd), _head(artifact), barrier, results),
        )
        for rnd in (1, 2, 3, 4)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)

    assert not [o for o in outcomes if o.startswith("crashed")], outcomes
    state = PrivacyState.open(settings.state_dir, settings.institution)
    assert outcomes.count("released") == 2, outcomes
    assert state.rounds() == 2
    assert state.epsilon(DELTA) <= budget.epsilon


# --- a lost, emptied, truncated or foreign state ---------------------------------------------


def test_deleted_state_is_refused_with_the_restore_command_and_nothing_is_rewritten(
    tmp_path, artifact
):
    settings = _settings(tmp_path, artifact, Budget(50.0, DELTA))
    _spend(settings.state_dir, settings.institution, 3)
    before = _files(settings.state_dir)
    (settings.state_dir / STATE).unlink()

    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, _request(artifact), _head(artifact))

    _assert_one_line_fix(err.value, "missing", "3 rounds", f"cp {settings.state_dir / BACKUP}")
    assert not (settings.state_dir / STATE).exists()  # never recreated as a fresh budget
    assert _files(settings.state_dir) == {BACKUP: before[BACKUP]}


def test_emptied_state_is_refused_and_nothing_is_rewritten(tmp_path, artifact):
    settings = _settings(tmp_path, artifact, Budget(50.0, DELTA))
    _spend(settings.state_dir, settings.institution, 2)
    (settings.state_dir / STATE).write_text("")
    before = _files(settings.state_dir)

    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, _request(artifact), _head(artifact))

    _assert_one_line_fix(err.value, "empty", "2 rounds", "cp ")
    assert _files(settings.state_dir) == before


def test_emptied_state_without_its_backup_is_still_refused(tmp_path, artifact):
    settings = _settings(tmp_path, artifact, Budget(50.0, DELTA))
    _spend(settings.state_dir, settings.institution, 2)
    (settings.state_dir / STATE).write_text("")
    (settings.state_dir / BACKUP).unlink(missing_ok=True)

    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, _request(artifact), _head(artifact))

    _assert_one_line_fix(err.value, "empty", "restore")
    assert (settings.state_dir / STATE).read_text() == ""


@pytest.mark.slow
def test_both_copies_deleted_are_refused_while_the_receipts_record_private_rounds(
    tmp_path, artifact
):
    """One ``rm privacy_state.json*`` left receipts.jsonl (the signed record of every round)
    and the signing key, yet the next round started a fresh budget."""
    settings = _settings(tmp_path, artifact, Budget(50.0, DELTA))
    for rnd in (1, 2):
        runtime.train_round(settings, _request(artifact, rnd), _head(artifact))
    receipts = (settings.state_dir / "receipts.jsonl").read_bytes()
    for name in (STATE, BACKUP):
        (settings.state_dir / name).unlink()

    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, _request(artifact, 3), _head(artifact))

    _assert_one_line_fix(err.value, "receipts.jsonl", "2 private rounds", "restore", BACKUP)
    assert not (settings.state_dir / STATE).exists()  # never recreated as a fresh budget
    assert (settings.state_dir / "receipts.jsonl").read_bytes() == receipts


def test_both_copies_deleted_with_only_the_signing_key_left_are_refused(tmp_path, artifact):
    settings = _settings(tmp_path, artifact, Budget(50.0, DELTA))
    runtime.train_round(settings, _request(artifact), _head(artifact))
    for name in (STATE, BACKUP, "receipts.jsonl"):
        (settings.state_dir / name).unlink()

    with pytest.raises(FerryError) as err:
        PrivacyState.open(settings.state_dir, settings.institution)

    _assert_one_line_fix(err.value, "report-signing.key", "restore")


def test_receipts_of_non_private_rounds_alone_are_not_a_lost_state(tmp_path):
    """A simulated non-private run (no budget) signs receipts but spends nothing: its
    directory is still a fresh budget."""
    from ferry.client.receipts import sign_and_keep

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    report = {
        "run-id": "r",
        "round": 1,
        "institution": "hospital-a",
        "unit": "example",
        "non-private": True,
        "dp-event": {"module_name": "dp_accounting.dp_event", "class_name": "NonPrivateDpEvent"},
        "sampling": "poisson",
        "noise-multiplier": 0.0,
        "sample-rate": 1.0,
        "steps": 0,
        "max-grad-norm": 1.0,
        "batch-size": 10,
        "local-epochs": 1,
        "examples": 100,
        "delta": DELTA,
        "epsilon": float("inf"),
        "accountant": "prv",
        "accountant-library": "opacus",
        "rounds": 0,
    }
    sign_and_keep(state_dir, "hospital-a", report)
    assert (state_dir / "receipts.jsonl").read_bytes().count(b"\n") == 1
    assert PrivacyState.open(state_dir, "hospital-a").rounds() == 0


def test_state_truncated_to_fewer_entries_is_refused_and_nothing_is_rewritten(tmp_path, artifact):
    settings = _settings(tmp_path, artifact, Budget(50.0, DELTA))
    _spend(settings.state_dir, settings.institution, 4)
    path = settings.state_dir / STATE
    data = json.loads(path.read_text())
    data["entries"] = data["entries"][:1]  # still a valid file, one quarter of the spend
    path.write_text(json.dumps(data))
    before = _files(settings.state_dir)

    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, _request(artifact), _head(artifact))

    _assert_one_line_fix(err.value, "disagree", "1 rounds", "4 rounds", "cp ")
    assert _files(settings.state_dir) == before


def test_state_with_an_edited_entry_is_refused(tmp_path, artifact):
    settings = _settings(tmp_path, artifact, Budget(50.0, DELTA))
    _spend(settings.state_dir, settings.institution, 2)
    for name in (STATE, BACKUP):  # both copies edited alike: only the chain can tell
        path = settings.state_dir / name
        if path.exists():
            data = json.loads(path.read_text())
            data["entries"][0]["noise_multiplier"] = 100.0  # claims far less spend
            path.write_text(json.dumps(data))

    with pytest.raises(FerryError) as err:
        PrivacyState.open(settings.state_dir, settings.institution)
    _assert_one_line_fix(err.value, "hash chain", "restore")


@pytest.mark.parametrize("with_own_history", [False, True])
def test_another_institutions_state_copied_in_is_refused_naming_both(
    tmp_path, artifact, with_own_history
):
    settings = _settings(tmp_path, artifact, Budget(50.0, DELTA))
    other = tmp_path / "hospital-007-state"
    _spend(other, "hospital-007", 1)
    if with_own_history:
        _spend(settings.state_dir, settings.institution, 3)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(other / STATE, settings.state_dir / STATE)  # an almost unspent budget
    before = _files(settings.state_dir)

    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, _request(artifact), _head(artifact))

    _assert_one_line_fix(err.value, "'hospital-007'", "'hospital-000'", "--state-dir")
    assert _files(settings.state_dir) == before


# --- crash points of the write order (main copy, then backup) --------------------------------


def test_crash_between_the_two_writes_takes_the_longer_copy_and_repairs_the_backup(
    tmp_path, monkeypatch
):
    import ferry.client.privacy_state as ps

    _spend(tmp_path, "hospital-000", 2)
    real = ps._install

    def crash_on_backup(target, payload):
        if target.name == BACKUP:
            raise OSError(5, "crash")
        real(target, payload)

    monkeypatch.setattr(ps, "_install", crash_on_backup)
    with pytest.raises(FerryError, match="not released"):
        PrivacyState.open(tmp_path, "hospital-000").record(SEGMENT, round=3, run="run-0")
    monkeypatch.setattr(ps, "_install", real)

    state = PrivacyState.open(tmp_path, "hospital-000")
    assert state.rounds() == 3  # over-counts the round that may never have trained
    assert (tmp_path / BACKUP).read_bytes() == (tmp_path / STATE).read_bytes()


def test_crash_between_the_writes_of_the_first_round_is_accepted(tmp_path):
    _spend(tmp_path, "hospital-000", 1)
    (tmp_path / BACKUP).unlink()  # the backup's rename never happened

    assert PrivacyState.open(tmp_path, "hospital-000").rounds() == 1
    assert (tmp_path / BACKUP).read_bytes() == (tmp_path / STATE).read_bytes()


def test_main_copy_one_entry_behind_its_backup_is_repaired_from_the_backup(tmp_path):
    _spend(tmp_path, "hospital-000", 3)
    data = json.loads((tmp_path / STATE).read_text())
    data["entries"] = data["entries"][:-1]
    (tmp_path / STATE).write_text(json.dumps(data))

    assert PrivacyState.open(tmp_path, "hospital-000").rounds() == 3  # the longer copy wins


def test_crash_before_the_main_rename_leaves_the_old_state_and_stray_temp_files_are_ignored(
    tmp_path,
):
    _spend(tmp_path, "hospital-000", 2)
    (tmp_path / f"{STATE}.4242.deadbeef.tmp").write_text('{"half a fi')

    state = PrivacyState.open(tmp_path, "hospital-000")
    assert state.rounds() == 2
    state.record(SEGMENT, round=3, run="run-0")
    assert PrivacyState.open(tmp_path, "hospital-000").rounds() == 3


def test_round_that_crashes_during_training_stays_counted(tmp_path, artifact, monkeypatch):
    settings = _settings(tmp_path, artifact, Budget(50.0, DELTA))

    def crash(*args, **kwargs):
        raise RuntimeError("killed during training")

    monkeypatch.setattr(runtime, "train_tail", crash)
    with pytest.raises(RuntimeError):
        runtime.train_round(settings, _request(artifact), _head(artifact))

    # Reserved before training: the noise may have been drawn and used; never under-count.
    assert PrivacyState.open(settings.state_dir, settings.institution).rounds() == 1


def test_state_written_before_backups_existed_is_read_and_upgraded(tmp_path):
    legacy = {"institution": "hospital-000", "entries": [{**SEGMENT.as_dict(), "round": 1}]}
    (tmp_path / STATE).write_text(json.dumps(legacy))

    state = PrivacyState.open(tmp_path, "hospital-000")
    assert state.rounds() == 1
    state.record(SEGMENT, round=2, run="run-0")
    assert PrivacyState.open(tmp_path, "hospital-000").rounds() == 2
    assert (tmp_path / BACKUP).read_bytes() == (tmp_path / STATE).read_bytes()


# --- hostile mechanisms: tiny sigma, absurd steps --------------------------------------------


@pytest.mark.parametrize(
    ("sigma", "local_epochs"),
    # Before the fix: 50 s and 7.4 GB of RSS for ε = inf; a 26 GiB allocation; 13 PiB.
    [(0.01, 1), (0.01, 20), (1e-6, 1)],
)
def test_server_chosen_tiny_sigma_is_refused_quickly_as_a_refusal(
    tmp_path, artifact, sigma, local_epochs
):
    settings = _settings(tmp_path, artifact, Budget(3.0, DELTA))
    run = dataclasses.replace(RUN, noise_multiplier=sigma, local_epochs=local_epochs)
    runtime._local_data(settings, _request(artifact, run=run))  # features: not what is timed

    start = time.perf_counter()
    with pytest.raises(BudgetExceeded) as err:
        runtime.train_round(settings, _request(artifact, run=run), _head(artifact))
    elapsed = time.perf_counter() - start

    assert elapsed < 10, f"refusal took {elapsed:.1f}s"
    assert err.value.kind == "budget"  # the client app replies with a refusal, not an error
    _assert_one_line_fix(err.value, "cannot fit", "larger noise multiplier")
    assert PrivacyState.open(settings.state_dir, settings.institution).rounds() == 0


def test_tiny_sigma_is_refused_before_the_accountant_even_under_an_absurd_budget():
    from ferry.common.privacy.accounting import UnaccountableMechanism

    tiny = MechanismSegment(0.01, 0.1, 100)
    start = time.perf_counter()
    with pytest.raises(BudgetExceeded, match="grid points"):
        check_round([], tiny, DELTA, Budget(1e9, DELTA))
    with pytest.raises(UnaccountableMechanism):
        epsilon_for_history([tiny], DELTA)  # what an auditor replaying it meets
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("derived", [False, True])
def test_absurd_local_epochs_are_refused_quickly(tmp_path, artifact, derived):
    settings = _settings(tmp_path, artifact, Budget(3.0, DELTA))
    run = dataclasses.replace(RUN, local_epochs=10**9, noise_multiplier=None if derived else 1.0)
    runtime._local_data(settings, _request(artifact, run=run))

    start = time.perf_counter()
    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, _request(artifact, run=run), _head(artifact))

    if isinstance(err.value, BudgetExceeded):
        _assert_one_line_fix(err.value, "steps", "fewer local epochs")
    else:  # refused earlier still: run settings are bounded where they enter (RunConfig)
        _assert_one_line_fix(err.value, "--local-epochs", "at most")
    assert time.perf_counter() - start < 10
    assert PrivacyState.open(settings.state_dir, settings.institution).rounds() == 0


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.5, 3.0, 10.0])
@pytest.mark.parametrize(
    ("q", "steps_per_round", "rounds"),
    [(1 / 7, 7, 5), (0.02, 50, 5), (1 / 313, 313 * 2, 20)],
)
def test_honest_derived_sigma_is_never_refused(target, q, steps_per_round, rounds):
    """The last round of a run whose sigma is derived for ``target`` passes the guard (the
    floor and the accountant's grid only grow with the history, so earlier rounds do too)."""
    from ferry.common.privacy.accounting import (
        MAX_PRV_GRID_POINTS,
        compact_history,
        epsilon_lower_bound,
        noise_multiplier_for_target,
        prv_grid_points,
    )

    sigma = noise_multiplier_for_target(target, DELTA, q, steps_per_round * rounds)
    seg = MechanismSegment(sigma, q, steps_per_round)
    whole = compact_history([seg] * rounds)
    assert epsilon_lower_bound(whole, DELTA) < target / 2
    assert prv_grid_points(whole, DELTA) < MAX_PRV_GRID_POINTS / 10
    assert check_round([seg] * (rounds - 1), seg, DELTA, Budget(target, DELTA)) <= target


@pytest.mark.slow
def test_epsilon_floor_is_below_the_prv_epsilon_and_tight_for_one_step():
    from ferry.common.privacy.accounting import epsilon_lower_bound

    for sigma, q in ((0.5, 0.01), (0.5, 1.0), (1.0, 0.2), (2.0, 0.01)):
        one = MechanismSegment(sigma, q, 1)
        prv = epsilon_for_history([one], DELTA)
        assert prv - 0.03 <= epsilon_lower_bound([one], DELTA) <= prv  # PRV's error: 0.01
        fifty = dataclasses.replace(one, steps=50)
        assert epsilon_lower_bound([fifty], DELTA) <= epsilon_for_history([fifty], DELTA)
