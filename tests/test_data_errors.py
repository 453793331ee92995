"""Bad data files fail `ferry simulate` before Ray starts: exit 2, one line naming the
file, the row or column, and the fix; nothing is written to --out."""

from __future__ import annotations

from pathlib import Path

import flwr.simulation
import numpy as np
import pytest
from PIL import Image

from ferry.cli import main


@pytest.fixture(autouse=True)
def no_simulation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def run_simulation(*args, **kwargs):
        raise AssertionError("the simulation engine was started; the input should be refused")

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_simulation)
    monkeypatch.chdir(tmp_path)


def _error_line(capsys, argv: list[str], out: Path) -> str:
    code = main([*argv, "--weights", "random", "--out", str(out)])
    _, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ferry: error: "), lines
    assert not out.exists() or not any(out.iterdir()), "something was written to --out"
    return lines[0]


def _table(path: Path, rows: int = 40, overrides: dict | None = None) -> Path:
    """A small patients table; ``overrides`` maps a file line number to that line's values."""
    overrides = overrides or {}
    rng = np.random.default_rng(0)
    lines = ["age,bmi,smoker,outcome"]
    for i in range(rows):
        row = [str(rng.integers(20, 90)), f"{rng.normal(27, 4):.1f}", "yes" if i % 3 else "no"]
        row.append("yes" if i % 4 == 0 else "no")
        lines.append(",".join(overrides.get(i + 2, row)))
    path.write_text("\n".join(lines) + "\n")
    return path


def _table_error(capsys, data: Path, label: str = "outcome", clients: int = 2) -> str:
    """The error line of `ferry simulate --scenario hospital-tabular` on ``data``."""
    argv = ["simulate", "--scenario", "hospital-tabular", "--data", str(data)]
    argv += ["--label-column", label, "--clients", str(clients)]
    return _error_line(capsys, argv, data.parent / "out")


def test_table_without_the_label_column_names_file_column_and_fix(capsys, tmp_path):
    data = _table(tmp_path / "patients.csv")
    line = _table_error(capsys, data, "diagnosis")
    assert "patients.csv" in line and "'diagnosis'" in line and "--label-column" in line


def test_non_numeric_value_in_numeric_column_names_line_and_column(capsys, tmp_path):
    data = _table(tmp_path / "patients.csv", overrides={7: ["61", "abc", "no", "no"]})
    line = _table_error(capsys, data)
    assert "patients.csv" in line and "line 7" in line and "'bmi'" in line
    assert "--categorical bmi" in line


def test_single_class_label_is_refused(capsys, tmp_path):
    data = tmp_path / "patients.csv"
    data.write_text("age,outcome\n" + "".join(f"{30 + i},no\n" for i in range(30)))
    line = _table_error(capsys, data)
    assert "patients.csv" in line and "class" in line


def test_fewer_rows_than_clients_is_refused(capsys, tmp_path):
    data = _table(tmp_path / "patients.csv", rows=4)
    line = _table_error(capsys, data, clients=5)
    assert "patients.csv" in line and "5 clients" in line and "--clients" in line


def test_price_file_without_its_date_column_names_the_column(capsys, tmp_path):
    data = tmp_path / "prices.csv"
    data.write_text("day,close\n" + "".join(f"2024-01-{d:02d},{100 + d}\n" for d in range(1, 29)))
    line = _error_line(
        capsys,
        [
            "simulate",
            "--scenario",
            "bank-stocks",
            "--data",
            str(data),
            "--date-column",
            "date",
            "--window",
            "5",
            "--clients",
            "2",
        ],
        tmp_path / "out",
    )
    assert "prices.csv" in line and "'date'" in line


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("benign", "malignant"):
        (root / label).mkdir(parents=True)
        for i in range(12):
            pixels = (rng.random((32, 32)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    (root / "malignant" / "broken.png").write_bytes(b"not a png at all")
    return root


def test_unreadable_image_is_named_and_can_be_skipped_with_a_count(capsys, tmp_path):
    data = _image_folder(tmp_path / "scans")
    line = _error_line(
        capsys,
        ["simulate", "--data", str(data), "--clients", "2", "--delta", "1e-3"],
        tmp_path / "out",
    )
    assert "broken.png" in line

    from ferry.common.data.datasets import DataSpec, load_dataset

    spec = DataSpec(data=str(data), num_partitions=2, skip_unreadable=True)
    dataset = load_dataset(spec)
    _, err = capsys.readouterr()
    assert len(dataset) == 24
    assert "skipped 1" in err or "1 unreadable" in err, err


def test_label_outside_the_public_classes_names_the_line_the_label_and_the_fix(capsys, tmp_path):
    data = _table(tmp_path / "patients.csv", overrides={9: ["61", "27.0", "no", "maybe"]})
    argv = ["simulate", "--scenario", "hospital-tabular", "--data", str(data)]
    argv += ["--label-column", "outcome", "--clients", "2", "--classes", "no,yes"]
    line = _error_line(capsys, argv, tmp_path / "out")
    assert "patients.csv" in line and "line 9" in line and "'maybe'" in line
    assert "(no, yes)" in line and "--classes" in line


def test_image_folder_outside_the_public_classes_is_refused(capsys, tmp_path):
    root = _image_folder(tmp_path / "scans")
    argv = ["simulate", "--scenario", "hospital-imaging", "--data", str(root)]
    argv += ["--clients", "2", "--classes", "benign,cyst"]
    line = _error_line(capsys, argv, tmp_path / "out")
    assert "'malignant'" in line and "(benign, cyst)" in line


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--classes", "only-one", "at least two distinct"),
        ("--classes", "a,b,a", "at least two distinct"),
        ("--test-from", "2024-13-01", "YYYY-MM-DD"),
    ],
)
def test_bad_public_classes_or_cutoff_is_refused(capsys, tmp_path, option, value, words):
    data = _table(tmp_path / "patients.csv")
    argv = ["simulate", "--scenario", "hospital-tabular", "--data", str(data)]
    argv += ["--label-column", "outcome", option, value]
    line = _error_line(capsys, argv, tmp_path / "out")
    assert option in line and words in line


def test_public_classes_with_a_regression_task_are_refused(capsys, tmp_path):
    data = _table(tmp_path / "patients.csv")
    argv = ["simulate", "--scenario", "hospital-tabular", "--data", str(data)]
    argv += ["--label-column", "bmi", "--task", "regression", "--classes", "a,b"]
    line = _error_line(capsys, argv, tmp_path / "out")
    assert "--classes" in line and "regression" in line
