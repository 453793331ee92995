"""``bank-stocks``: next-period return prediction from price history at banks."""

from __future__ import annotations

from pathlib import Path

from ferry.common.data.dataset import Dataset
from ferry.common.data.series import load_series
from ferry.common.data.synthetic_records import synthetic_dataset
from ferry.common.errors import FerryError
from ferry.common.scenarios.registry import Scenario, register_scenario


def synthetic(spec, split: str = "target") -> Dataset:
    return synthetic_dataset(
        "prices", spec.examples, spec.seed, split, window=spec.window, horizon=spec.horizon
    )


def load(spec) -> Dataset:
    if not spec.date_column:
        raise FerryError(
            f"--data {spec.data} needs --date-column: name the column holding each row's date"
        )
    return load_series(
        Path(spec.data),
        date_column=spec.date_column,
        value_columns=list(spec.value_columns) or None,
        target_column=spec.label_column,
        window=spec.window,
        horizon=spec.horizon,
        group_column=spec.partition_column,
    )


register_scenario(
    Scenario(
        name="bank-stocks",
        description="forecasting the next return of a stock from its recent returns "
        "(regression; RMSE, MAE and directional accuracy). Built-in synthetic tickers with "
        "regime switches and a weak momentum signal",
        institution="bank",
        backbone="series-cnn",
        partition="iid",
        expects="a CSV or Parquet price table with a date column (--date-column) and price "
        "columns (--value-columns; default all numeric); a ticker column can be named with "
        "--partition-column; windows of --window days predict the return over --horizon days",
        example="ferry simulate --scenario bank-stocks --data prices.csv --date-column date "
        "--value-columns close",
        synthetic=synthetic,
        load=load,
        lr=0.2,  # squared-error gradients of returns in percent are larger than CE's
    )
)
