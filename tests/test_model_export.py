"""A run's model, exported and used: ``ferry export``, ``ferry predict``, ``ferry.load_model``.

One federation (3 institutions holding an image folder's examples, 2 rounds, in this process:
:func:`inprocess_grid.simulate_in_process` runs the real plan, round loop and clients), then:

* the exported model, loaded with ``ferry.load_model``, predicts the institutions' pooled
  held-out examples with exactly the accuracy the run's last federated evaluation reported;
* ``ferry predict`` writes one row per example, the same predictions as ``ferry.load_model``;
* bad input is a one-line error with exit 2, nothing overwritten: a run that did not finish,
  an existing ``--out``, a model whose weights do not match its manifest, data that does not
  fit the model.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

import ferry
from ferry.cli import main
from ferry.common.config import RunConfig
from ferry.common.data.datasets import DataSpec, load_partition
from ferry.common.data.synthetic import class_names, write_image_folder
from ferry.common.errors import FerryError
from ferry.common.exported_model import predict
from ferry.common.prediction import read_data

from inprocess_grid import simulate_in_process

CLIENTS, ROUNDS = 3, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    write_image_folder(root / "data", "target", 240, seed=11)
    cfg = RunConfig(
        clients=CLIENTS,
        rounds=ROUNDS,
        data=str(root / "data"),
        partition="iid",
        weights="random",
        epsilon=8.0,
        out=str(root / "run"),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERRY_HOME", str(root / "ferry-home"))
        summary = simulate_in_process(cfg)
        assert main(["export", str(root / "run"), "--out", str(root / "model")]) == 0
    return {"root": root, "summary": summary, "run": root / "run", "model": root / "model"}


def test_exported_model_reproduces_the_last_federated_evaluation(run):
    model, preprocessing = ferry.load_model(run["model"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    record = json.loads((run["run"] / "model" / "model.json").read_text())
    cfg = RunConfig.from_mapping(record["config"])
    spec = replace(
        DataSpec.from_run(cfg, CLIENTS, tuple(record["input_shape"])), task=record["task"]
    )
    held_out = [load_partition(spec, pid).test for pid in range(CLIENTS)]
    x = np.concatenate([h.x for h in held_out])
    y = np.concatenate([h.y for h in held_out])
    predicted = predict(model, preprocessing, x).argmax(axis=1)
    last = json.loads((run["run"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["round"] == ROUNDS and last["eval_examples"] == len(y)
    assert float(np.mean(predicted == y)) == pytest.approx(last["accuracy"], abs=1e-12)


def test_manifest_states_the_model_and_its_privacy(run):
    manifest = json.loads((run["model"] / "manifest.json").read_text())
    assert manifest["classes"] == sorted(class_names("target"))  # the folder's, sorted
    assert manifest["backbone_sha256"] == run["summary"]["backbone"]["sha256"]
    privacy = manifest["privacy"]
    assert privacy["unit"] and privacy["accountant"] and privacy["not_covered"]
    assert set(privacy["institutions"]) == set(run["summary"]["clients"])
    for name, spent in privacy["institutions"].items():
        assert spent["epsilon"] == run["summary"]["clients"][name]["epsilon"]
        assert spent["delta"] == run["summary"]["clients"][name]["delta"]
        assert spent["rounds"] == ROUNDS


def test_ferry_predict_writes_what_load_model_predicts(run, tmp_path):
    out = tmp_path / "preds.csv"
    assert (
        main(["predict", str(run["model"]), "--data", str(run["root"] / "data"), "--out", str(out)])
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    model, preprocessing = ferry.load_model(run["model"])
    data = read_data(run["model"], run["root"] / "data")
    p = predict(model, preprocessing, data.x)
    assert len(rows) == len(data) == 240
    assert [r["prediction"] for r in rows] == [model.classes[i] for i in p.argmax(axis=1)]
    assert [r["label"] for r in rows] == [model.classes[i] for i in data.y]
    got = np.array([[float(r[f"p_{c}"]) for c in model.classes] for r in rows])
    assert np.allclose(got, p, atol=1e-5)


def test_ferry_predict_on_unlabelled_images_gives_each_file_its_labelled_prediction(run, tmp_path):
    """The same 240 images, copied into one flat folder (no labels): each file gets the row
    it got when read with its label, named by the file."""
    labelled, flat = tmp_path / "labelled.csv", tmp_path / "flat"
    data = run["root"] / "data"
    assert main(["predict", str(run["model"]), "--data", str(data), "--out", str(labelled)]) == 0
    flat.mkdir()
    names = []  # the labelled reader's order: classes sorted, then files sorted
    for folder in sorted(d for d in data.iterdir() if d.is_dir()):
        for image in sorted(folder.iterdir()):
            names.append(f"{folder.name}__{image.name}")
            shutil.copy(image, flat / names[-1])
    unlabelled = tmp_path / "unlabelled.csv"
    assert main(["predict", str(run["model"]), "--data", str(flat), "--out", str(unlabelled)]) == 0
    by_file = {r["example"]: r for r in csv.DictReader(unlabelled.open())}
    rows = list(csv.DictReader(labelled.open()))
    assert len(by_file) == len(rows) == 240 and all(r["label"] == "" for r in by_file.values())
    probabilities = [key for key in rows[0] if key.startswith("p_")]
    assert len(probabilities) == 4
    for name, row in zip(names, rows, strict=True):
        assert by_file[name]["prediction"] == row["prediction"]
        for key in probabilities:
            assert abs(float(by_file[name][key]) - float(row[key])) < 1e-5


def _refused(capsys, argv: list[str], words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ferry: error:") and words in err[0], err


def test_bad_input_is_one_line_exit_2_and_nothing_is_overwritten(run, tmp_path, capsys):
    # A run that did not finish: no final model.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run["run"], unfinished)
    shutil.rmtree(unfinished / "model")
    _refused(capsys, ["export", str(unfinished), "--out", str(tmp_path / "m1")], "no finished run")
    assert not (tmp_path / "m1").exists()
    # An --out that holds something.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    _refused(capsys, ["export", str(run["run"]), "--out", str(taken)], "already exists")
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    # Weights that do not match the manifest.
    altered = tmp_path / "altered"
    shutil.copytree(run["model"], altered)
    weights = altered / "trainable.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    preds = tmp_path / "p.csv"
    argv = ["predict", str(altered), "--data", str(run["root"] / "data"), "--out", str(preds)]
    _refused(capsys, argv, "does not match its manifest")
    assert not preds.exists()
    # Data that does not fit the model (a table for an image model).
    table = tmp_path / "table.csv"
    table.write_text("a,b,label\n1,2,0\n3,4,1\n")
    argv = ["predict", str(run["model"]), "--data", str(table), "--out", str(preds)]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("ferry: error:") and not preds.exists()
    # An existing prediction file.
    preds.write_text("mine")
    argv = ["predict", str(run["model"]), "--data", str(run["root"] / "data"), "--out", str(preds)]
    _refused(capsys, argv, "already exists")
    assert preds.read_text() == "mine"


def test_python_api_simulates_and_hands_back_the_run_and_its_model(tmp_path, without_ray):
    data = write_image_folder(tmp_path / "data", "target", 120, seed=5)
    lines: list[str] = []
    run = ferry.simulate(
        clients=2,
        rounds=1,
        data=str(data),
        partition="iid",
        weights="random",
        out=str(tmp_path / "run"),
        log=lines.append,
    )
    assert isinstance(run, ferry.Run) and run.out == tmp_path / "run" and lines
    assert [r["round"] for r in run.rounds] == [1]
    assert set(run.privacy) == set(run.summary["clients"]) and len(run.privacy) == 2
    assert all(0 < p["epsilon"] < float("inf") for p in run.privacy.values())
    assert run.ledger.is_file()
    model, preprocessing = run.model()
    x = read_data(run.out / "exported", data).x
    assert predict(model, preprocessing, x).shape == (120, 4)
    with pytest.raises(FerryError, match="unknown setting 'rouns'"):
        ferry.simulate(rouns=2)


def test_ferry_predict_on_a_table_without_its_label_column(tmp_path):
    """A tabular model predicts for rows whose label column is absent, as for the same rows
    with it (the run's reader lays out the features; the label stays empty)."""
    table = load_breast_cancer(as_frame=True).frame.rename(columns={"target": "malignant"})
    table.to_csv(tmp_path / "train.csv", index=False)
    cfg = RunConfig(
        scenario="hospital-tabular",
        clients=2,
        rounds=1,
        data=str(tmp_path / "train.csv"),
        label_column="malignant",
        partition="iid",
        weights="random",
        epsilon=8.0,
        out=str(tmp_path / "run"),
    )
    simulate_in_process(cfg)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 0
    new = table.sample(50, random_state=0)
    new.to_csv(tmp_path / "labelled.csv", index=False)
    new.drop(columns=["malignant"]).to_csv(tmp_path / "new.csv", index=False)
    outs = {}
    for name in ("labelled", "new"):
        outs[name] = tmp_path / f"{name}-preds.csv"
        argv = ["predict", str(tmp_path / "model"), "--data", str(tmp_path / f"{name}.csv")]
        assert main([*argv, "--out", str(outs[name])]) == 0
    labelled = list(csv.DictReader(outs["labelled"].open()))
    unlabelled = list(csv.DictReader(outs["new"].open()))
    assert len(unlabelled) == 50 and all(r["label"] == "" for r in unlabelled)
    assert [r["label"] for r in labelled] == [str(v) for v in new["malignant"]]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "label"} for r in rows]  # noqa: E731
    assert strip(unlabelled) == strip(labelled)
