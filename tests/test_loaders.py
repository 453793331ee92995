"""Loaders turn an institution's files into one Dataset, statelessly, and every bad input is
one FerryError line naming the file, the row or column, and the fix.

Files are written to tmp_path in each format a user holds (CSV, Parquet, PNG, DICOM).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ferry.common.data.dataset import Dataset
from ferry.common.data.image_folder import load_image_folder, load_images
from ferry.common.data.molecules import load_molecules
from ferry.common.data.series import load_series
from ferry.common.data.synthetic_records import (
    make_credit,
    make_molecules,
    make_patients,
    make_prices,
    synthetic_dataset,
)
from ferry.common.data.tabular import hash_buckets_of, load_table
from ferry.common.errors import FerryError


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(FerryError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


PATIENTS = "age,sex,bmi,site,outcome\n50,F,22.5,a,yes\n61,M,,b,no\n70, M ,31,a,yes\n44,,27,b,no\n"


# ---------------------------------------------------------------- tables


def test_table_keeps_numbers_with_nan_and_hashes_categories(tmp_path):
    data = load_table(_csv(tmp_path / "p.csv", PATIENTS), "outcome", group_column="site")

    assert isinstance(data, Dataset) and data.modality == "tabular"
    assert data.task == "classification" and data.classes == ["no", "yes"]
    assert data.y.tolist() == [1, 0, 1, 0]
    assert data.groups.tolist() == ["a", "b", "a", "b"]
    assert data.columns[0] == "age" and data.columns[-1] == "bmi"
    assert data.columns[1:17] == [f"sex=<bucket {b}>" for b in range(16)]
    assert data.numeric.tolist() == [True] + [False] * 16 + [True]
    assert data.x.dtype == np.float32 and data.x.shape == (4, 18)
    assert np.isnan(data.x[1, -1]) and data.x[2, -1] == 31
    male = sorted(hash_buckets_of("sex", "M", 16))
    assert np.flatnonzero(data.x[1, 1:17]).tolist() == male
    assert np.array_equal(data.x[1, 1:17], data.x[2, 1:17])  # " M " is "M"
    assert not data.x[3, 1:17].any()  # a missing category sets no indicator


def test_parquet_and_csv_of_one_table_load_to_the_same_examples(tmp_path):
    frame = make_credit(120, seed=1)
    frame.to_csv(tmp_path / "loans.csv", index=False)
    frame.to_parquet(tmp_path / "loans.parquet")

    a = load_table(tmp_path / "loans.csv", "default", group_column="branch")
    b = load_table(tmp_path / "loans.parquet", "default", group_column="branch")

    assert a.columns == b.columns and a.classes == b.classes == ["0", "1"]
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.fingerprint != b.fingerprint


def test_category_layout_needs_no_shared_vocabulary(tmp_path):
    one = load_table(_csv(tmp_path / "one.csv", "smoker,y\nnever,0\ncurrent,1\n"), "y")
    two = load_table(_csv(tmp_path / "two.csv", "smoker,y\nformer,0\ncurrent,1\n"), "y")

    assert one.columns == two.columns
    np.testing.assert_array_equal(one.x[1], two.x[1])
    assert not np.array_equal(one.x[0], two.x[0])


def test_codes_written_as_3_and_3_point_0_are_one_category(tmp_path):
    path = _csv(tmp_path / "c.csv", "ward,y\n3,0\n3.0,1\n007,0\n7,1\n")
    data = load_table(path, "y", categorical=["ward"])
    assert np.array_equal(data.x[0], data.x[1])
    assert not np.array_equal(data.x[2], data.x[3])  # a leading-zero code stays a text code


def test_a_few_words_in_a_numeric_column_name_the_line_and_column(tmp_path):
    path = _csv(tmp_path / "p.csv", "age,bmi,y\n50,12.5,0\n\n61,abc,1\n70,7,1\n")
    message = _error(load_table, path, "y")
    assert str(path) in message
    assert "line 4 (line 1 is the header)" in message  # the blank line 3 still counts
    assert "column 'bmi'" in message and "'abc'" in message
    assert "--categorical bmi" in message
    assert load_table(path, "y", categorical=["bmi"]).numeric.tolist()[0] is True


def test_parquet_errors_count_data_rows_from_1(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"bmi": ["12.5", "7", "x", "8"], "y": [0, 1, 0, 1]}).to_parquet(path)
    message = _error(load_table, path, "y")
    assert "row 3 (the first data row is row 1)" in message and "column 'bmi'" in message


def test_auto_task_picks_classification_for_few_integers_or_text(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=60), "grade": rng.integers(0, 12, 60)})
    frame["price"] = rng.normal(100, 10, 60)
    frame["kind"] = rng.choice(["cat", "dog"], 60)
    frame.to_csv(tmp_path / "t.csv", index=False)

    grade = load_table(tmp_path / "t.csv", "grade")
    assert grade.task == "classification"
    assert grade.classes == sorted(grade.classes, key=int)  # by value, not "10" < "2"
    price = load_table(tmp_path / "t.csv", "price")
    assert price.task == "regression" and price.y.dtype == np.float32 and price.classes == []
    assert load_table(tmp_path / "t.csv", "kind").classes == ["cat", "dog"]
    assert load_table(tmp_path / "t.csv", "grade", task="regression").task == "regression"
    message = _error(load_table, tmp_path / "t.csv", "kind", task="regression")
    assert "line 2" in message and "column 'kind'" in message and "--task classification" in message


def test_table_file_errors_name_the_file_and_the_fix(tmp_path):
    assert "check the --data path" in _error(load_table, tmp_path / "none.csv", "y")
    (tmp_path / "t.xlsx").write_bytes(b"PK")
    assert ".csv" in _error(load_table, tmp_path / "t.xlsx", "y")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    message = _error(load_table, tmp_path / "bad.parquet", "y")
    assert "bad.parquet" in message and "not a readable Parquet" in message
    (tmp_path / "latin.csv").write_bytes("name,y\ncaf\xe9,1\n".encode("latin-1"))
    assert "UTF-8" in _error(load_table, tmp_path / "latin.csv", "y")
    assert "empty" in _error(load_table, _csv(tmp_path / "e.csv", ""), "y")


def test_table_content_errors_name_row_column_and_fix(tmp_path):
    path = _csv(tmp_path / "p.csv", PATIENTS)
    message = _error(load_table, path, "outcom")
    assert "'outcom'" in message and "age, sex, bmi, site, outcome" in message

    holes = _csv(tmp_path / "h.csv", "a,y\n1,0\n2,\n3,1\n")
    message = _error(load_table, holes, "y")
    assert "line 3" in message and "label column 'y' is empty" in message

    one = _csv(tmp_path / "one.csv", "a,y\n1,1\n2,1\n")
    assert "single class" in _error(load_table, one, "y")

    message = _error(load_table, path, "outcome", min_rows=5)
    assert message.startswith(f"4 rows in {path} cannot be split among 5 clients")
    assert "fewer --clients" in message

    only = _csv(tmp_path / "only.csv", "site,y\na,0\nb,1\n")
    assert "no feature columns" in _error(load_table, only, "y", group_column="site")

    no_site = _csv(tmp_path / "ns.csv", "a,site,y\n1,x,0\n2,,1\n")
    message = _error(load_table, no_site, "y", group_column="site")
    assert "line 3" in message and "partition column 'site'" in message
    assert "'nope'" in _error(load_table, path, "outcome", categorical=["nope"])


# ---------------------------------------------------------------- price series


def _prices(tmp_path: Path, days: int = 40) -> tuple[Path, pd.DataFrame]:
    rng = np.random.default_rng(0)
    dates = pd.bdate_range("2021-01-04", periods=days).strftime("%Y-%m-%d")
    frame = pd.DataFrame(
        {
            "date": list(dates) * 2,
            "ticker": ["AAA"] * days + ["BBB"] * days,
            "close": 100 * np.exp(np.cumsum(rng.normal(0, 0.02, 2 * days))),
            "open": 100 * np.exp(np.cumsum(rng.normal(0, 0.02, 2 * days))),
        }
    )
    shuffled = frame.sample(frac=1.0, random_state=1)  # the loader sorts by date
    path = tmp_path / "prices.csv"
    shuffled.to_csv(path, index=False)
    return path, frame


def test_series_windows_hold_percent_log_returns_per_ticker(tmp_path):
    path, frame = _prices(tmp_path)
    data = load_series(path, "date", ["close", "open"], window=5, horizon=2, group_column="ticker")

    assert data.modality == "series" and data.task == "regression" and data.directional
    assert data.x.shape == (2 * (40 - 5 - 2), 2, 5) and data.columns == ["close", "open"]
    assert data.groups.tolist() == ["AAA"] * 33 + ["BBB"] * 33
    for ticker, first in (("AAA", 0), ("BBB", 33)):
        part = frame[frame.ticker == ticker]
        close = 100 * np.diff(np.log(part.close.to_numpy()))
        opens = 100 * np.diff(np.log(part.open.to_numpy()))
        np.testing.assert_allclose(data.x[first, 0], close[:5], rtol=1e-4)
        np.testing.assert_allclose(data.x[first, 1], opens[:5], rtol=1e-4)
        np.testing.assert_allclose(data.y[first], close[5:7].sum(), rtol=1e-4)
        np.testing.assert_allclose(data.y[first + 32], close[-2:].sum(), rtol=1e-4)


def test_series_windows_carry_the_dates_of_their_forecast_period(tmp_path):
    path, frame = _prices(tmp_path)
    data = load_series(path, "date", ["close"], window=5, horizon=2, group_column="ticker")
    dates = pd.to_datetime(frame.date[frame.ticker == "AAA"]).to_numpy(dtype="datetime64[ns]")
    # window i: returns on rows i+1..i+5 as input (read from the prices of rows i..i+5), the
    # returns on rows i+6..i+7 as target
    assert data.spans.shape == (66, 3)
    assert data.spans[0].tolist() == dates[[6, 7, 0]].tolist()
    assert data.spans[32].tolist() == dates[[38, 39, 32]].tolist()
    assert data.subset(np.asarray([32])).spans.tolist() == data.spans[[32]].tolist()


def test_series_target_column_and_parquet(tmp_path):
    _, frame = _prices(tmp_path)
    frame["date"] = pd.to_datetime(frame["date"])
    frame.to_parquet(tmp_path / "p.parquet")
    data = load_series(
        tmp_path / "p.parquet",
        "date",
        ["close"],
        target_column="open",
        window=3,
        group_column="ticker",
    )
    opens = 100 * np.diff(np.log(frame.open.to_numpy()[:40]))
    np.testing.assert_allclose(data.y[0], opens[3], rtol=1e-4)
    every_price = load_series(tmp_path / "p.parquet", "date", None, window=3, group_column="ticker")
    assert every_price.columns == ["close", "open"]  # all numeric columns but date and ticker


def test_series_errors_name_row_column_and_fix(tmp_path):
    text = "date,close\n2021-01-04,10\n2021-01-05,11\n2021-01-06,12\n2021-01-07,13\n"
    ok = _csv(tmp_path / "ok.csv", text)
    assert "'day'" in _error(load_series, ok, "day", window=2)
    message = _error(load_series, ok, "date", window=3, horizon=1)
    assert "at least 5 dated rows" in message and "it has 4" in message

    bad_date = _csv(tmp_path / "d.csv", text.replace("2021-01-06", "yesterday"))
    message = _error(load_series, bad_date, "date", window=1)
    assert "line 4" in message and "'yesterday'" in message and "YYYY-MM-DD" in message

    zero = _csv(tmp_path / "z.csv", text.replace(",12\n", ",0\n"))
    message = _error(load_series, zero, "date", ["close"], window=1)
    assert "line 4" in message and "column 'close'" in message and "not positive" in message

    word = _csv(tmp_path / "w.csv", text.replace(",12\n", ",n/a?\n"))
    message = _error(load_series, word, "date", ["close"], window=1)
    assert "line 4" in message and "'n/a?' is not a number" in message

    twice = _csv(tmp_path / "t.csv", text.replace("2021-01-06", "2021-01-05"))
    message = _error(load_series, twice, "date", window=1)
    assert "line 3" in message and "line 4" in message and "2021-01-05" in message


def test_series_skips_short_tickers_and_says_so(tmp_path):
    _, frame = _prices(tmp_path)
    short = frame[(frame.ticker == "AAA") | (frame.index < 43)]  # BBB keeps 3 rows
    short.to_csv(tmp_path / "s.csv", index=False)
    said: list[str] = []
    data = load_series(
        tmp_path / "s.csv", "date", ["close"], window=5, group_column="ticker", log=said.append
    )
    assert set(data.groups) == {"AAA"} and "BBB" in said[0] and "1 of 2" in said[0]


# ---------------------------------------------------------------- molecules


MOLECULES = "id,smiles,activity\n1,CCO,active\n2,c1ccccc1O,inactive\n3,CC(=O)Nc1ccccc1,active\n"


def test_molecules_get_rdkit_morgan_bits(tmp_path):
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    data = load_molecules(_csv(tmp_path / "m.csv", MOLECULES), bits=512)
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=512)
    expected = generator.GetFingerprintAsNumPy(Chem.MolFromSmiles("CC(=O)Nc1ccccc1"))
    np.testing.assert_array_equal(data.x[2], expected)
    assert data.modality == "molecule" and data.x.shape == (3, 512)
    assert data.classes == ["inactive", "active"] and data.y.tolist() == [1, 0, 1]
    assert "morgan(rdkit" in data.fingerprint


def test_molecules_fallback_is_recorded_in_the_fingerprint(tmp_path, monkeypatch):
    path = _csv(tmp_path / "m.csv", MOLECULES)
    morgan = load_molecules(path, bits=256)
    for name in ("rdkit", "rdkit.Chem", "rdkit.Chem.rdFingerprintGenerator"):
        monkeypatch.setitem(sys.modules, name, None)  # as if RDKit were not installed
    fallback = load_molecules(path, bits=256)

    assert "smiles-ngram" in fallback.fingerprint and fallback.fingerprint != morgan.fingerprint
    assert set(np.unique(fallback.x)) == {0.0, 1.0} and fallback.x.shape == (3, 256)
    assert not np.array_equal(fallback.x, morgan.x)
    assert "ferry-fl[chem]" in _error(load_molecules, path, featurizer="morgan")
    broken = _csv(tmp_path / "b.csv", "smiles,activity\nC1CC,1\nCCO,0\n")
    assert "line 2" in _error(load_molecules, broken)


def test_invalid_smiles_name_the_line_or_are_skipped_and_counted(tmp_path):
    path = _csv(tmp_path / "m.csv", MOLECULES + "4,C1CC(,inactive\n5,CCN,inactive\n")
    message = _error(load_molecules, path)
    assert "line 5" in message and "column 'smiles'" in message and "'C1CC('" in message
    assert "--skip-unreadable" in message

    said: list[str] = []
    data = load_molecules(path, skip_invalid=True, log=said.append)
    assert len(data) == 4 and "skipped 1 of 5" in said[0] and "line 5" in said[0]


def test_molecule_activity_as_a_number_is_regression(tmp_path):
    path = _csv(tmp_path / "m.csv", "smiles,pic50\nCCO,5.2\nCCN,6.75\nCCC,7.1\n")
    data = load_molecules(path, activity_column="pic50")
    assert data.task == "regression" and np.allclose(data.y, [5.2, 6.75, 7.1])
    assert "'act'" in _error(load_molecules, path, activity_column="act")


# ---------------------------------------------------------------- images and DICOM


def _png(path: Path, value: int, mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (12, 10, 3) if mode == "RGB" else (12, 10)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=None).save(path)


def _dicom(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", preamble=True, **tags):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(pixels, photometric, 12)
    for key, value in tags.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_png_folder_loads_at_the_given_size_and_channels(tmp_path):
    _png(tmp_path / "benign" / "a.png", 51)
    _png(tmp_path / "malignant" / "p1" / "b.png", 255, "RGB")  # nested per-patient folder
    (tmp_path / "benign" / "notes.txt").write_text("not an image")

    data = load_images(tmp_path, channels=3, size=8)
    assert data.x.shape == (2, 3, 8, 8) and data.classes == ["benign", "malignant"]
    assert np.allclose(data.x[0], 0.2, atol=1e-5) and np.allclose(data.x[1], 1.0)
    x, y, classes = load_image_folder(tmp_path, (1, 6, 4))
    assert x.shape == (2, 1, 6, 4) and y.tolist() == [0, 1]


def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((6, 6), 32768, dtype=np.uint16)).save(tmp_path / "a" / "x.png")
    _png(tmp_path / "b" / "y.png", 0)
    data = load_images(tmp_path, 1, 6)
    np.testing.assert_allclose(data.x[0], 32768 / 65535, atol=1e-4)


def test_dicom_applies_rescale_window_and_monochrome1(tmp_path):
    stored = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 8) % 4096
    window = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}
    _dicom(tmp_path / "ct" / "slice.dcm", stored, **window)
    _dicom(tmp_path / "xray" / "IM0001", stored, photometric="MONOCHROME1")  # no suffix

    data = load_images(tmp_path, channels=1, size=16)
    hounsfield = stored.astype(np.float64) - 1024
    expected = np.clip((hounsfield - 39.5) / 399 + 0.5, 0, 1)
    np.testing.assert_allclose(data.x[0, 0], expected, atol=1e-5)
    inverted = 1 - (stored - stored.min()) / (stored.max() - stored.min())
    np.testing.assert_allclose(data.x[1, 0], inverted, atol=1e-5)
    assert data.classes == ["ct", "xray"]


def test_dicom_without_pydicom_says_how_to_install(tmp_path, monkeypatch):
    _dicom(tmp_path / "a" / "x.dcm", np.zeros((4, 4), np.uint16))
    _png(tmp_path / "b" / "y.png", 3)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    message = _error(load_images, tmp_path, 1, 8, skip_unreadable=True)
    assert "pip install 'ferry-fl[dicom]'" in message


def test_unreadable_image_is_named_or_skipped_and_counted(tmp_path):
    _png(tmp_path / "a" / "ok.png", 10)
    _png(tmp_path / "b" / "ok.png", 20)
    _png(tmp_path / "b" / "ok2.png", 30)
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "a" / "broken.dcm").write_bytes(b"nope")

    message = _error(load_images, tmp_path, 1, 8)
    assert "broken" in message and "--skip-unreadable" in message
    said: list[str] = []
    data = load_images(tmp_path, 1, 8, skip_unreadable=True, log=said.append)
    assert len(data) == 3 and "skipped 2 unreadable image(s) of 5" in said[0]


def test_image_folder_errors(tmp_path):
    assert "not a directory" in _error(load_images, tmp_path / "nope", 1, 8)
    assert "no class subfolders" in _error(load_images, tmp_path, 1, 8)
    (tmp_path / "empty").mkdir()
    assert "no usable images" in _error(load_images, tmp_path, 1, 8)
    _png(tmp_path / "only" / "a.png", 1)
    assert "single class (only)" in _error(load_images, tmp_path, 1, 8)


def test_image_fingerprint_follows_file_content(tmp_path):
    _png(tmp_path / "a" / "1.png", 10)
    _png(tmp_path / "b" / "2.png", 20)
    before = load_images(tmp_path, 1, 8).fingerprint
    assert load_images(tmp_path, 1, 8).fingerprint == before
    os.utime(tmp_path / "a" / "1.png", ns=(1, 1))
    assert load_images(tmp_path, 1, 8).fingerprint != before


# ---------------------------------------------------------------- synthetic records


@pytest.mark.parametrize(
    "make",
    [
        make_patients,
        make_credit,
        make_molecules,
        lambda n, seed, split: make_prices(n, 3, seed, split),
    ],
    ids=["patients", "credit", "molecules", "prices"],
)
def test_generators_are_pure_functions_of_their_arguments(make):
    a, b = make(200, 7, "target"), make(200, 7, "target")
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(make(200, 8, "target"))
    source = make(200, 7, "source")
    assert list(source.columns) == list(a.columns) and not source.equals(a)


@pytest.mark.parametrize(
    ("kind", "task", "rate"),
    [
        ("patients", "classification", (0.18, 0.32)),
        ("credit", "classification", (0.04, 0.13)),
        ("molecules", "classification", (0.18, 0.33)),
        ("prices", "regression", None),
    ],
)
def test_synthetic_datasets_load_through_the_file_code(kind, task, rate):
    data = synthetic_dataset(kind, 1500, 0, "target")
    assert len(data) == 1500 and data.task == task
    assert data.fingerprint.startswith("synthetic:") and '"kind": "' + kind in data.fingerprint
    assert data.fingerprint != synthetic_dataset(kind, 1500, 1, "target").fingerprint
    source = synthetic_dataset(kind, 300, 0, "source")
    assert source.x.shape[1:] == data.x.shape[1:]  # same layout: a pretrained encoder fits
    if rate:
        assert rate[0] < data.y.mean() < rate[1]


def test_synthetic_patients_file_loads_like_the_built_in_data(tmp_path):
    make_patients(300, 2).to_csv(tmp_path / "patients.csv", index=False)
    from_file = load_table(tmp_path / "patients.csv", "outcome", group_column="site")
    built_in = synthetic_dataset("patients", 300, 2)
    np.testing.assert_array_equal(from_file.x, built_in.x)
    assert from_file.columns == built_in.columns and set(built_in.groups) > {"hospital-1"}
    assert np.isnan(built_in.x).any()  # missing values stay NaN


def test_synthetic_categories_do_not_share_indicators():
    for column, values in (
        ("sex", "FM"),
        ("smoker", ("never", "former", "current")),
        ("employment", ("salaried", "self-employed", "contract", "unemployed", "retired")),
    ):
        patterns = {tuple(sorted(hash_buckets_of(column, v, 16))) for v in values}
        assert len(patterns) == len(values), column


def test_synthetic_molecules_all_parse_in_rdkit():
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    frame = make_molecules(400, 3, "target")
    assert all(Chem.MolFromSmiles(s) is not None for s in frame.smiles)


def test_synthetic_prices_direction_is_learnable_above_chance():
    data = synthetic_dataset("prices", 4000, 0, "target", window=20, horizon=1)
    x = data.x.reshape(len(data), -1).astype(np.float64)
    train = np.zeros(len(data), dtype=bool)
    for ticker in np.unique(data.groups):  # the first 70% of each ticker's days
        rows = np.flatnonzero(data.groups == ticker)
        train[rows[: int(0.7 * len(rows))]] = True
    design = np.c_[x, np.ones(len(x))]
    weights = np.linalg.solve(
        design[train].T @ design[train] + 50 * np.eye(design.shape[1]),
        design[train].T @ data.y[train],
    )
    hits = np.sign(design[~train] @ weights) == np.sign(data.y[~train])
    assert hits.mean() > 0.53


# ---------------------------------------------------------------- public class lists


def test_table_labels_map_by_the_public_class_list_alone(tmp_path):
    path = _csv(tmp_path / "t.csv", "a,y\n1,1.0\n2,0\n3,1\n")
    data = load_table(path, "y", classes=["2", "1", "0"])
    assert data.task == "classification" and data.classes == ["2", "1", "0"]
    assert data.y.tolist() == [1, 2, 1]  # "1.0" is class "1"; no class needs to be present
    text = _csv(tmp_path / "s.csv", "a,y\n1,yes\n2,yes\n")
    assert load_table(text, "y", classes=["no", "yes"]).y.tolist() == [1, 1]


def test_table_label_outside_the_public_list_is_refused_naming_line_and_label(tmp_path):
    path = _csv(tmp_path / "t.csv", "a,y\n1,no\n2,maybe\n")
    message = _error(load_table, path, "y", classes=["no", "yes"])
    assert "line 3" in message and "'maybe'" in message and "(no, yes)" in message
    message = _error(load_table, path, "y", task="regression", classes=["no", "yes"])
    assert "--task regression" in message


def test_molecule_activity_maps_by_the_public_class_list(tmp_path):
    path = _csv(tmp_path / "m.csv", "smiles,activity\nCCO,active\nCCN,active\n")
    data = load_molecules(path, classes=["inactive", "active"])
    assert data.y.tolist() == [1, 1] and data.classes == ["inactive", "active"]
