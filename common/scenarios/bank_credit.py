"""``bank-credit``: credit-default scoring at banks (imbalanced: defaults are rare)."""

from __future__ import annotations

from ferry.common.data.dataset import Dataset
from ferry.common.data.synthetic_records import synthetic_dataset
from ferry.common.scenarios._tables import load_table_for
from ferry.common.scenarios.registry import Scenario, register_scenario


def synthetic(spec, split: str = "target") -> Dataset:
    return synthetic_dataset("credit", spec.examples, spec.seed, split)


def load(spec) -> Dataset:
    return load_table_for(spec, "bank-credit")


register_scenario(
    Scenario(
        name="bank-credit",
        description="credit-default scoring of loan applicants (income, debt ratio, history; "
        "~8% default, so balanced accuracy and ROC AUC matter more than accuracy). Built-in "
        "synthetic applicants, banks of different sizes",
        institution="bank",
        backbone="tabular-mlp",
        partition="quantity",
        expects="a CSV or Parquet table, one row per loan, with --label-column naming the "
        "default flag; a branch or bank column can split it naturally (--partition natural "
        "--partition-column branch)",
        example="ferry simulate --scenario bank-credit --data loans.parquet --label-column default",
        synthetic=synthetic,
        load=load,
        classes=("0", "1"),
        # Public constant of the preset, in class order (no default, default): make_credit
        # (common.data.synthetic_records) is built for ~8% default (0.069-0.085 by seed).
        base_rates=(0.92, 0.08),
    )
)
