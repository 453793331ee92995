"""What a Ferry run releases, what the DP guarantee covers, and against whom: the one statement
written into ``summary.json`` (``privacy.statement``) and the ledger's ``run_started`` record.

Released per institution and round, and nothing else:

* covered by the accountant: the trained arrays (head, adapters or last block), the output of
  the Poisson-subsampled Gaussian mechanism on the training split;
* not covered: the training example count ``num-examples`` (it sets the sample rate q, which
  the privacy report carries anyway); the privacy report itself (a function of the public
  config, of n and of the institution's budget); the held-out split's sufficient statistics
  (:mod:`common.metrics`); whether the institution already holds the backbone (its hash).

Nothing else computed on the training split leaves the institution (no train loss, no train
accuracy): pinned by ``tests/test_attack_releases.py``.
"""

from __future__ import annotations

from ferry.common.privacy import UNIT_OF_PRIVACY

_ACCOUNTANTS = {"prv": "PRV (Opacus)", "pld": "PLD (dp-accounting)", "rdp": "RDP (Opacus)"}

NOT_COVERED = (
    {
        "release": "num-examples (training split size n) in every train reply",
        "reveals": "n exactly, to the operator: adding or removing one training example changes "
        "it by one. It sets the sample rate q = batch size / n of the DP mechanism, which the "
        "privacy report states too",
    },
    {
        "release": "the privacy report (noise multiplier, q, steps, epsilon spent, budget, "
        "rounds) and refusals",
        "reveals": "the institution's budget and spend, and n through q; nothing else about "
        "its examples",
    },
    {
        "release": "held-out split sufficient statistics after every evaluation "
        "(classification: num-examples, k x k confusion counts, per-class score histograms on "
        "equal bins of [0, 1], log-loss sum; regression: num-examples, sums of squared and "
        "absolute errors, of targets and squared targets, directional counts)",
        "reveals": "exact counts and sums over the held-out examples (never the training "
        "examples), to the operator, who picks the model they are computed with: not DP, one "
        "held-out example changes a count by one, so whoever knows the other held-out "
        "examples learns that example's label (and its score bin, or its error and target)",
    },
    {
        "release": "whether the institution already holds the backbone (its sha256)",
        "reveals": "that it took part in an earlier run with the same backbone",
    },
)


def privacy_statement(delta: float, *, accountant: str = "prv", non_private: bool = False) -> dict:
    """The exact statement of what a run's releases cover: unit of privacy, mechanism,
    accountant, δ, against whom the guarantee holds, and the releases it does not cover."""
    if non_private:
        covered = "nothing: a non-private run trains without noise (no DP guarantee)"
    else:
        covered = (
            "the trained arrays each institution returns per round: (epsilon, delta)-DP per "
            "institution with respect to one training example, composed over every round it "
            "took part in (epsilon per institution in the ledger and summary)"
        )
    return {
        "unit": UNIT_OF_PRIVACY,
        "mechanism": "PoissonSampled(q, Gaussian(noise_multiplier)) per step, per-example "
        "clipping to max_grad_norm, composed over every round an institution took part in",
        "accountant": _ACCOUNTANTS.get(accountant, accountant),
        "delta": delta,
        "covered": covered,
        "against": {
            "operator": "sees every message: the covered arrays (DP), and every release listed "
            "in not_covered, exactly",
            "other institutions": "see only the aggregated arrays the server sends (DP, "
            "post-processing of the covered releases), unless the operator shares more",
            "outsiders": "see nothing on the wire (TLS); whatever the operator publishes "
            "(model, metrics, summary) is covered as stated here and no further",
        },
        "not_covered": [dict(item) for item in NOT_COVERED],
    }
