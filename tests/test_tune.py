"""``ferry tune``: settings chosen on public data, recorded next to the backbone.

The promises pinned here: tuning reads only the backbone and public data (no institution's
data, no privacy spent); it writes DIR/tuning.json and nothing else (the backbone's files
stay byte-identical); a second run merges; a record of another backbone, or a malformed one,
is refused with the fix; bad input is refused (exit 2, one line) before any work.

The public data is small and split iid so that every institution holds fewer records than
every batch in the grid (q = 1): σ is then derived in closed form and a run takes seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest

import ferry.common.data.datasets as datasets
import ferry.simulations.linear_federation as linear_federation
from ferry.cli import main
from ferry.common.config import RunConfig
from ferry.common.data.synthetic_records import make_patients
from ferry.common.errors import FerryError
from ferry.common.scenarios.registry import SCENARIOS
from ferry.common.serialization import MANIFEST_FILE, WEIGHTS_FILE, load_artifact
from ferry.server.pretrain import PretrainConfig, pretrain
from ferry.server.tuning import TUNING_FILE, load_tuned

SMALL = ["--quick", "--examples", "100", "--clients", "2", "--partition", "iid"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tune") / "backbone"
    cfg = PretrainConfig(scenario="hospital-tabular", examples=400, epochs=1, out=str(out))
    pretrain(cfg, log=lambda _: None)
    return out


@pytest.fixture
def backbone(pretrained: Path, tmp_path: Path) -> Path:
    """A fresh copy of the pretrained backbone directory (tests write tuning.json into it)."""
    return Path(shutil.copytree(pretrained, tmp_path / "backbone"))


def digests(directory: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in (WEIGHTS_FILE, MANIFEST_FILE)
    }


def tune(backbone: Path, *extra: str) -> int:
    return main(["tune", "--weights", str(backbone), *SMALL, *extra])


def record_of(backbone: Path) -> dict:
    return json.loads((backbone / TUNING_FILE).read_text())


def test_tune_records_settings_per_epsilon_next_to_an_unchanged_backbone(backbone, capsys):
    before = digests(backbone)
    sha = load_artifact(backbone).sha256

    assert tune(backbone, "--epsilon", "3") == 0

    out = capsys.readouterr().out
    assert "ε=3: best B=" in out and "rule accuracy" in out
    assert digests(backbone) == before
    assert sorted(p.name for p in backbone.iterdir()) == sorted(
        [WEIGHTS_FILE, MANIFEST_FILE, TUNING_FILE]
    )
    record = record_of(backbone)
    assert record["format"] == "ferry-tuning/1"
    assert record["backbone_sha256"] == sha
    assert list(record["entries"]) == ["3.0"]
    entry = record["entries"]["3.0"]
    assert entry["data"] == {
        "kind": "synthetic-source",
        "scenario": "hospital-tabular",  # from the backbone's manifest
        "split": "source",
        "examples": 100,
        "seed": 1,  # pretraining seed 0 + 1: records the backbone was not fitted on
    }
    assert entry["clients"] == 2 and entry["delta"] == 1e-5
    assert entry["grid"]["batch_size"] == [64, 256] and entry["seeds"] == 2
    assert set(entry["metrics"]) >= {"accuracy", "balanced_accuracy", "roc_auc"}
    assert set(entry["rule"]) == {"batch_size", "local_epochs", "rounds", "lr", "metrics"}
    assert 0 <= entry["metrics"]["accuracy"] <= 1

    tuned = load_tuned(backbone, sha, RunConfig(epsilon=3.0))
    assert tuned == {k: entry[k] for k in ("batch_size", "local_epochs", "rounds", "lr")}
    assert load_tuned(backbone, sha, RunConfig(epsilon=3.0000001)) is None
    assert load_tuned(backbone, sha, RunConfig(epsilon=3.0, non_private=True)) is None
    assert load_tuned(backbone.parent / "elsewhere", sha, RunConfig(epsilon=3.0)) is None


def test_tune_reads_no_institution_data(backbone, monkeypatch, capsys):
    """The adversary's hope: tuning quietly reads the institutions' data (the scenario's
    target split, or any user file). Both are made to fail; no institution state exists."""
    scenario = SCENARIOS["hospital-tabular"]

    def source_only(spec, split="target"):
        assert split == "source", "ferry tune read the institutions' (target) data"
        return scenario.synthetic(spec, split)

    def no_files(spec):
        raise AssertionError(f"ferry tune read a data file: {spec.data}")

    guarded = dataclasses.replace(scenario, synthetic=source_only, load=no_files)
    monkeypatch.setitem(SCENARIOS, "hospital-tabular", guarded)
    datasets.load_dataset.cache_clear()
    datasets._split.cache_clear()

    assert tune(backbone, "--epsilon", "3") == 0

    assert "3.0" in record_of(backbone)["entries"]
    assert "no institution's data is read" in capsys.readouterr().out


def test_second_tune_merges_and_says_what_it_replaced(backbone, capsys):
    assert tune(backbone, "--epsilon", "3") == 0
    record = record_of(backbone)
    kept = dict(record["entries"]["3.0"], lr=0.125)  # an entry the second run must not touch
    record["entries"]["8.0"] = kept
    (backbone / TUNING_FILE).write_text(json.dumps(record))
    capsys.readouterr()

    assert tune(backbone, "--epsilon", "1,3") == 0

    out = capsys.readouterr().out
    assert "replaced the earlier ε=3 entry" in out
    assert "replaced the earlier ε=1" not in out
    entries = record_of(backbone)["entries"]
    assert sorted(entries, key=float) == ["1.0", "3.0", "8.0"]
    assert entries["8.0"] == kept
    assert entries["3.0"]["lr"] in (0.5, 2.0)  # retuned on the quick grid


def test_record_of_another_backbone_is_refused(backbone, capsys):
    sha = load_artifact(backbone).sha256
    assert tune(backbone, "--epsilon", "3") == 0
    record = record_of(backbone)
    record["backbone_sha256"] = "0" * 64
    text = json.dumps(record)
    (backbone / TUNING_FILE).write_text(text)
    capsys.readouterr()

    with pytest.raises(FerryError, match=r"another backbone|not this backbone") as refused:
        load_tuned(backbone, sha, RunConfig(epsilon=3.0))
    assert "rerun `ferry tune" in str(refused.value) and "delete" in str(refused.value)
    assert "\n" not in str(refused.value)

    assert tune(backbone, "--epsilon", "3") == 2  # nor does tune overwrite it
    assert "not this backbone" in capsys.readouterr().err
    assert (backbone / TUNING_FILE).read_text() == text


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"format": "ferry-tuning/0", "entries": {}}),
        "SHA_ENTRIES",  # the right backbone, a tampered entry
    ],
)
def test_malformed_record_is_refused(backbone, content):
    sha = load_artifact(backbone).sha256
    if content == "SHA_ENTRIES":
        entry = {"batch_size": 64, "local_epochs": 3, "rounds": 0, "lr": 0.5}
        content = json.dumps(
            {"format": "ferry-tuning/1", "backbone_sha256": sha, "entries": {"3.0": entry}}
        )
    (backbone / TUNING_FILE).write_text(content)
    with pytest.raises(FerryError, match="rerun `ferry tune") as refused:
        load_tuned(backbone, sha, RunConfig(epsilon=3.0))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--scenario", "no-such-preset"], "unknown scenario"),
        (["--epsilon", "0"], "--epsilon"),
        (["--epsilon", "-1"], "--epsilon"),
        (["--epsilon", "inf"], "--epsilon"),
        (["--epsilon", "nan"], "--epsilon"),
        (["--epsilon", "1,three"], "--epsilon"),
        (["--clients", "0"], "--clients"),
        (["--data", "PUBLIC6", "--clients", "7"], "--clients 7 is more than the 6 public"),
        (["--task", "regression"], "classification only"),
        (["--scenario", "bank-stocks"], "classification only"),
        (["--weights", "random"], "--weights"),
        (["--weights", "MISSING"], "no backbone weights"),
    ],
)
def test_bad_input_exits_2_before_any_work(backbone, tmp_path, monkeypatch, capsys, args, says):
    def no_work(*_, **__):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(linear_federation, "extract_features", no_work)
    monkeypatch.setattr(linear_federation, "grid_search", no_work)
    before = digests(backbone)
    weights = str(backbone)
    if "--weights" in args:
        i = args.index("--weights")
        weights = str(tmp_path / "missing") if args[i + 1] == "MISSING" else args[i + 1]
        args = args[:i] + args[i + 2 :]
    if "PUBLIC6" in args:  # a public table of six patients (the backbone's layout)
        table = tmp_path / "public.csv"
        make_patients(6, 7, "target").drop(columns=["site"]).to_csv(table, index=False)
        args = [str(table) if a == "PUBLIC6" else a for a in args]
        args += ["--label-column", "outcome", "--categorical", "sex,smoker"]

    code = main(["tune", "--weights", weights, *SMALL, "--epsilon", "3", *args])

    err = capsys.readouterr().err
    assert code == 2
    assert says in err and err.startswith("ferry: error:") and err.count("\n") == 1
    assert not (backbone / TUNING_FILE).exists()
    assert digests(backbone) == before
