"""The user's own model and data: an ``nn.Module`` and per-institution arrays in
``ferry.simulate``, and backbones named by import path.

* The README's example (a user-defined ``nn.Module``, scikit-learn's digits as arrays for 3
  hospitals) runs as a script, on Ray; its ledger audits clean and its model predicts, in the
  script and in this process (``ferry.load_model(..., backbone=SmallNet())``).
* The same with ``torch.utils.data.Dataset`` inputs, and an installed backbone named by
  import path, run in this process (``without_ray``).
* The operator names backbone code that no installed package declares: the institution
  refuses it when it is shipped, without importing it.
* Bad input (a split that names no module, a path that does not import, data that does not
  fit the module, a model loaded without its module): one line, nothing written.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import installed_backbone
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import ferry
from ferry.cli import main
from ferry.client.backbone_cache import BackboneCache
from ferry.common.errors import FerryError
from ferry.common.serialization import make_artifact

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_registries(monkeypatch):
    """Backbones and rules resolved by a test stay that test's (the registries are copied)."""
    from ferry.common.backbones import registry
    from ferry.server import aggregation

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_TRUSTED", set(registry._TRUSTED))
    monkeypatch.setattr(aggregation, "_RULES", dict(aggregation._RULES))


EXAMPLE_MARK = "<!-- own-model-example -->"


def readme_example() -> str:
    """The Python block after the README's example mark, as it is."""
    text = (ROOT / "README.md").read_text()
    after = text.split(EXAMPLE_MARK, 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def small_net_class() -> type:
    """``SmallNet`` as the README defines it (the user's class, in the user's code)."""
    scope: dict = {"__name__": "readme_example"}
    exec(readme_example(), scope)  # noqa: S102  (the README's own code)
    return scope["SmallNet"]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> dict:
    """The README example run as a user would run it: ``python example.py`` (Ray)."""
    folder = tmp_path_factory.mktemp("own-model")
    (folder / "example.py").write_text(readme_example())
    env = dict(os.environ)
    env.update(
        FERRY_HOME=str(folder / "ferry-home"),
        FLWR_TELEMETRY_ENABLED="0",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=folder, env=env, capture_output=True, text=True
    )
    audit = subprocess.run(
        [sys.executable, "-m", "ferry", "audit", "runs/digits"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    return {"folder": folder, "run": done, "audit": audit}


@pytest.mark.slow
def test_readme_example_trains_three_hospitals_on_ray_and_its_ledger_audits_clean(readme_run):
    run, audit = readme_run["run"], readme_run["audit"]
    assert run.returncode == 0, run.stderr[-3000:]
    out = readme_run["folder"] / "runs" / "digits"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert set(summary["clients"]) == {"north", "south", "west"}  # the names in the data
    manifest = json.loads((readme_run["folder"] / "models/digits/manifest.json").read_text())
    own = manifest["backbone_manifest"]["pretraining"]
    assert {k: own[k] for k in ("kind", "class", "split")} == {
        "kind": "own-module",
        "class": "SmallNet",
        "split": "fc",
    }
    assert len(own["code_sha256"]) == 64
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
    assert "PASS" in audit.stdout and "3 institutions replayed" in audit.stdout
    for record in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()):
        assert record["participants"] == 3


@pytest.mark.slow
def test_readme_models_predicts_in_the_script_and_after_loading_with_the_users_class(
    readme_run,
):
    printed = re.search(r"accuracy on all 1797 digits: ([0-9.]+)", readme_run["run"].stdout)
    assert printed, readme_run["run"].stdout[-2000:]
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[:, None]
    model, preprocess = ferry.load_model(
        readme_run["folder"] / "models/digits", backbone=small_net_class()()
    )
    with torch.no_grad():
        accuracy = (model(preprocess(x)).argmax(1).numpy() == digits.target).mean()
    assert f"{accuracy:.3f}" == printed.group(1)
    assert accuracy > 0.3  # ten classes: far above chance after 3 DP rounds


@pytest.mark.slow
def test_loading_a_model_of_an_own_module_without_or_with_another_module_is_refused(
    readme_run,
):
    folder = readme_run["folder"] / "models/digits"
    # A fresh process, which never saw SmallNet: the command line says what to do.
    fresh = subprocess.run(
        [sys.executable, "-m", "ferry", "predict", str(folder), "--data", "x", "--out", "p.csv"],
        cwd=readme_run["folder"],
        capture_output=True,
        text=True,
    )
    assert fresh.returncode == 2 and len(fresh.stderr.strip().splitlines()) == 1, fresh.stderr
    assert "your own SmallNet cut at 'fc': pass an instance, ferry.load_model(" in fresh.stderr
    assert not (readme_run["folder"] / "p.csv").exists()

    class Wider(small_net_class()):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(256, 10)
            self.features[0] = nn.Conv2d(1, 32, 3, padding=1)

    with pytest.raises(FerryError, match="build the module as it was built for training"):
        ferry.load_model(folder, backbone=Wider())


def _tensor_hospitals(n_per: int = 120) -> list[TensorDataset]:
    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype("float32")[:, None])
    y = torch.from_numpy(digits.target)
    return [TensorDataset(x[i::3][:n_per], y[i::3][:n_per]) for i in range(3)]


def test_datasets_and_an_own_module_run_with_the_same_privacy_machinery(tmp_path, without_ray):
    SmallNet = small_net_class()
    torch.manual_seed(1)
    run = ferry.simulate(
        data=_tensor_hospitals(),
        backbone=SmallNet(),
        split="features.3",  # the Flatten: its input (16 x 4 x 4) is the feature vector
        rounds=1,
        epsilon=4.0,
        out=str(tmp_path / "run"),
        log=lambda *_: None,
    )
    assert set(run.privacy) == {"institution-1", "institution-2", "institution-3"}  # the data's
    assert all(0 < p["epsilon"] <= 4.0 for p in run.privacy.values())
    events = [json.loads(line)["event"] for line in run.ledger.read_text().splitlines()]
    assert events.count("client_trained") == 3
    assert main(["audit", str(run.out)]) == 0
    model, preprocess = run.model()
    x = _tensor_hospitals()[0].tensors[0].numpy()[:16]
    again, pre = ferry.load_model(run.out / "exported", backbone=SmallNet())
    with torch.no_grad():
        assert torch.equal(model(preprocess(x)), again(pre(x)))


@pytest.mark.slow
def test_a_backbone_by_import_path_from_an_installed_package(tmp_path, without_ray, monkeypatch):
    site = installed_backbone.install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    out = tmp_path / "run"
    argv = ["simulate", "--backbone", installed_backbone.PATH, "--weights", "random"]
    argv += ["--clients", "2", "--rounds", "1", "--examples", "300", "--out", str(out)]
    assert main(argv) == 0
    model = json.loads((out / "model" / "model.json").read_text())
    assert model["architecture"] == installed_backbone.PATH


def test_the_operator_cannot_make_an_institution_import_undeclared_code(tmp_path, monkeypatch):
    """A registered operator ships a backbone whose manifest names a module that is installed
    at the institution but that no package declares as a Ferry backbone (its import has a side
    effect). The institution refuses it at shipping, naming what to install, and never
    imports it; a declared one it accepts."""
    site = installed_backbone.install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    mark = tmp_path / "imported"
    monkeypatch.setenv("FERRY_TEST_MARK", str(mark))
    monkeypatch.delenv("FERRY_BACKBONE_CODE", raising=False)
    import ferry_testnets

    trunk = ferry_testnets.tiny_cnn()
    manifest = {
        "architecture": installed_backbone.UNDECLARED,
        "feature_dim": 32,
        "input_shape": [1, 32, 32],
        "preprocessing": {"grayscale": True, "size": 32},
    }
    hostile = make_artifact(manifest, trunk)
    cache = BackboneCache(tmp_path / "cache")
    with pytest.raises(FerryError) as refused:
        cache.store(hostile.manifest, hostile.tensors, hostile.sha256)
    assert "install the package that provides ferry_testnets_side_effect" in str(refused.value)
    assert not mark.exists() and "ferry_testnets_side_effect" not in sys.modules
    assert not cache.path(hostile.sha256).exists()
    declared = make_artifact({**manifest, "architecture": installed_backbone.PATH}, trunk)
    cache.store(declared.manifest, declared.tensors, declared.sha256)
    assert cache.has(declared.sha256)


def _one_line_exit_2(capsys, argv: list[str], words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


@pytest.mark.parametrize(
    ("backbone", "words"),
    [
        ("nosuchpkg.models:build_net", "does not import here (No module named 'nosuchpkg')"),
        ("ferry_testnets:nope", "ferry_testnets has no 'nope'"),
        ("os:getcwd", "is not a Ferry backbone: decorate its builder with @ferry.backbone"),
        ("not a path:x", "is not an import path"),
    ],
)
def test_a_backbone_path_that_does_not_give_a_backbone_is_one_line_exit_2(
    backbone, words, tmp_path, capsys, monkeypatch
):
    monkeypatch.syspath_prepend(str(installed_backbone.install(tmp_path / "site")))
    out = tmp_path / "run"
    _one_line_exit_2(
        capsys,
        ["simulate", "--backbone", backbone, "--weights", "random", "--out", str(out)],
        words,
    )
    assert not out.exists()


def test_bad_own_module_input_is_a_clear_error_before_anything_is_written(tmp_path):
    SmallNet = small_net_class()
    data = [(np.zeros((20, 1, 8, 8), np.float32), np.arange(20) % 2)] * 3
    out = tmp_path / "run"
    cases = [
        ({"backbone": SmallNet(), "split": "head"}, "split 'head' names no module of SmallNet"),
        (
            {"backbone": SmallNet(), "split": "fc", "data": [(np.zeros((20, 3)), np.zeros(20))]},
            "SmallNet does not run on inputs of shape (3,)",
        ),
        ({"backbone": "ferry-cnn", "split": "fc"}, "applies to an nn.Module backbone"),
        ({"backbone": SmallNet(), "split": "fc", "clients": 2}, "leave clients out"),
        ({"data": {"a": np.zeros((4, 1, 8, 8))}}, "must be (x, y) arrays or a torch Dataset"),
    ]
    for settings, words in cases:
        settings = {"data": data, "out": str(out), **settings}
        with pytest.raises(FerryError, match=re.escape(words)):
            ferry.simulate(log=lambda *_: None, **settings)
        assert not out.exists()


RULE = '''
import numpy as np


def plain_mean(changes, names, counts, policy):
    """Every institution's change counts the same, whatever it claims."""
    shares = {n: 1 / len(names) for n in names}
    return [np.mean([c[j] for c in changes], axis=0) for j in range(len(changes[0]))], shares
'''


@pytest.mark.slow
def test_the_operators_own_aggregation_rule_by_import_path(tmp_path, without_ray, monkeypatch):
    """``--aggregation myrules:plain_mean`` combines the rounds (after the usual bound) and
    the ledger names it; institutions pass the name along and never import it."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "myrules.py").write_text(RULE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = tmp_path / "run"
    argv = ["simulate", "--aggregation", "myrules:plain_mean", "--weights", "random"]
    argv += ["--clients", "3", "--rounds", "1", "--examples", "400", "--out", str(out)]
    assert main(argv) == 0
    (aggregated,) = (
        r
        for r in map(json.loads, (out / "ledger.jsonl").read_text().splitlines())
        if r["event"] == "round_aggregated"
    )
    assert aggregated["rule"] == "myrules:plain_mean"
    assert set(aggregated["weights"].values()) == {1 / 3}  # FedAvg's differ: Dirichlet sizes


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        ("myrules:nope", "aggregation rule 'myrules:nope': myrules has no 'nope'"),
        ("nosuchrules:mean", "aggregation rule 'nosuchrules:mean' does not import here"),
        ("myrules:np", "is a module, not a function"),
        ("mean-of-means", "use fedavg, trimmed-mean, median, krum, or your own rule"),
    ],
)
def test_a_bad_aggregation_rule_is_one_line_exit_2_before_anything_is_written(
    rule, words, tmp_path, capsys, monkeypatch
):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "myrules.py").write_text(RULE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = tmp_path / "run"
    argv = ["simulate", "--aggregation", rule, "--weights", "random", "--out", str(out)]
    _one_line_exit_2(capsys, argv, words)
    assert not out.exists()


BROKEN = """
import ferry_testnets

raise RuntimeError("cannot read /home/hospital/secret.yaml: patient_id=12345")
"""


def test_a_backbone_whose_code_fails_to_import_tells_the_operator_nothing_of_the_institution(
    tmp_path, monkeypatch, capsys
):
    """The operator ships a backbone naming code the institution trusts but whose import fails
    with a message quoting local paths and settings: the server's refusal is one generic line,
    the details stay in the institution's own log."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    import ferry.client.app as client_app

    from inprocess_grid import act_as_server_app

    site = installed_backbone.install(tmp_path / "site")
    (site / "ferry_testnets_broken.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("FERRY_BACKBONE_CODE", "ferry_testnets_broken:tiny_cnn")
    act_as_server_app(monkeypatch)
    import ferry_testnets

    manifest = {"architecture": "ferry_testnets_broken:tiny_cnn", "feature_dim": 32}
    art = make_artifact({**manifest, "input_shape": [1, 32, 32]}, ferry_testnets.tiny_cnn())
    content = RecordDict(
        {
            "run": ConfigRecord({"sha256": art.sha256, "manifest": json.dumps(art.manifest)}),
            "backbone": ArrayRecord({k: Array(v) for k, v in art.tensors.items()}),
        }
    )
    deployed = {
        "institution": "hospital-a",
        "data-path": str(tmp_path / "data.csv"),
        "state-dir": str(tmp_path / "state"),
        "cache-dir": str(tmp_path / "cache"),
        "budget-epsilon": 3.0,
        "budget-delta": 1e-5,
    }
    context = Context(run_id=1, node_id=1, node_config=deployed, state=RecordDict(), run_config={})
    msg = Message(content, dst_node_id=1, message_type="query.backbone_ship")
    reply = client_app.backbone_ship(msg, context)
    reason = str(reply.content["refusal"]["reason"])
    assert "could not load the backbone's code: details in its own log" in reason
    assert "patient_id" not in reason and "secret" not in reason
    assert "patient_id=12345" in capsys.readouterr().err  # the institution's own log


NET = """
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc({body})
"""


def test_editing_forward_makes_a_new_backbone_hash(tmp_path, monkeypatch):
    """Same class name, layout and weights, another forward pass (the user edited it): another
    backbone hash, so features cached for the old one are not reused."""
    from ferry.api import _own_backbone

    monkeypatch.syspath_prepend(str(tmp_path))
    built = []
    for module, body in (("net_a", "self.body(x)"), ("net_b", "self.body(x) * 2")):
        (tmp_path / f"{module}.py").write_text(NET.format(body=body))
        torch.manual_seed(0)
        built.append(_own_backbone(importlib.import_module(module).Net(), "fc", (4,)))
    (name_a, folder_a, _), (name_b, folder_b, _) = built
    assert name_a == name_b  # the architecture's name: class, split, layout
    assert folder_a != folder_b  # the backbone: weights and manifest, with the code's digest


def test_the_institutions_arrays_and_the_module_pickle_are_private_files(tmp_path, without_ray):
    run = ferry.simulate(
        data=_tensor_hospitals(40),
        backbone=small_net_class()(),
        split="fc",
        rounds=1,
        epsilon=8.0,
        out=str(tmp_path / "run"),
        log=lambda *_: None,
    )
    arrays = Path(run.summary["run"]["data"])
    pickle = Path(run.summary["run"]["weights"]) / "module.pickle"
    for path in (arrays, pickle):
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert path.parent.stat().st_mode & 0o077 == 0, path.parent


@pytest.mark.parametrize(
    "names", ['["../../escape"]', '["north", "north"]', "not json", "[1]", '{"a": 1}', '[""]']
)
def test_institution_names_in_a_run_record_must_be_plain_distinct_names(names):
    """The names travel in the run record (simulation): a value that could name a folder
    outside the state root, or repeat one, is refused where the record is parsed."""
    from ferry.common.message_fields import MessageRejected, institution_names

    with pytest.raises(MessageRejected):
        institution_names(names)
    assert institution_names('["north", "st-marys.2"]') == ("north", "st-marys.2")
