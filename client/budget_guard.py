"""The institution's budget guard: refuse a round before it would exceed the budget.

The budget (epsilon, delta) belongs to the institution (its client config; in simulation,
the researcher's setting for each virtual institution). Whatever the server asks, a round is
trained only if the whole history *plus this round's planned mechanism* stays within
``epsilon`` at the run's delta, and the run's delta is within the budget's delta.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import FerryError
from common.privacy.accounting import MechanismSegment, epsilon_for_history


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float


class BudgetExceeded(FerryError):
    """This round would exceed the institution's budget; the client refuses it."""

    kind = "budget"


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
    spent = epsilon_for_history(history, run_delta, accountant)
    projected = epsilon_for_history([*history, planned], run_delta, accountant)
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
