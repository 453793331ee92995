"""Attack tests: a deployed institution's data-shaping settings are its own, pinned.

The adversary is the operator, who sees every released value and writes every message. Were
the settings that decide which records load, how they are labelled and how they are split
taken from each message, it could difference two releases: move the series cutoff by a day
(the difference of the held-out sums is one trained window's target), reorder the classes
(re-drawing the held-out split), omit a class (a refusal that answers "is this label in your
data?"), or pick a loader setting that turns the example count into a counting query.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ferry.client.backbone_cache as bc
from ferry.client.budget_guard import Budget
from ferry.client.held_out import pin_split
from ferry.client.institution_settings import ClientSettings
from ferry.client.runtime import RoundRequest, _local_data, evaluate_round
from ferry.common.config import RunConfig
from ferry.common.data import synthetic_records
from ferry.common.data.datasets import DataSpec, load_partition, whole
from ferry.common.errors import FerryError
from ferry.common.heads import build_head
from ferry.common.scenarios.registry import with_scenario_defaults
from ferry.server.pretrain import random_artifact


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_HOME", str(tmp_path / "home"))


def _institution(root: Path, data: Path, architecture: str, shape: tuple[int, ...]):
    state = root / "state"
    settings = ClientSettings(
        "inst-a",
        state,
        root / "cache",
        0,
        1,
        Budget(3.0, 1e-4),
        data_path=str(data),
        held_out=pin_split(state, 0.2),
    )
    art = random_artifact(architecture, input_shape=shape)
    bc.BackboneCache(settings.cache_dir).store(art.manifest, art.tensors, art.sha256)
    return settings, art


def _prices(root: Path) -> tuple[Path, list[str]]:
    csv = root / "prices.csv"
    frame = synthetic_records.make_prices(160, 1, 0, "target")
    frame.to_csv(csv, index=False)
    days = [str(d)[:10] for d in sorted(pd.to_datetime(frame["date"]).unique())]
    return csv, days


def _series_run(csv: Path, test_from: str) -> RunConfig:
    return with_scenario_defaults(
        RunConfig(
            scenario="bank-stocks",
            data=str(csv),
            date_column="date",
            value_columns="close",
            task="regression",
            clients=1,
            noise_multiplier=1.0,
            test_from=test_from,
        )
    )


def test_a_moved_series_cutoff_is_refused_so_two_evaluations_cannot_be_differenced(tmp_path):
    csv, days = _prices(tmp_path)
    settings, art = _institution(tmp_path, csv, "series-cnn", (1, 30))
    first = RoundRequest(_series_run(csv, days[60]), 1, art.sha256, 0, "r")
    assert len(_local_data(settings, first).part.test) > 0
    moved = RoundRequest(_series_run(csv, days[61]), 1, art.sha256, 0, "r")
    with pytest.raises(FerryError, match="test-from is '.*' in .*data-settings.json"):
        _local_data(settings, moved)


def test_held_out_windows_contain_no_training_target_in_their_inputs(tmp_path):
    csv, days = _prices(tmp_path)
    run = _series_run(csv, days[80])
    part = load_partition(whole(dataclasses.replace(DataSpec.from_run(run, 1, (1, 30)))), 0)
    assert len(part.train) and len(part.test)
    held_inputs = set(np.round(part.test.x.astype(np.float64).ravel(), 5).tolist())
    targets = np.round(part.train.y.astype(np.float64), 5)
    leaked = [float(v) for v in targets if v in held_inputs]
    assert leaked == [], f"{len(leaked)} training targets sit in held-out windows' inputs"
    cutoff = np.datetime64(days[80], "ns")
    assert (part.test.spans[:, 2] >= cutoff).all() and (part.train.spans[:, 1] < cutoff).all()


def _patients(root: Path, rare: bool) -> Path:
    csv = root / "patients.csv"
    diag = ["flu"] * 150 + ["cold"] * 149 + ["HIV+" if rare else "flu"]
    rows = ["rid,age,sex,diagnosis"] + [
        f"{i},{30 + i % 40},{i % 2},{d}" for i, d in enumerate(diag)
    ]
    csv.write_text("\n".join(rows) + "\n")
    return csv


def _table_run(csv: Path, **kw) -> RunConfig:
    base = dict(
        scenario="hospital-tabular",
        data=str(csv),
        label_column="diagnosis",
        task="classification",
        classes="cold,flu",
        clients=1,
        noise_multiplier=1.0,
        delta=1e-4,
    )
    return with_scenario_defaults(RunConfig(**{**base, **kw}))


def _held_out_ids(csv: Path, **kw) -> set[int]:
    spec = whole(DataSpec.from_run(_table_run(csv, **kw), 1, (3,)))
    part = load_partition(spec, 0)
    return set(part.test.x[:, part.test.columns.index("rid")].astype(int).tolist())


def test_held_out_membership_ignores_class_order_and_loader_settings(tmp_path):
    csv = _patients(tmp_path, rare=False)
    base = _held_out_ids(csv)
    assert base
    for kw in ({"classes": "flu,cold"}, {"classes": "cold,flu,other"}, {"categorical": "sex"}):
        moved = _held_out_ids(csv, **kw)
        assert moved == base, f"{kw} moved {len(moved - base)} trained records into held-out"


def _outcome(settings, art, run, num_classes: int) -> str:
    head = build_head("linear", int(art.manifest["feature_dim"]), num_classes)
    arrays = {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}
    try:
        evaluate_round(settings, RoundRequest(run, 1, art.sha256, num_classes, "r"), arrays)
    except FerryError as exc:
        return f"refused: {type(exc).__name__}: " + str(exc).replace(str(settings.state_dir), "S")
    return "answered"


def test_a_changed_class_list_is_refused_alike_whatever_labels_the_data_holds(tmp_path):
    outcomes = []
    for rare in (False, True):
        root = tmp_path / f"rare-{rare}"
        root.mkdir()
        csv = _patients(root, rare)
        settings, art = _institution(root, csv, "tabular-mlp", (3,))
        first = _outcome(settings, art, _table_run(csv, classes="HIV+,cold,flu"), 3)
        assert first == "answered"
        outcomes.append(_outcome(settings, art, _table_run(csv, classes="cold,flu"), 2))
    assert outcomes[0] == outcomes[1], f"the refusal is a label oracle: {outcomes}"
    assert "classes is" in outcomes[0]


@pytest.mark.parametrize(
    "change",
    [
        {"categorical": "sex"},
        {"skip_unreadable": True},
        {"label_column": "sex", "classes": "0,1"},
        {"scenario": "drug-activity", "smiles_column": "sex", "label_column": "diagnosis"},
    ],
)
def test_a_changed_loader_setting_is_refused_before_the_data_is_read(tmp_path, change):
    csv = _patients(tmp_path, rare=False)
    settings, art = _institution(tmp_path, csv, "tabular-mlp", (3,))
    assert _outcome(settings, art, _table_run(csv), 2) == "answered"
    csv.unlink()  # a refusal that reads no data does not notice it is gone
    outcome = _outcome(settings, art, _table_run(csv, **change), 2)
    assert outcome.startswith("refused: FerryError: this institution's data settings are pinned")


def test_the_institution_pins_its_classes_and_cutoff_up_front(tmp_path):
    from ferry.client.held_out import pin_data_settings
    from ferry.client.supernode import InstitutionSettings, write_node_config

    csv = _patients(tmp_path, rare=False)
    s = InstitutionSettings(
        "srv:9092",
        csv,
        tmp_path / "state",
        "inst-a",
        3.0,
        1e-4,
        insecure=True,
        classes="cold,flu",
        test_from="2024-01-01",
    )
    s.state_dir.mkdir()
    write_node_config(s)
    settings, art = _institution(tmp_path, csv, "tabular-mlp", (3,))
    assert _outcome(settings, art, _table_run(csv, classes=""), 2) == "answered"
    refused = _outcome(settings, art, _table_run(csv, classes="flu,cold"), 2)
    assert "classes is ['cold', 'flu']" in refused
    with pytest.raises(FerryError, match="test-from"):
        pin_data_settings(s.state_dir, {"test-from": "2024-01-02"})
    with pytest.raises(FerryError, match="classes"):
        write_node_config(dataclasses.replace(s, classes="a,b"))


def test_image_held_out_membership_ignores_the_class_order(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("benign", "malignant"):
        (tmp_path / label).mkdir()
        for i in range(60):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")

    def held_out(classes: str) -> set[bytes]:
        run = with_scenario_defaults(
            RunConfig(scenario="hospital-imaging", data=str(tmp_path), classes=classes)
        )
        part = load_partition(whole(DataSpec.from_run(run, 1, (1, 8, 8))), 0)
        return {x.tobytes() for x in part.test.x}

    base = held_out("benign,malignant")
    assert base
    assert held_out("malignant,benign") == base
