"""The hospital-tabular preset on real data: scikit-learn's breast-cancer records
(569 patients, 30 measurements, malignant vs benign), DP beside non-private.

Setup (what the README reports): a "public" 30% of the patients is the server's own cohort,
on which ``ferry pretrain`` trains the tabular encoder; the other 70% are split among
hospitals, which fine-tune a linear head on the frozen encoder's features, once with DP-SGD
at (ε, δ) per hospital and once without DP, same seeds, same everything else.

    python -m simulations.breast_cancer [--out DIR] [--clients 3] [--rounds 5] [--epsilon 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import numpy as np

LABEL = "diagnosis"


def write_tables(out: Path, public_fraction: float = 0.3, seed: int = 0) -> tuple[Path, Path]:
    """The server's public cohort and the hospitals' records, as CSV files."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame = frame.rename(columns={"target": LABEL})
    frame[LABEL] = np.where(frame[LABEL] == 1, "benign", "malignant")
    order = np.random.default_rng(seed).permutation(len(frame))
    cut = int(round(public_fraction * len(frame)))
    out.mkdir(parents=True, exist_ok=True)
    public, hospitals = out / "breast_cancer_public.csv", out / "breast_cancer_hospitals.csv"
    frame.iloc[order[:cut]].to_csv(public, index=False)
    frame.iloc[order[cut:]].to_csv(hospitals, index=False)
    return public, hospitals


def run(out: Path, clients: int = 3, rounds: int = 5, epsilon: float = 3.0, log=print) -> dict:
    """Pretrain on the public cohort, then simulate with and without DP; return both finals."""
    from ferry.common.config import RunConfig
    from ferry.common.data.datasets import DataSpec
    from ferry.server.pretrain import PretrainConfig, pretrain
    from ferry.simulations.runner import simulate

    public, hospitals = write_tables(out)
    weights = out / "encoder"
    data_cfg = RunConfig(scenario="hospital-tabular", label_column=LABEL)
    pretrain(
        PretrainConfig(
            scenario="hospital-tabular",
            data=str(public),
            epochs=30,
            batch_size=32,
            out=str(weights),
            data_spec=DataSpec.from_run(data_cfg, 1, (1,)),
        ),
        log=log,
    )
    common = dict(
        scenario="hospital-tabular",
        data=str(hospitals),
        label_column=LABEL,
        weights=str(weights),
        clients=clients,
        rounds=rounds,
        partition="iid",
        batch_size=16,
        seed=0,
    )
    results = {}
    for name, extra in (
        ("dp", {"epsilon": epsilon, "delta": 1e-5}),
        ("non_private", {"non_private": True, "noise_multiplier": 0.0, "lr": 0.1}),
    ):
        summary = simulate(RunConfig(**common, **extra, out=str(out / name)), log=log)
        results[name] = {
            **summary["final"],
            "max_epsilon": summary["privacy"]["max_epsilon"],
        }
    (out / "breast_cancer.json").write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/breast-cancer")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=3.0)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    with contextlib.suppress(KeyboardInterrupt):
        results = run(Path(args.out), args.clients, args.rounds, args.epsilon)
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
