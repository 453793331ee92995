"""Attacks on a client by the operator, who chooses every value of every message's run config.

Each hostile request must end in a one-line refusal (:class:`FerryError`) that spends nothing,
never a traceback and never a round trained without its spend:

- ``non-private`` together with a noise multiplier trained the DP mechanism but recorded no
  spend, so every such round passed the budget afresh;
- hostile numbers (derived-noise epsilon -1, NaN or 1e-9, delta NaN, sigma 1e300, batch size 0,
  clipping norm NaN after the spend was reserved, seed -1 or 2**70, device 'meta', -1 classes,
  round 10**30) crashed the client;
- batch size 1 and 50 local epochs (1e6 steps) on 20,000 examples passed the guard and then
  allocated every Poisson mask of the round at once (75 GiB);
- an evaluate message with its own test fraction and seed moved a deployed institution's
  training records into its "held-out" split, whose statistics leave without DP;
- a deployed institution's data error (a private cell value, a row number) travelled to the
  server verbatim in the refusal.

Names of the new API are imported inside the tests that need them, so that this file also
runs against the code before the fix and shows each attack succeeding there.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ferry.client import institution_settings, runtime
from ferry.client.backbone_cache import BackboneCache
from ferry.client.budget_guard import Budget
from ferry.client.dp_trainer import DPTrainConfig
from ferry.client.privacy_state import PrivacyState
from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.heads import build_head
from ferry.common.training_defaults import round_plan

DELTA = 1e-5
RUN = RunConfig(examples=400, clients=2, rounds=3, noise_multiplier=1.0)
NAN, INF = math.nan, math.inf


BUDGET = Budget(8.0, DELTA)


def _settings(root: Path, artifact, budget: Budget | None = BUDGET):
    settings = institution_settings.ClientSettings(
        "hospital-000", root / "state", root / "cache", 0, 2, budget
    )
    BackboneCache(settings.cache_dir).store(artifact.manifest, artifact.tensors, artifact.sha256)
    return settings


def _head(artifact, classes: int = 4) -> dict:
    head = build_head("linear", int(artifact.manifest["feature_dim"]), classes)
    return {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}


def _request(artifact, run: RunConfig = RUN, **changes) -> runtime.RoundRequest:
    values = {"run": run, "round": 1, "backbone_sha256": artifact.sha256, "num_classes": 4}
    return runtime.RoundRequest(**{**values, "run_id": "run-a", **changes})


def _spent_nothing(settings) -> None:
    assert PrivacyState.open(settings.state_dir, settings.institution).rounds() == 0
    receipts = settings.state_dir / "receipts.jsonl"
    assert not receipts.exists() or not receipts.read_bytes().strip()


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


# --- F1: one definition of "private" -------------------------------------------------------


def test_non_private_round_with_noise_is_refused_not_trained_unaccounted(tmp_path, artifact):
    """The attack: ``non-private`` + sigma 4 trained with noise and recorded no spend; 20 such
    rounds reached epsilon 2.81 on a budget of 2 with 0 rounds on disk."""
    settings = _settings(tmp_path, artifact, Budget(2.0, DELTA))
    run = RunConfig(examples=400, clients=2, rounds=3, non_private=True, noise_multiplier=4.0)
    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, _request(artifact, run), _head(artifact))
    _one_line(err.value)
    _spent_nothing(settings)


def test_contradictory_non_private_with_noise_is_refused_by_both_configs():
    with pytest.raises(FerryError, match="non-private"):
        RunConfig(non_private=True, noise_multiplier=4.0).validate()
    with pytest.raises(FerryError, match="non-private"):
        DPTrainConfig(noise_multiplier=4.0, non_private=True).validate()
    RunConfig(non_private=True, noise_multiplier=0.0).validate()  # consistent: allowed
    assert DPTrainConfig(noise_multiplier=1.0).private
    assert not DPTrainConfig(noise_multiplier=0.0, non_private=True).private


def test_institution_with_a_budget_refuses_a_non_private_round_in_one_line(tmp_path, artifact):
    settings = _settings(tmp_path, artifact, Budget(8.0, DELTA))
    run = RunConfig(examples=400, clients=2, rounds=3, non_private=True)
    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, _request(artifact, run), _head(artifact))
    assert "non-private" in _one_line(err.value)
    _spent_nothing(settings)


def test_simulated_non_private_round_without_a_budget_still_trains(tmp_path, artifact):
    settings = _settings(tmp_path, artifact, budget=None)
    run = RunConfig(examples=400, clients=2, rounds=3, non_private=True)
    for rnd in (1, 2):  # twice: its receipts are not mistaken for a lost state
        _, _, report = runtime.train_round(
            settings, _request(artifact, run, round=rnd), _head(artifact)
        )
        assert report["non-private"] is True
    assert PrivacyState.open(settings.state_dir, settings.institution).rounds() == 0


# --- F9: every hostile value is a one-line refusal that spends nothing -------------------

HOSTILE_RUNS = [
    {"epsilon": -1.0, "noise_multiplier": None},
    {"epsilon": NAN, "noise_multiplier": None},
    {"delta": NAN, "noise_multiplier": None},
    {"delta": NAN},
    {"max_grad_norm": NAN},  # crashed after the spend was reserved
    {"max_grad_norm": INF},
    {"noise_multiplier": 1e300},
    {"lr": NAN},
    {"batch_size": 0},
    {"test_fraction": NAN},
    {"test_fraction": 0.0},
    {"seed": -1},
    {"seed": 2**70},
    {"device": "meta"},
    {"device": "mps"},
    {"device": "cuda:x"},
    {"max_physical_batch": -1},
    {"clients": 0},
]
HOSTILE_REQUESTS = [{"num_classes": -1}, {"num_classes": 1}, {"round": -1}, {"round": 10**30}]


@pytest.mark.parametrize(
    "run_changes, request_changes",
    [(c, {}) for c in HOSTILE_RUNS] + [({}, c) for c in HOSTILE_REQUESTS],
    ids=[repr(c) for c in HOSTILE_RUNS + HOSTILE_REQUESTS],
)
def test_hostile_value_is_a_one_line_refusal_that_spends_nothing(
    tmp_path, artifact, run_changes, request_changes
):
    settings = _settings(tmp_path, artifact)
    req = _request(artifact, dataclasses.replace(RUN, **run_changes), **request_changes)
    try:
        runtime.train_round(settings, req, _head(artifact))
    except FerryError as exc:
        _one_line(exc)
    except Exception as exc:  # the attack: a traceback in the ClientApp
        pytest.fail(f"{run_changes or request_changes} crashed the client: {exc!r}")
    else:
        pytest.fail(f"{run_changes or request_changes} was trained")
    _spent_nothing(settings)


@pytest.mark.slow
def test_derived_noise_for_an_unreachable_epsilon_is_a_refusal(tmp_path, artifact):
    """epsilon 1e-9: no noise multiplier reaches it; the accountant's ValueError became a
    traceback."""
    settings = _settings(tmp_path, artifact)
    run = dataclasses.replace(RUN, epsilon=1e-9, noise_multiplier=None)
    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, _request(artifact, run), _head(artifact))
    _one_line(err.value)
    _spent_nothing(settings)


def test_message_is_validated_where_it_arrives(artifact):
    record = {**RUN.to_record(), "round": 1, "backbone-sha256": artifact.sha256}
    for hostile in (
        {"num-classes": 4, "max-grad-norm": NAN},
        {"num-classes": 4, "seed": -1},
        {"num-classes": 4, "device": "meta"},
        {"num-classes": -1},
        {"num-classes": "four"},
        {"num-classes": 4, "round": 10**30},
        {},  # no num-classes at all
    ):
        with pytest.raises(FerryError):
            runtime.request_from_record({**record, **hostile})
    assert runtime.request_from_record({**record, "num-classes": 4}).num_classes == 4


# --- F10: bounded memory and bounded work ------------------------------------------------


def test_linear_dp_draws_poisson_masks_in_bounded_blocks(monkeypatch):
    """The attack allocated ``torch.rand((steps, n))`` at once: 1e6 x 20,000 was 75 GiB.
    Here 4,000 steps on 5,000 examples (2e7 draws) must come in blocks of at most 2**24."""
    from ferry.client.linear_dp import train_linear

    sizes = []
    real_rand = torch.rand

    def spy(*args, **kwargs):
        out = real_rand(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "rand", spy)
    n, steps = 5_000, 4_000
    layer = torch.nn.Linear(3, 2)
    x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
    total, seen, segment = train_linear(
        layer,
        x,
        y,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=1 / 5_000,
        steps=steps,
        lr=0.1,
        task="classification",
    )
    assert sum(sizes) == n * steps  # every step still gets its own Poisson draw
    assert max(sizes) <= 1 << 24
    assert segment.steps == steps and 0 < seen < 3 * steps  # about one example a step


def test_round_of_absurd_work_is_refused_before_the_reservation(tmp_path, artifact, monkeypatch):
    from ferry.client import budget_guard

    _, steps = round_plan(20_000, 1, 50)  # the red team's 1e6 steps on 20,000 examples
    with pytest.raises(FerryError, match="example-steps"):
        budget_guard.check_steps(steps, 20_000)
    # Wired into the round, before the spend: with a tiny work limit the round is refused.
    monkeypatch.setattr(budget_guard, "MAX_EXAMPLE_STEPS_PER_ROUND", 100, raising=False)
    settings = _settings(tmp_path, artifact)
    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, _request(artifact), _head(artifact))
    _one_line(err.value)
    _spent_nothing(settings)


# --- F2, F3: a deployed institution's own split, and its data errors stay local ------------


def _table(root: Path, label_of_first: str = "0") -> Path:
    rng = np.random.default_rng(0)
    rows = ["age,bmi,pressure,outcome"]
    for i in range(300):
        label = label_of_first if i == 0 else str(i % 2)
        a, b, c = rng.normal(size=3)
        rows.append(f"{a:.4f},{b:.4f},{c:.4f},{label}")
    path = root / "patients.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _tabular_run(csv: Path, **changes) -> RunConfig:
    values = {
        "scenario": "hospital-tabular",
        "data": str(csv),
        "label_column": "outcome",
        "task": "classification",
        "noise_multiplier": 1.0,
    }
    if "classes" in {f.name for f in dataclasses.fields(RunConfig)}:
        values["classes"] = "0,1"
    return RunConfig(**{**values, **changes})


def _deployed(root: Path, csv: Path):
    from ferry.server.pretrain import random_artifact

    art = random_artifact("tabular-mlp", input_shape=(3,))
    node_config = {
        "institution": "hospital-a",
        "data-path": str(csv),
        "state-dir": str(root / "state"),
        "cache-dir": str(root / "cache"),
        "budget-epsilon": 3.0,
        "budget-delta": DELTA,
    }
    settings = institution_settings.settings_for_deployment(node_config)
    BackboneCache(settings.cache_dir).store(art.manifest, art.tensors, art.sha256)
    return settings, art


def test_evaluate_message_cannot_move_a_deployed_institutions_training_records_into_held_out(
    tmp_path,
):
    """The attack: test-fraction 0.95 in the evaluate message made 313 of 334 training
    records "held-out", whose exact statistics then came back (not DP)."""
    settings, art = _deployed(tmp_path, _table(tmp_path))

    def held_out(run: RunConfig) -> set[bytes]:
        req = runtime.RoundRequest(run, 1, art.sha256, 2, "run-a")
        return {row.tobytes() for row in runtime._local_data(settings, req).part.test_x}

    honest = held_out(_tabular_run(Path(settings.data_path)))
    for hostile in ({"test_fraction": 0.95}, {"seed": 12345}, {"test_fraction": 0.95, "seed": 7}):
        assert held_out(_tabular_run(Path(settings.data_path), **hostile)) == honest, hostile
    assert 0.1 < len(honest) / 300 < 0.3  # the institution's own 0.2


def test_deployed_split_is_pinned_with_a_secret_salt_and_cannot_change(tmp_path):
    from ferry.client.held_out import SPLIT_FILE, pin_split

    a = pin_split(tmp_path / "a", 0.25)
    assert pin_split(tmp_path / "a") == a == pin_split(tmp_path / "a", 0.25)
    assert pin_split(tmp_path / "b").salt != a.salt  # drawn from OS entropy, not a seed
    assert pin_split(tmp_path / "b").test_fraction == 0.2
    with pytest.raises(FerryError, match="pinned") as err:
        pin_split(tmp_path / "a", 0.5)
    _one_line(err.value)
    (tmp_path / "a" / SPLIT_FILE).write_text("{broken")
    with pytest.raises(FerryError, match="restore"):
        pin_split(tmp_path / "a")


def test_ferry_client_writes_its_test_fraction_into_the_node_config(tmp_path):
    from ferry.client.supernode import InstitutionSettings, write_node_config

    state = tmp_path / "state"
    state.mkdir()
    s = InstitutionSettings("127.0.0.1:9092", tmp_path, state, "clinic-a", 3.0, DELTA)
    text = write_node_config(dataclasses.replace(s, test_fraction=0.3)).read_text()
    assert "test-fraction = 0.3" in text
    with pytest.raises(FerryError, match="pinned"):
        write_node_config(dataclasses.replace(s, test_fraction=0.2))


def test_deployed_data_error_reaches_the_server_as_one_generic_line(tmp_path, capsys):
    """The attack: the operator picks a task that does not fit; the refusal quoted the
    private cell 'HIV+' and its row."""
    settings, art = _deployed(tmp_path, _table(tmp_path, label_of_first="HIV+"))
    for i, run in enumerate(
        (
            _tabular_run(Path(settings.data_path)),
            _tabular_run(Path(settings.data_path), task="regression", classes="")
            if "classes" in {f.name for f in dataclasses.fields(RunConfig)}
            else _tabular_run(Path(settings.data_path), task="regression"),
        )
    ):
        # each run at a fresh institution: its first message pins the data settings
        settings = dataclasses.replace(settings, state_dir=tmp_path / f"state-{i}")
        req = runtime.RoundRequest(run, 1, art.sha256, 2, "run-a")
        with pytest.raises(FerryError) as err:
            runtime.train_round(settings, req, {})
        reason = _one_line(err.value)
        assert "HIV+" not in reason and "line" not in reason, reason
        assert "own log" in reason
    assert "HIV+" in capsys.readouterr().err  # the institution's own log has the details
    _spent_nothing(settings)


def test_simulated_data_error_keeps_its_details_for_the_researcher(tmp_path, artifact):
    from ferry.server.pretrain import random_artifact

    csv = _table(tmp_path, label_of_first="HIV+")
    art = random_artifact("tabular-mlp", input_shape=(3,))
    settings = institution_settings.ClientSettings(
        "hospital-000", tmp_path / "s", tmp_path / "c", 0, 1
    )
    BackboneCache(settings.cache_dir).store(art.manifest, art.tensors, art.sha256)
    run = _tabular_run(csv, clients=1, examples=2)
    if "classes" not in {f.name for f in dataclasses.fields(RunConfig)}:
        pytest.skip("before public class lists")
    with pytest.raises(FerryError, match="HIV"):
        runtime.train_round(settings, runtime.RoundRequest(run, 1, art.sha256, 2, "r"), {})
