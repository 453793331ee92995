"""The institution's budget guard: refuse a round before it would exceed the budget.

The budget (epsilon, delta) belongs to the institution (its client config; in simulation,
the researcher's setting for each virtual institution). Whatever the server asks, a round is
trained only if the whole history *plus this round's planned mechanism* stays within
``epsilon`` at the run's delta, and the run's delta is within the budget's delta.

:func:`reserve_round` is the only way a round gets its spend: under the state's exclusive lock
it re-reads the history from disk, checks the budget and records the planned segment durably
(write-ahead), all before training starts. Two concurrent rounds of one institution therefore
see each other's spend; a crash after the reservation can only over-count.

Hostile mechanisms are refused before any accountant runs, as refusals (not crashes):
a round of more than :data:`MAX_STEPS_PER_ROUND` steps (a server-chosen batch size or number
of local epochs), a round whose rigorous epsilon floor (its leakiest single step, exact and
cheap: :func:`~common.privacy.accounting.epsilon_lower_bound`) already exceeds the budget
(σ = 0.01 at q = 0.1 has a floor of 5,369), and a history the PRV accountant could only
evaluate on an absurd grid (:class:`~common.privacy.accounting.UnaccountableMechanism`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ferry.client.privacy_state import PrivacyState
from ferry.common.errors import FerryError
from ferry.common.privacy.accounting import (
    MechanismSegment,
    UnaccountableMechanism,
    epsilon_for_history,
    epsilon_lower_bound,
)

# More steps than this in one round is refused before anything runs. A million DP-SGD steps is
# beyond any federated round (ceil(n / batch) * local epochs: 100,000 examples, batch 32 and
# 10 local epochs are 31,250); only a hostile batch size or epoch count gets there.
MAX_STEPS_PER_ROUND = 1_000_000
# More example-steps (steps x n: the Poisson draws a round makes, and so its work) than this is
# refused too: 100,000 examples x 31,250 steps is 3.1e9; 1e6 steps at batch 1 on 20,000
# examples (2e10) is an operator making the institution burn hours before anything is learnt.
MAX_EXAMPLE_STEPS_PER_ROUND = 4_000_000_000


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float


class BudgetExceeded(FerryError):
    """This round would exceed the institution's budget; the client refuses it."""

    kind = "budget"


class MechanismRefused(BudgetExceeded):
    """The server's mechanism cannot be trained or accounted here (absurd steps, noise too
    small to account); refused like an exceeded budget."""


def check_steps(steps: int, examples: int | None = None) -> None:
    """Refuse a round of absurdly many steps, or (given the institution's ``examples``)
    absurdly much work, before any noise derivation, reservation or training."""
    if not 1 <= steps <= MAX_STEPS_PER_ROUND:
        raise MechanismRefused(
            f"the server's round plan has {steps:,} DP-SGD steps (limit "
            f"{MAX_STEPS_PER_ROUND:,}): ask the operator for a larger batch size or fewer "
            "local epochs"
        )
    if examples is not None and steps * examples > MAX_EXAMPLE_STEPS_PER_ROUND:
        raise MechanismRefused(
            f"the server's round plan has {steps:,} DP-SGD steps over {examples:,} examples "
            f"({steps * examples:.3g} example-steps, limit {MAX_EXAMPLE_STEPS_PER_ROUND:.3g}): "
            "ask the operator for a larger batch size or fewer local epochs"
        )


def check_round(
    history: list[MechanismSegment],
    planned: MechanismSegment,
    run_delta: float,
    budget: Budget,
    accountant: str = "prv",
) -> float:
    """The projected cumulative epsilon after ``planned``; raises BudgetExceeded if over."""
    if run_delta > budget.delta:
        raise BudgetExceeded(
            f"the run's delta {run_delta:g} exceeds this institution's budget delta "
            f"{budget.delta:g}"
        )
    check_steps(planned.steps)
    floor = epsilon_lower_bound([*history, planned], run_delta)
    if floor > budget.epsilon:
        raise MechanismRefused(
            f"this round cannot fit the budget: one step of σ={planned.noise_multiplier:g} "
            f"q={planned.sample_rate:g} alone has ε ≥ {floor:.4g} > budget "
            f"{budget.epsilon:g} (δ={run_delta:g}); ask the operator for a larger noise "
            "multiplier"
        )
    try:
        spent = epsilon_for_history(history, run_delta, accountant)
        projected = epsilon_for_history([*history, planned], run_delta, accountant)
    except UnaccountableMechanism as exc:
        raise MechanismRefused(f"round refused: {exc}") from None
    if projected > budget.epsilon:
        raise BudgetExceeded(
            f"budget exhausted: ε spent {spent:.3f}, this round would bring it to "
            f"{projected:.3f} > budget {budget.epsilon:g} (δ={run_delta:g})"
        )
    return projected


def can_afford_another(
    history: list[MechanismSegment],
    next_round: MechanismSegment,
    run_delta: float,
    budget: Budget,
    accountant: str = "prv",
) -> bool:
    """Whether one more round like ``next_round`` would still fit (told to the server)."""
    try:
        check_round(history, next_round, run_delta, budget, accountant)
    except BudgetExceeded:
        return False
    return True


def reserve_round(
    state_dir: str | os.PathLike,
    institution: str,
    planned: MechanismSegment,
    run_delta: float,
    budget: Budget | None,
    accountant: str = "prv",
    *,
    spend: bool = True,
    **context: object,
) -> PrivacyState:
    """Check ``planned`` against the budget and, if ``spend``, record it before training.

    Holds the state's exclusive lock from re-reading the history on disk, through the check,
    to the durable record, so concurrent rounds of this institution are serialised and none
    is lost. Returns the state as written (its history includes ``planned``). ``spend`` is
    False only for a non-private round (nothing to account; with a budget it is refused).
    """
    with PrivacyState.locked(state_dir, institution) as state:
        if budget is not None:
            check_round(state.history, planned, run_delta, budget, accountant)
        if spend:
            state.record(planned, **context)
    return state
