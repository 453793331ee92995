"""``hospital-tabular``: outcome prediction from patient records at hospitals."""

from __future__ import annotations

from ferry.common.data.dataset import Dataset
from ferry.common.data.synthetic_records import synthetic_dataset
from ferry.common.scenarios._tables import load_table_for
from ferry.common.scenarios.registry import Scenario, register_scenario


def synthetic(spec, split: str = "target") -> Dataset:
    return synthetic_dataset("patients", spec.examples, spec.seed, split)


def load(spec) -> Dataset:
    return load_table_for(spec, "hospital-tabular")


register_scenario(
    Scenario(
        name="hospital-tabular",
        description="predicting an adverse outcome from patient records (vitals, labs, "
        "demographics; missing values; ~25% positive). Built-in synthetic cohort",
        institution="hospital",
        backbone="tabular-mlp",
        partition="dirichlet",
        expects="a CSV or Parquet table, one row per patient, with --label-column naming the "
        "outcome; other columns numeric or categorical (--categorical), blanks for missing",
        example="ferry simulate --scenario hospital-tabular --data patients.csv "
        "--label-column outcome",
        synthetic=synthetic,
        load=load,
        classes=("0", "1"),
        # Public constant of the preset, in class order: make_patients
        # (common.data.synthetic_records) is built for ~25% adverse outcomes (~0.26).
        base_rates=(0.75, 0.25),
    )
)
