"""Attack: one record must not move any *other* record's features or clipped gradient.

DP-SGD bounds one record's influence on a step by the clipping norm C only if every other
record's clipped gradient is the same with or without it. The adversary is a hostile
institution member (or the operator, who picks the record to probe): it adds one extreme
record to an institution's data (or has one removed) and looks for the change in the others'
contributions. Preprocessing fitted on the institution's data (the old per-client
standardisation) or a train/test split that reshuffles when the row count changes lets one
record move every other record's clipped gradient (measured up to ~3.9 C per step).

Every non-image preset is checked the way its client computes features
(:func:`client.runtime._local_data`): at the level of the client's partition, and, for the
table-shaped presets, end to end from a deployed institution's file (loader, train/test
split, preprocessing, trunk).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ferry.client import runtime
from ferry.client.backbone_cache import BackboneCache
from ferry.client.institution_settings import ClientSettings
from ferry.client.runtime import RoundRequest
from ferry.common.backbones.registry import backbone_spec
from ferry.common.config import RunConfig
from ferry.common.data.dataset import Dataset
from ferry.common.data.datasets import DataSpec, Partition, load_dataset, load_partition, whole
from ferry.common.errors import FerryError
from ferry.common.scenarios import get_scenario
from ferry.common.scenarios.registry import known_scenarios, with_scenario_defaults
from ferry.common.serialization import BackboneArtifact, backbone_digest, verify
from ferry.server.pretrain import PretrainConfig, pretrain, random_artifact

C = 1.0  # clipping norm
EXAMPLES = 300
NON_IMAGE = [
    name
    for name in known_scenarios()
    if backbone_spec(get_scenario(name).backbone).modality != "image"
]
TABLE_FILES = {
    # preset: (generator, columns to drop, label, categorical)
    "hospital-tabular": ("make_patients", ["site"], "outcome", "sex,smoker"),
    "bank-credit": ("make_credit", ["branch"], "default", "employment"),
    "drug-activity": ("make_molecules", [], "activity", ""),
}
# bank-stocks as a deployed price file: one row per (ticker, day); a window is one record.
PRICE_DAYS = 200  # a cutoff at day 100 leaves whole held-out windows after it
PRICE_SETTINGS = {
    "date_column": "date",
    "value_columns": "close",
    "partition_column": "ticker",
    "test_from": "2012-05-21",  # public: the operator's cutoff (day 100 of the file)
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_BACKBONES: dict[str, BackboneArtifact] = {}


def _backbone(scenario: str) -> BackboneArtifact:
    """The preset's own backbone, pretrained briefly on its public source task."""
    if scenario not in _BACKBONES:
        cfg = PretrainConfig(scenario=scenario, examples=EXAMPLES, epochs=1, batch_size=64)
        _BACKBONES[scenario] = pretrain(cfg, log=lambda _: None)
    return _BACKBONES[scenario]


def _run(scenario: str, **fields) -> RunConfig:
    task = get_scenario(scenario).synthetic(DataSpec(scenario, examples=EXAMPLES), "target").task
    return with_scenario_defaults(
        RunConfig(
            scenario=scenario, examples=EXAMPLES, clients=1, partition="iid", task=task, **fields
        )
    )


def _client_view(
    root: Path,
    artifact: BackboneArtifact,
    run: RunConfig,
    data_path: str = "",
    num_classes: int = 2,
) -> dict[bytes, tuple[np.ndarray, np.ndarray]]:
    """What the client trains on, as the client computes it: for each training record (keyed
    by its raw content), its feature vector and its clipped gradient under a fixed head."""
    settings = ClientSettings("attacked", root / "state", root / "cache", 0, 1, data_path=data_path)
    BackboneCache(settings.cache_dir).store(artifact.manifest, artifact.tensors, artifact.sha256)
    num_classes = 0 if run.task == "regression" else num_classes
    data = runtime._local_data(settings, RoundRequest(run, 1, artifact.sha256, num_classes))
    part, feats = data.part, np.asarray(data.feats["train"])
    tail = data.model.tail
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a fixed head, the same for every variant of the data
        for p in tail.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    regression = part.train.task == "regression"
    view = {}
    for i in range(len(part.train)):
        out = tail(torch.from_numpy(np.ascontiguousarray(feats[i : i + 1])))
        if regression:
            loss = torch.nn.functional.mse_loss(out[:, 0], torch.tensor([part.train_y[i]]))
        else:
            loss = torch.nn.functional.cross_entropy(out, torch.tensor([int(part.train_y[i])]))
        grads = torch.autograd.grad(loss, [p for p in tail.parameters() if p.requires_grad])
        g = torch.cat([x.reshape(-1) for x in grads])
        g = g * min(1.0, C / (float(g.norm()) + 1e-12))
        view[_record_key(part.train, i)] = (feats[i].copy(), g.detach().numpy().copy())
    return view


def _record_key(data: Dataset, i: int) -> bytes:
    return np.ascontiguousarray(data.x[i]).tobytes() + np.asarray(data.y[i]).tobytes()


def _assert_others_unchanged(before: dict, after: dict, changed: bytes) -> None:
    others = [k for k in before if k != changed]
    assert len(others) > 100, "too few training records to measure anything"
    missing = [k for k in others if k not in after]
    moved = [k for k in others if k in after and not np.array_equal(before[k][0], after[k][0])]
    grad_before = sum((before[k][1] for k in others), np.zeros_like(before[others[0]][1]))
    grad_after = sum(
        (after[k][1] for k in others if k in after), np.zeros_like(before[others[0]][1])
    )
    shift = float(np.linalg.norm(grad_after - grad_before))
    assert not missing and not moved and shift == 0.0, (
        f"one record changed the rest: {len(missing)} of {len(others)} other records left "
        f"training, {len(moved)} changed features; their clipped-gradient sum moved by "
        f"{shift / C:.3f} C"
    )
    for k in others:
        np.testing.assert_array_equal(after[k][1], before[k][1])


def _hostile(data: Dataset, i: int) -> np.ndarray:
    """Record ``i`` pushed to an extreme (what moves fitted statistics most)."""
    x = np.array(data.x[i], dtype=np.float32, copy=True)
    if data.modality == "molecule":
        return np.ones_like(x)
    if data.modality == "tabular" and data.numeric is not None:
        x[np.asarray(data.numeric, dtype=bool)] *= 1000.0
        return x
    return x * 50.0


def _with_train(part: Partition, train: Dataset, tag: str) -> Partition:
    fingerprint = hashlib.sha256((part.fingerprint + tag).encode()).hexdigest()
    return Partition(train, part.test, fingerprint)


@pytest.mark.parametrize("change", ["add", "remove"])
@pytest.mark.parametrize("scenario", NON_IMAGE)
def test_one_record_added_or_removed_leaves_other_records_features_and_gradients_unchanged(
    scenario, change, tmp_path, monkeypatch
):
    artifact = _backbone(scenario)
    run = _run(scenario)
    if scenario == "bank-stocks":  # the embargo (window + horizon days) leaves too few at 300
        run = dataclasses.replace(run, examples=2 * EXAMPLES)
    spec = DataSpec.from_run(run, 1, tuple(artifact.manifest["input_shape"]))
    part = load_partition(spec, 0)
    train = part.train
    if change == "add":
        x = np.concatenate([train.x, _hostile(train, 0)[None]])
        y = np.concatenate([train.y, train.y[:1]])
        groups = None if train.groups is None else np.concatenate([train.groups, train.groups[:1]])
        changed_train = dataclasses.replace(train, x=x, y=y, groups=groups)
        changed = _record_key(changed_train, len(train))
    else:
        changed_train = train.subset(np.arange(1, len(train)))
        changed = _record_key(train, 0)
    variants = {}
    for name, p in (("base", part), (change, _with_train(part, changed_train, change))):
        monkeypatch.setattr(runtime, "load_partition", lambda spec, pid, p=p: p)
        variants[name] = _client_view(tmp_path / name, artifact, run)
    before, after = variants["base"], variants[change]
    if change == "add":
        before, after = after, before  # the added record is the one allowed to differ
    _assert_others_unchanged(before, after, changed)


def _table_file(scenario: str, path: Path, change: str) -> Path:
    import pandas as pd

    from ferry.common.data import synthetic_records

    make, drop, label, _ = TABLE_FILES[scenario]
    frame = getattr(synthetic_records, make)(EXAMPLES, 0, "target").drop(columns=drop)
    if change == "add":
        extra = frame.iloc[[0]].copy()
        for column in extra.columns:
            value = extra[column].iloc[0]
            if column != label and isinstance(value, int | float | np.number):
                extra[column] = value * 1000 if np.isfinite(value) else value
        if "smiles" in extra:
            extra["smiles"] = "CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCO"
        frame = pd.concat([frame, extra], ignore_index=True)
    elif change == "remove":
        frame = frame.iloc[1:]
    frame.to_csv(path, index=False)
    return path


def _price_file(path: Path, change: str) -> Path:
    """A deployed bank's price file; ``add``: one more (hostile) day at the end of the first
    ticker (one more window); ``remove``: its first day gone (its oldest window gone)."""
    import pandas as pd

    from ferry.common.data import synthetic_records

    frame = synthetic_records.make_prices(PRICE_DAYS, 3, 0, "target")
    first = frame[frame["ticker"] == frame["ticker"].iloc[0]]
    if change == "add":
        last = first.iloc[[-1]].copy()
        last["date"] = (pd.Timestamp(last["date"].iloc[0]) + pd.offsets.BDay(1)).strftime(
            "%Y-%m-%d"
        )
        last["close"] = last["close"] * 1000.0
        frame = pd.concat([frame, last], ignore_index=True)
    elif change == "remove":
        frame = frame.drop(index=first.index[0])
    frame.to_csv(path, index=False)
    return path


def _deployed_file(scenario: str, path: Path, change: str) -> tuple[RunConfig, Path]:
    if scenario == "bank-stocks":
        return _run(scenario, **PRICE_SETTINGS), _price_file(path, change)
    _, _, label, categorical = TABLE_FILES[scenario]
    return _run(scenario, label_column=label, categorical=categorical), _table_file(
        scenario, path, change
    )


@pytest.mark.parametrize("change", ["add", "remove"])
@pytest.mark.parametrize("scenario", [*sorted(TABLE_FILES), "bank-stocks"])
def test_deployed_file_row_added_or_removed_moves_no_other_row_and_no_other_gradient(
    scenario, change, tmp_path
):
    """End to end from a deployed institution's own file: the loader, the held-out split
    (membership per record: a hash of its content, or for price windows the public cutoff
    date; never a reshuffle or a fraction of the rows), the labels (the run's public class
    list) and the preprocessing."""
    artifact = _backbone(scenario)
    run, base_file = _deployed_file(scenario, tmp_path / "base.csv", "")
    _, other_file = _deployed_file(scenario, tmp_path / f"{change}.csv", change)
    base = _client_view(tmp_path / "base", artifact, run, str(base_file))
    other = _client_view(tmp_path / change, artifact, run, str(other_file))
    small, large = (other, base) if change == "remove" else (base, other)
    extra = set(large) - set(small)
    assert len(extra) <= 1, f"{len(extra)} records differ between the two training sets"
    _assert_others_unchanged(large, small, next(iter(extra), b""))


def _split_of(run: RunConfig, data: Path) -> dict[bytes, str]:
    """Which side of the held-out split each record of a deployed file lands on."""
    spec = whole(replace(DataSpec.from_run(run, 1, (1, 30)), data=str(data)))
    part = load_partition(spec, 0)
    sides = {_record_key(part.train, i): "train" for i in range(len(part.train))}
    sides.update({_record_key(part.test, i): "test" for i in range(len(part.test))})
    return sides


@pytest.mark.parametrize("change", ["add", "remove"])
def test_price_window_added_or_removed_moves_no_other_window_across_the_split(change, tmp_path):
    """The held-out split of a price series is the public cutoff date against each window's
    own forecast period: the old rule (each ticker's latest fraction of windows) moved the
    boundary, and so another window in or out of DP training, when one window came or went."""
    run = _run("bank-stocks", **PRICE_SETTINGS)
    base = _split_of(run, _price_file(tmp_path / "base.csv", ""))
    other = _split_of(run, _price_file(tmp_path / f"{change}.csv", change))
    assert sum(side == "test" for side in base.values()) > 20  # a real held-out split
    moved = [k for k in base.keys() & other.keys() if base[k] != other[k]]
    assert len(base.keys() ^ other.keys()) == 1 and not moved, (
        f"one window moved {len(moved)} other windows across the held-out split"
    )


def test_price_windows_straddling_the_public_cutoff_are_embargoed(tmp_path):
    """No held-out window's inputs or target hold a training target: windows whose input
    or forecast period straddles the cutoff are used for neither."""
    run = _run("bank-stocks", **PRICE_SETTINGS, horizon=5)
    spec = whole(
        replace(DataSpec.from_run(run, 1, (1, 30)), data=str(_price_file(tmp_path / "p.csv", "")))
    )
    part = load_partition(spec, 0)
    cutoff = np.datetime64(PRICE_SETTINGS["test_from"], "ns")
    assert len(part.train) and len(part.test)
    assert (part.train.spans[:, 1] < cutoff).all() and (part.test.spans[:, 2] >= cutoff).all()
    whole_data = load_dataset(spec)
    straddling = (whole_data.spans[:, 2] < cutoff) & (whole_data.spans[:, 1] >= cutoff)
    assert straddling.sum() == (30 + 5) * 3  # window + horizon windows per ticker (3)
    assert len(part.train) + len(part.test) + straddling.sum() == len(whole_data)


def _only_the_data_settings_pin(state_dir: Path) -> bool:
    """Nothing in the state directory but the data settings the message pinned (written before
    any data is read, client.held_out.pin_data_settings): no privacy state, no reservation."""
    return not state_dir.exists() or {p.name for p in state_dir.iterdir()} <= {"data-settings.json"}


def _molecule_file(path: Path, extra_label: str = "", drop_extra: bool = False) -> Path:
    import pandas as pd

    from ferry.common.data import synthetic_records

    frame = synthetic_records.make_molecules(EXAMPLES, 0, "target")
    if extra_label:
        row = frame.iloc[[0]].copy()
        row["activity"] = extra_label
        row["smiles"] = "CCCCCCCCCCCCCCCCO"
        frame = pd.concat([frame, row], ignore_index=True)
    frame.to_csv(path, index=False)
    return path


def test_deployed_record_with_a_label_outside_the_public_classes_is_refused_before_training(
    tmp_path, capsys
):
    """The adversary adds a record of a new class (with classes derived from the data it
    renumbered every other record: ``inactive`` 0 -> 2, ``active`` 1 -> 0). With the run's
    public class list the round is refused before any spend; the line naming the label stays
    in the institution's own log, the server gets a generic one."""
    artifact = _backbone("drug-activity")
    run = _run("drug-activity", label_column="activity")
    assert run.names("classes") == ["inactive", "active"]  # the preset's public list
    data = _molecule_file(tmp_path / "m.csv", extra_label="borderline")
    settings = ClientSettings(
        "attacked", tmp_path / "state", tmp_path / "cache", 0, 1, data_path=str(data)
    )
    BackboneCache(settings.cache_dir).store(artifact.manifest, artifact.tensors, artifact.sha256)
    with pytest.raises(FerryError) as err:
        runtime.train_round(settings, RoundRequest(run, 1, artifact.sha256, 2), {})
    to_server = str(err.value)
    assert "\n" not in to_server and "borderline" not in to_server and "classes" in to_server
    local = capsys.readouterr().err
    assert "'borderline'" in local and "m.csv" in local and "(inactive, active)" in local
    assert _only_the_data_settings_pin(settings.state_dir)  # no state opened, nothing reserved


@pytest.mark.parametrize("change", ["add", "remove"])
def test_only_record_of_a_class_added_or_removed_leaves_other_records_labels_and_gradients(
    change, tmp_path
):
    """Under a public class list, the only record of a class coming or going renumbers no
    other record (data-derived ids shifted every other record's label and gradient)."""
    artifact = _backbone("drug-activity")
    run = _run("drug-activity", label_column="activity", classes="inactive,active,borderline")
    with_it = _client_view(
        tmp_path / "with", artifact, run, str(_molecule_file(tmp_path / "w.csv", "borderline")), 3
    )
    without = _client_view(
        tmp_path / "without", artifact, run, str(_molecule_file(tmp_path / "o.csv")), 3
    )
    extra = set(with_it) - set(without)
    assert len(extra) <= 1 and len(with_it) - len(extra) == len(without)
    _assert_others_unchanged(with_it, without, next(iter(extra), b""))


def _images(root: Path, counts: dict[str, int]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = (rng.random((8, 8)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _image_spec(root: Path, classes: tuple[str, ...] = ("benign", "cyst", "malignant")):
    spec = DataSpec(
        "hospital-imaging", input_shape=(1, 8, 8), classes=classes, task="classification"
    )
    return whole(replace(spec, data=str(root)))


def test_institutions_holding_different_classes_agree_on_every_class_id(tmp_path):
    """Class ids are positions in the run's public list, not in the classes an institution
    happens to hold: a hospital without ``benign`` images labels ``malignant`` as the
    others do, and one holding a single class is not refused for it."""
    full = load_dataset(_image_spec(_images(tmp_path / "a", {"benign": 3, "malignant": 3})))
    partial = load_dataset(_image_spec(_images(tmp_path / "b", {"malignant": 3, "cyst": 2})))
    assert full.classes == partial.classes == ["benign", "cyst", "malignant"]
    assert sorted(set(full.y.tolist())) == [0, 2] and sorted(set(partial.y.tolist())) == [1, 2]
    assert (partial.y[:3] == 2).all() or (partial.y[-3:] == 2).all()
    single = load_dataset(_image_spec(_images(tmp_path / "c", {"cyst": 4})))
    assert single.y.tolist() == [1, 1, 1, 1]


def test_image_folder_of_a_class_outside_the_public_list_is_refused_in_one_line(tmp_path):
    root = _images(tmp_path / "d", {"benign": 2, "malignant": 2, "aaa-new": 1})
    with pytest.raises(FerryError, match="'aaa-new'") as err:
        load_dataset(_image_spec(root, ("benign", "malignant")))
    assert "\n" not in str(err.value) and "--classes" in str(err.value)


def test_deployed_institution_refuses_a_run_without_public_classes_or_cutoff(tmp_path):
    """Nothing is derived from a deployed institution's own data: no class list, no cutoff."""
    root = _images(tmp_path / "e", {"benign": 2, "malignant": 2})
    with pytest.raises(FerryError, match="names no classes"):
        load_dataset(_image_spec(root, ()))
    run = _run("bank-stocks", **{**PRICE_SETTINGS, "test_from": ""})
    spec = whole(
        replace(DataSpec.from_run(run, 1, (1, 30)), data=str(_price_file(tmp_path / "p.csv", "")))
    )
    with pytest.raises(FerryError, match="test-from") as err:
        load_partition(spec, 0)
    assert "\n" not in str(err.value)


def test_pretrained_manifest_carries_public_statistics_covered_by_the_backbone_hash():
    artifact = _backbone("hospital-tabular")
    pre = artifact.manifest["preprocessing"]
    width = artifact.manifest["input_shape"][0]
    assert pre["standardize"] == "public"
    assert len(pre["mean"]) == len(pre["std"]) == width and pre["clip"] > 0
    altered = BackboneArtifact(
        {**artifact.manifest, "preprocessing": {**pre, "mean": [0.0] * width}}, artifact.tensors
    )
    with pytest.raises(FerryError, match="hash mismatch"):
        verify(altered)


@pytest.mark.parametrize("scenario", ["hospital-tabular", "bank-stocks"])
def test_backbone_asking_clients_to_fit_statistics_on_private_data_is_refused(scenario, tmp_path):
    """A manifest written before statistics were public (``"standardize": "local"``)."""
    fresh = _backbone(scenario)
    manifest = {k: v for k, v in fresh.manifest.items() if k != "sha256"}
    manifest["preprocessing"] = {"kind": manifest["preprocessing"]["kind"], "standardize": "local"}
    manifest["sha256"] = backbone_digest(manifest, fresh.tensors)
    old = BackboneArtifact(manifest, fresh.tensors)
    with pytest.raises(FerryError, match="ferry pretrain") as err:
        _client_view(tmp_path, old, _run(scenario))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ["tabular-mlp", "series-cnn"])
def test_random_init_backbone_carries_fixed_statistics(arch):
    pre = random_artifact(arch, 0, (5,) if arch == "tabular-mlp" else (2, 30)).manifest[
        "preprocessing"
    ]
    width = 5 if arch == "tabular-mlp" else 2
    assert pre["standardize"] == "public"
    assert pre["mean"] == [0.0] * width and pre["std"] == [1.0] * width


def test_class_list_that_disagrees_with_num_classes_is_refused_before_any_spend(tmp_path):
    """The operator sends a class list and a head width that do not match."""
    artifact = _backbone("drug-activity")
    run = _run("drug-activity", label_column="activity")
    data = _molecule_file(tmp_path / "m.csv")
    settings = ClientSettings(
        "attacked", tmp_path / "state", tmp_path / "cache", 0, 1, data_path=str(data)
    )
    BackboneCache(settings.cache_dir).store(artifact.manifest, artifact.tensors, artifact.sha256)
    with pytest.raises(FerryError, match="2 classes .* num-classes is 3") as err:
        runtime.train_round(settings, RoundRequest(run, 1, artifact.sha256, 3), {})
    assert "\n" not in str(err.value)
    assert _only_the_data_settings_pin(settings.state_dir)
