"""The hospital-tabular preset on real records (scikit-learn's breast-cancer data): the
encoder is pretrained on a public 30% of patients, hospitals fine-tune a linear head on the
other 70%, with DP (ε = 3, δ 1e-5 per hospital, PRV; unit: one patient's record) and without.
The README reports the same run at 5 rounds (on Flower's Ray backend; here the federation
runs in this process)."""

from __future__ import annotations

import pandas as pd
import pytest

from ferry.simulations.breast_cancer import LABEL, run, write_tables

pytestmark = pytest.mark.slow


def test_public_cohort_and_hospital_records_are_disjoint_and_complete(tmp_path):
    public, hospitals = write_tables(tmp_path)
    a, b = pd.read_csv(public), pd.read_csv(hospitals)

    assert len(a) + len(b) == 569
    assert not set(map(tuple, a.to_numpy())) & set(map(tuple, b.to_numpy()))
    assert set(a[LABEL]) == set(b[LABEL]) == {"benign", "malignant"}


def test_dp_head_on_pretrained_encoder_is_close_to_non_private(tmp_path, without_ray):
    results = run(tmp_path, clients=3, rounds=3, log=lambda _: None)

    dp, plain = results["dp"], results["non_private"]
    assert 0 < dp["max_epsilon"] <= 3.0 + 1e-6
    assert plain["max_epsilon"] == "inf"
    assert dp["accuracy"] >= 0.85 and dp["roc_auc"] >= 0.9, dp
    assert dp["accuracy"] >= plain["accuracy"] - 0.1, (dp, plain)
