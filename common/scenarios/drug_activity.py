"""``drug-activity``: predicting compound activity from molecular structure (SMILES)."""

from __future__ import annotations

from pathlib import Path

from ferry.common.data.dataset import Dataset
from ferry.common.data.molecules import load_molecules
from ferry.common.data.synthetic_records import synthetic_dataset
from ferry.common.scenarios.registry import Scenario, register_scenario


def synthetic(spec, split: str = "target") -> Dataset:
    return synthetic_dataset("molecules", spec.examples, spec.seed, split)


def load(spec) -> Dataset:
    return load_molecules(
        Path(spec.data),
        smiles_column=spec.smiles_column or "smiles",
        activity_column=spec.label_column or "activity",
        task=spec.task,
        skip_invalid=spec.skip_unreadable,
        classes=spec.classes,
    )


register_scenario(
    Scenario(
        name="drug-activity",
        description="active/inactive classification of compounds from their structure "
        "(Morgan fingerprints via RDKit, or a hashed SMILES fallback without it). Built-in "
        "synthetic compounds whose activity follows their substructures",
        institution="hospital",
        backbone="molecule-mlp",
        partition="dirichlet",
        expects="a CSV or Parquet table with a SMILES column (--smiles-column, default "
        "smiles) and an activity column (--label-column, default activity): 0/1, "
        "active/inactive, or a number such as pIC50 with --task regression",
        example="ferry simulate --scenario drug-activity --data assays.csv",
        synthetic=synthetic,
        load=load,
        classes=("inactive", "active"),
        # Public constant of the preset, in class order: make_molecules
        # (common.data.synthetic_records) is built for ~25% active (0.247 pooled).
        base_rates=(0.75, 0.25),
    )
)
