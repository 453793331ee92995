"""Bad input to ``ferry simulate`` fails before Ray starts: exit 2, one line, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import flwr.simulation
import pytest

from ferry.cli import main
from ferry.common.errors import FerryError
from ferry.common.serialization import MANIFEST_FILE, WEIGHTS_FILE

# Small data so that checks which need the dataset (delta vs 1/n, output dir) stay fast.
SMALL = ["--examples", "200", "--clients", "2"]


@pytest.fixture(autouse=True)
def no_simulation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list:
    """Fail loudly (and fast) if a command gets as far as starting the simulation engine."""
    calls: list = []

    def run_simulation(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("the simulation engine was started; the input should be refused")

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_simulation)
    monkeypatch.chdir(tmp_path)  # a default --out (runs/...) would land here, not in the repo
    return calls


def _run_expecting_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}; stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("ferry: error: ")
    assert len(lines[0]) > len("ferry: error: ")
    return lines[0]


def test_unknown_backbone_name_is_one_line_error_listing_known_ones(capsys, tmp_path):
    line = _run_expecting_error(
        capsys,
        ["simulate", "--backbone", "nope", "--weights", "random", "--out", str(tmp_path / "o")],
    )
    assert "unknown backbone 'nope'" in line and "ferry-cnn" in line


def test_missing_weights_file_is_one_line_error(capsys, tmp_path):
    line = _run_expecting_error(
        capsys, ["simulate", "--weights", "/nonexistent", "--out", str(tmp_path / "o")]
    )
    assert "no backbone weights at /nonexistent" in line


def test_missing_default_pretrained_backbone_says_to_pretrain(capsys, tmp_path):
    line = _run_expecting_error(capsys, ["simulate", "--out", str(tmp_path / "o")])
    assert "ferry pretrain" in line


def test_corrupt_weights_file_is_one_line_error(capsys, tmp_path, artifact):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / WEIGHTS_FILE).write_bytes(b"\x00\x01 this is not a safetensors file \xff" * 50)
    (weights / MANIFEST_FILE).write_text(json.dumps(artifact.manifest))
    line = _run_expecting_error(
        capsys, ["simulate", "--weights", str(weights), "--out", str(tmp_path / "o")]
    )
    assert "corrupt" in line


def test_tampered_weights_are_one_line_hash_error(capsys, tmp_path, artifact_dir):
    manifest = json.loads((artifact_dir / MANIFEST_FILE).read_text())
    manifest["pretraining"]["seed"] = 12345
    (artifact_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    line = _run_expecting_error(
        capsys, ["simulate", "--weights", str(artifact_dir), "--out", str(tmp_path / "o")]
    )
    assert "hash mismatch" in line


@pytest.mark.parametrize("layout", ["empty", "class-folders-without-images"])
def test_data_directory_without_usable_examples_is_one_line_error(capsys, tmp_path, layout):
    data = tmp_path / "data"
    data.mkdir()
    if layout == "class-folders-without-images":
        for name in ("benign", "malignant"):
            (data / name).mkdir()
            (data / name / "README.txt").write_text("no images here")
    line = _run_expecting_error(
        capsys,
        ["simulate", "--weights", "random", "--data", str(data), "--out", str(tmp_path / "o")],
    )
    expected = "no class subfolders" if layout == "empty" else "no usable images"
    assert expected in line


def test_negative_noise_multiplier_is_one_line_error(capsys, tmp_path):
    line = _run_expecting_error(
        capsys,
        [
            "simulate",
            "--weights",
            "random",
            "--noise-multiplier",
            "-1",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "--noise-multiplier" in line


def test_zero_noise_multiplier_without_non_private_is_one_line_error(capsys, tmp_path):
    line = _run_expecting_error(
        capsys,
        ["simulate", "--weights", "random", "--noise-multiplier", "0", "--out", str(tmp_path)],
    )
    assert "--non-private" in line


def test_delta_not_below_one_over_n_is_one_line_error(capsys, tmp_path):
    line = _run_expecting_error(
        capsys,
        ["simulate", "--delta", "0.5", "--weights", "random", *SMALL, "--out", str(tmp_path / "o")],
    )
    assert "--delta 0.5" in line and "1/n" in line


@pytest.mark.parametrize("existing", ["summary.json", "metrics.jsonl"])
def test_output_dir_that_already_holds_a_run_is_refused_untouched(capsys, tmp_path, existing):
    out = tmp_path / "previous-run"
    out.mkdir()
    (out / existing).write_text('{"kept": true}\n')
    line = _run_expecting_error(
        capsys, ["simulate", "--weights", "random", *SMALL, "--out", str(out)]
    )
    assert "already holds a run" in line
    assert (out / existing).read_text() == '{"kept": true}\n'
    assert sorted(p.name for p in out.iterdir()) == [existing]


def test_unknown_config_file_key_is_one_line_error(capsys, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('weights = "random"\nepsilonn = 3.0\n')
    line = _run_expecting_error(capsys, ["simulate", "--config", str(config)])
    assert "unknown setting 'epsilonn'" in line


def test_non_numeric_noise_multiplier_in_config_file_is_one_line_error(capsys, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('weights = "random"\nnoise_multiplier = "lots"\n')
    line = _run_expecting_error(capsys, ["simulate", "--config", str(config)])
    assert "noise" in line


def test_pretrain_with_zero_epochs_is_one_line_error(capsys, tmp_path):
    line = _run_expecting_error(
        capsys, ["pretrain", "--epochs", "0", "--examples", "200", "--out", str(tmp_path / "p")]
    )
    assert "--epochs" in line


def test_debug_flag_shows_the_traceback_instead(tmp_path):
    with pytest.raises(FerryError, match="unknown backbone"):
        main(["--debug", "simulate", "--backbone", "nope", "--weights", "random"])


def test_refused_inputs_never_reached_the_simulation_engine(capsys, no_simulation):
    """Guard for the guard: the stub above really replaces what ``simulate`` calls."""
    with pytest.raises(AssertionError, match="simulation engine was started"):
        main(["simulate", "--weights", "random", *SMALL, "--rounds", "1"])
    assert len(no_simulation) == 1
