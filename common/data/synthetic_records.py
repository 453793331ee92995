"""Built-in synthetic records for the table, series and molecule presets.

Each generator is a pure function of its arguments (clients regenerate identical data) and
returns a pandas DataFrame shaped like a user's file, so :func:`synthetic_dataset` reads it
through the same ``from_frame`` code a real CSV goes through. ``split="target"`` is what the
virtual institutions hold; ``split="source"`` is a related population with a related but
different outcome rule, for ``ferry pretrain``: same schema, so a pretrained encoder transfers.

* :func:`make_patients` (hospital-tabular): vitals, labs, demographics with missing values;
  an adverse outcome (~25% positive) that depends nonlinearly on them; ``site`` groups.
* :func:`make_credit` (bank-credit): loan applicants, ~8% default; ``branch`` groups.
* :func:`make_prices` (bank-stocks): daily closes of several tickers with regime-switching
  drift and volatility and a persistent latent trend, so the sign of the next return is
  predictable somewhat above 50% from past returns.
* :func:`make_molecules` (drug-activity): SMILES built from a fragment grammar (every one
  parses in RDKit); activity follows substructures (~25% active).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from ferry.common.data import molecules, series, tabular
from ferry.common.data.dataset import Dataset
from ferry.common.data.frames import Origin, require_pandas
from ferry.common.errors import FerryError

GENERATOR_VERSION = 1  # bump when any generator's output changes (feature caches key on it)
SPLITS = ("target", "source")


def _rng(kind: str, seed: int, split: str) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    tag = {"patients": 1, "credit": 2, "prices": 3, "molecules": 4}[kind]
    return np.random.default_rng([seed, tag, SPLITS.index(split)])


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _blank(rng, values: np.ndarray, rate: float) -> np.ndarray:
    values = values.astype(object if values.dtype.kind in "OUS" else np.float64)
    values[rng.random(len(values)) < rate] = None if values.dtype == object else np.nan
    return values


def make_patients(n: int, seed: int, split: str = "target"):
    """Patient records: site, age, sex, bmi, blood pressure, heart rate, labs, smoker,
    outcome (0/1, ~25% positive in the target cohort)."""
    pd = require_pandas()
    rng = _rng("patients", seed, split)
    source = split == "source"
    sites = [f"cohort-{c}" for c in "ABCDEF"] if source else [f"hospital-{i}" for i in range(1, 6)]
    weights = np.linspace(1.6, 0.6, len(sites))
    site = rng.choice(len(sites), size=n, p=weights / weights.sum())
    site_age = np.linspace(-6, 6, len(sites))[site]
    site_risk = np.linspace(-0.3, 0.3, len(sites))[rng.permutation(len(sites))][site]

    age = np.clip(rng.normal(55 if source else 62, 16 if source else 14, n) + site_age, 18, 95)
    male = rng.random(n) < 0.5
    bmi = np.clip(rng.normal(26.5 if source else 27.5, 5, n) + 0.6 * male, 15, 55)
    smoker = rng.choice(3, size=n, p=[0.55, 0.28, 0.17])  # never, former, current
    sbp = 118 + 0.5 * (age - 50) + 0.8 * (bmi - 27) + 4 * male + rng.normal(0, 14, n)
    dbp = 0.45 * sbp + 18 + rng.normal(0, 7, n)
    heart_rate = rng.normal(76, 11, n) + 3 * (smoker == 2)
    diabetic = rng.random(n) < _sigmoid(-3.2 + 0.12 * (bmi - 27) + 0.03 * (age - 60))
    glucose = 92 + 55 * diabetic + 0.8 * (bmi - 27) + rng.normal(0, 14, n)
    hba1c = 5.3 + 0.021 * (glucose - 95) + rng.normal(0, 0.35, n)
    creatinine = np.exp(rng.normal(0.0 + 0.006 * (age - 60) + 0.12 * male, 0.25, n))
    cholesterol = rng.normal(198, 36, n) + 0.6 * (bmi - 27)

    if source:  # a related endpoint: the same risk factors, weighed differently
        z = (
            0.035 * (age - 55)
            + 0.2 * (bmi - 30)
            + 0.8 * (smoker == 2)
            + 0.3 * (smoker == 1)
            + 0.02 * (sbp - 125)
            + 1.4 * _sigmoid((hba1c - 6.5) / 0.3)
            + 1.2 * np.maximum(creatinine - 1.1, 0)
            + 0.008 * (cholesterol - 200)
            - 1.35
        )
    else:
        z = (
            0.045 * (age - 60)
            + 1.0 * _sigmoid((bmi - 32) / 1.5)
            + 1.2 * (smoker == 2)
            + 0.45 * (smoker == 1)
            + 0.025 * (sbp - 130)
            + 1.4 * _sigmoid((glucose - 140) / 10)
            + 1.6 * np.maximum(creatinine - 1.2, 0) * (age / 70)
            + 0.6 * ((age > 70) & male)
            - 0.4 * (heart_rate < 60)
            - 2.1
        )
    outcome = (rng.random(n) < _sigmoid(z + site_risk)).astype(np.int64)
    return pd.DataFrame(
        {
            "site": np.asarray(sites)[site],
            "age": np.round(age).astype(np.int64),
            "sex": np.where(male, "M", "F"),
            "bmi": _blank(rng, np.round(bmi, 1), 0.03),
            "systolic_bp": np.round(sbp).astype(np.int64),
            "diastolic_bp": np.round(dbp).astype(np.int64),
            "heart_rate": _blank(rng, np.round(heart_rate), 0.02),
            "glucose": _blank(rng, np.round(glucose), 0.06),
            "hba1c": _blank(rng, np.round(hba1c, 1), 0.12),
            "creatinine": _blank(rng, np.round(creatinine, 2), 0.07),
            "cholesterol": _blank(rng, np.round(cholesterol), 0.10),
            "smoker": _blank(rng, np.asarray(["never", "former", "current"])[smoker], 0.05),
            "outcome": outcome,
        }
    )


EMPLOYMENT = ("salaried", "self-employed", "contract", "unemployed", "retired")


def make_credit(n: int, seed: int, split: str = "target"):
    """Loan applicants: branch, age, employment, years employed, income, debt ratio, credit
    lines, past delinquencies, loan amount and term, default (0/1, ~8% in the target)."""
    pd = require_pandas()
    rng = _rng("credit", seed, split)
    source = split == "source"
    branches = (
        [f"region-{i}" for i in range(1, 7)] if source else [f"branch-{i:02d}" for i in range(1, 9)]
    )
    weights = 1.0 / np.arange(1, len(branches) + 1) ** 0.8  # a few big branches, many small
    branch = rng.choice(len(branches), size=n, p=weights / weights.sum())
    branch_risk = rng.normal(0, 0.25, len(branches))[branch]

    age = np.clip(rng.normal(44 if source else 42, 12, n), 21, 80)
    retired = (age > 60) & (rng.random(n) < (age - 60) / 15)
    work = rng.choice(4, size=n, p=[0.66, 0.15, 0.11, 0.08])
    employment = np.where(retired, 4, work)
    years = np.where(
        employment >= 3, 0.0, np.minimum(age - 20, rng.exponential(7 if source else 6, n))
    )
    income = np.exp(
        np.log(56000 if source else 48000)
        + np.asarray([0.0, 0.15, -0.2, -0.9, -0.35])[employment]
        + 0.012 * (age - 40)
        + 0.015 * years
        + rng.normal(0, 0.45, n)
    )
    debt_ratio = np.clip(rng.beta(2.0, 4.5, n) * 1.3, 0, 1.5)
    lines = rng.poisson(4, n)
    delinquencies = rng.negative_binomial(1, 0.78, n)
    loan = np.exp(np.log(15000) + 0.5 * np.log(income / 48000) + rng.normal(0, 0.55, n))
    term = rng.choice([12, 24, 36, 48, 60], size=n, p=[0.1, 0.2, 0.35, 0.15, 0.2])
    burden = np.log(loan / income * 4)

    z = (
        0.55 * np.minimum(delinquencies, 5)
        + 3.0 * np.maximum(debt_ratio - 0.45, 0)
        + 0.7 * burden
        + np.asarray([0.0, 0.45, 0.35, 1.3, -0.1])[employment]
        - 0.025 * (age - 40)
        - 0.03 * years
        + 0.006 * (term - 36)
        + 0.08 * (lines > 7)
    )
    if source:  # a related bank's scorecard: delinquencies weigh less, debt ratio more
        z = z - 0.25 * np.minimum(delinquencies, 5) + 1.2 * np.maximum(debt_ratio - 0.6, 0) - 2.55
    else:
        z = z + 0.9 * (delinquencies > 0) * (debt_ratio > 0.5) - 3.5
    default = (rng.random(n) < _sigmoid(z + branch_risk)).astype(np.int64)
    return pd.DataFrame(
        {
            "branch": np.asarray(branches)[branch],
            "age": np.round(age).astype(np.int64),
            "employment": np.asarray(EMPLOYMENT)[employment],
            "years_employed": np.round(years, 1),
            "income": _blank(rng, np.round(income, -2), 0.04),
            "debt_ratio": _blank(rng, np.round(debt_ratio, 3), 0.03),
            "credit_lines": lines,
            "past_delinquencies": delinquencies,
            "loan_amount": np.round(loan, -2),
            "loan_term_months": term,
            "default": default,
        }
    )


def make_prices(n_days: int, n_tickers: int, seed: int, split: str = "target"):
    """Daily closes (date, ticker, close) of ``n_tickers`` tickers over ``n_days`` business
    days. Returns: a calm or turbulent regime (Markov switching: drift and volatility) plus
    a persistent latent trend (AR(1), momentum) and, in the source split, a lag-1 reversal."""
    pd = require_pandas()
    rng = _rng("prices", seed, split)
    source = split == "source"
    start = "2004-01-05" if source else "2012-01-02"
    dates = pd.bdate_range(start, periods=n_days)
    stay = np.asarray([0.985, 0.94])  # calm, turbulent
    drift = np.asarray([0.05, -0.12])  # percent per day
    vol = np.asarray([0.9, 2.1]) * (1.2 if source else 1.0)
    phi, trend_sd = (0.9, 0.22) if source else (0.94, 0.16)
    frames = []
    for t in range(n_tickers):
        scale = rng.uniform(0.7, 1.4)
        regime = np.zeros(n_days, dtype=np.int64)
        shocks = rng.normal(0, 1, (n_days, 2))
        flips = rng.random(n_days)
        trend, noise_prev = 0.0, 0.0
        returns = np.zeros(n_days)
        for d in range(1, n_days):
            regime[d] = regime[d - 1] if flips[d] < stay[regime[d - 1]] else 1 - regime[d - 1]
            trend = phi * trend + trend_sd * shocks[d, 0]
            noise = vol[regime[d]] * scale * shocks[d, 1]
            reversal = -0.15 * noise_prev if source else 0.0
            returns[d] = drift[regime[d]] + trend * scale + noise + reversal
            noise_prev = noise
        close = rng.uniform(20, 200) * np.exp(np.cumsum(returns) / 100.0)
        frames.append(
            pd.DataFrame(
                {
                    "date": dates.strftime("%Y-%m-%d"),
                    "ticker": f"{'SRC' if source else 'BNK'}{t + 1:02d}",
                    "close": np.round(close, 4),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


# The molecule grammar: HEAD RING(SUB) [LINKER RING(SUB)] TAIL. A ring's first atom bonds
# to what precedes it, its ring-closing last atom to what follows; "{}" takes "(SUB)".
RINGS = {
    "benzene": "c1cc{}ccc1",
    "pyridine": "c1cc{}ncc1",
    "thiophene": "c1cc{}sc1",
    "furan": "c1cc{}oc1",
    "cyclohexane": "C1CC{}CCC1",
    "piperidine": "C1CC{}NCC1",
}
HEADS = ("", "C", "CC", "CO", "N", "OC", "CC(=O)N", "NC(=O)", "FC(F)(F)", "CN(C)")
LINKERS = ("", "C", "CC", "O", "N", "OCC", "C=C", "C(=O)N", "NC(=O)", "S(=O)(=O)N")
SUBSTITUENTS = (
    "",
    "C",
    "F",
    "Cl",
    "Br",
    "O",
    "N",
    "OC",
    "CO",
    "C#N",
    "C(F)(F)F",
    "C(=O)O",
    "C(=O)N",
    "N(C)C",
    "[N+](=O)[O-]",
    "S(=O)(=O)N",
    "S(C)(=O)=O",
)
AMIDES = {"C(=O)N", "NC(=O)", "CC(=O)N"}
HALOGENS = {"F", "Cl", "Br"}


def _molecule(rng: np.random.Generator) -> tuple[str, dict[str, float]]:
    """One SMILES from the grammar and the substructures its activity depends on."""
    names = list(RINGS)
    head = HEADS[rng.integers(len(HEADS))]
    rings = [names[rng.integers(len(names))]]
    subs = [SUBSTITUENTS[rng.integers(len(SUBSTITUENTS))]]
    linker = ""
    if rng.random() < 0.6:
        linker = LINKERS[rng.integers(len(LINKERS))]
        rings.append(names[rng.integers(len(names))])
        subs.append(SUBSTITUENTS[rng.integers(len(SUBSTITUENTS))])
    tail = SUBSTITUENTS[rng.integers(len(SUBSTITUENTS))] if rng.random() < 0.5 else ""
    body = [RINGS[r].format(f"({s})" if s else "") for r, s in zip(rings, subs, strict=True)]
    smiles = head + body[0] + (linker + body[1] if len(body) > 1 else "") + tail
    groups = [head, linker, tail, *subs]
    features = {
        "sulfonamide": float("S(=O)(=O)N" in groups),
        "pyridine": float("pyridine" in rings),
        "thiophene": float("thiophene" in rings),
        "amide": float(bool(AMIDES & set(groups))),
        "cf3": float("C(F)(F)F" in groups or head == "FC(F)(F)"),
        "acid": float("C(=O)O" in groups),
        "nitro": float("[N+](=O)[O-]" in groups),
        "halogens": float(sum(g in HALOGENS for g in groups) >= 2),
        "two_rings": float(len(rings) == 2),
    }
    return smiles, features


def make_molecules(n: int, seed: int, split: str = "target"):
    """Compounds: compound_id, smiles, activity ("active" / "inactive", ~25% active). The
    target assay rewards a sulfonamide on a pyridine scaffold, amides and CF3 and penalises
    acids; the source assay (a related target) rewards nitro groups, thiophenes, amides and
    halogens."""
    pd = require_pandas()
    rng = _rng("molecules", seed, split)
    smiles, activity = [], []
    for _ in range(n):
        text, f = _molecule(rng)
        if split == "source":
            z = (
                -2.2
                + 1.7 * f["nitro"]
                + 1.4 * f["thiophene"]
                + 0.9 * f["amide"]
                + 1.2 * f["halogens"]
                + 1.1 * f["nitro"] * f["amide"]
                - 1.0 * f["acid"]
            )
        else:
            z = (
                -2.75
                + 1.6 * f["sulfonamide"]
                + 1.3 * f["pyridine"]
                + 1.8 * f["sulfonamide"] * f["pyridine"]
                + 1.0 * f["amide"]
                + 1.1 * f["cf3"]
                - 1.4 * f["acid"]
                + 0.4 * f["two_rings"]
            )
        smiles.append(text)
        activity.append("active" if rng.random() < _sigmoid(z) else "inactive")
    return pd.DataFrame(
        {
            "compound_id": [f"CPD-{i + 1:06d}" for i in range(n)],
            "smiles": smiles,
            "activity": activity,
        }
    )


KINDS = ("patients", "credit", "prices", "molecules")
PRICE_TICKERS = {"target": 5, "source": 8}


def synthetic_dataset(kind: str, n: int, seed: int, split: str = "target", **options) -> Dataset:
    """``n`` examples of ``kind`` (one of :data:`KINDS`) read through the same code as a
    user's file. ``options`` go to the loader (prices: ``window``, ``horizon``; molecules:
    ``bits``, ``radius``, ``featurizer``). The fingerprint is the generator's parameters."""
    if kind not in KINDS:
        raise FerryError(f"unknown synthetic data {kind!r}: use one of {', '.join(KINDS)}")
    if n < 1:
        raise FerryError(f"--examples {n}: give at least 1")
    params = {"kind": kind, "n": n, "seed": seed, "split": split, **options}
    params["version"] = GENERATOR_VERSION
    key = json.dumps(params, sort_keys=True)
    origin = Origin(f"the synthetic {kind} data ({split})", "synthetic:" + key)
    if kind == "patients":
        frame = make_patients(n, seed, split)
        data = tabular.from_frame(
            frame,
            "outcome",
            categorical=["sex", "smoker"],
            group_column="site",
            origin=origin,
            **options,
        )
    elif kind == "credit":
        frame = make_credit(n, seed, split)
        data = tabular.from_frame(
            frame,
            "default",
            categorical=["employment"],
            group_column="branch",
            origin=origin,
            **options,
        )
    elif kind == "prices":
        window, horizon = options.get("window", 30), options.get("horizon", 1)
        tickers = PRICE_TICKERS[split]
        days = -(-n // tickers) + window + horizon
        frame = make_prices(days, tickers, seed, split)
        data = series.from_frame(
            frame, "date", ["close"], group_column="ticker", origin=origin, **options
        )
        data = data.subset(np.arange(n))
    else:
        frame = make_molecules(n, seed, split)
        data = molecules.from_frame(frame, origin=origin, **options)
    return replace(data, fingerprint="synthetic:" + key)
