"""Opacus' per-order RDP of one step is computed once per (q, sigma), and gives the same floats.

Both of Opacus' accountants spend their time in ``_compute_rdp(q, sigma, order)``; one PRV
epsilon used to compute it four times for the same mechanism (twice to size the PRV grid in
:func:`ferry.common.privacy.accounting.prv_grid_points`, twice inside Opacus), and a noise
search did that for every candidate sigma. Ferry memoises it (``_opacus_accountants``).
"""

from __future__ import annotations

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp

from ferry.common.privacy.accounting import (
    MechanismSegment,
    _opacus_accountants,
    epsilon_for_history,
)

DELTA = 1e-5


def _orders() -> int:
    return len(RDPAccountant.DEFAULT_ALPHAS)


def test_one_prv_epsilon_computes_each_order_once_per_mechanism():
    _opacus_accountants()
    before = rdp._compute_rdp.cache_info()
    history = [MechanismSegment(1.0 + 1e-9 * 7, 0.0173, 40), MechanismSegment(1.3, 0.0173, 5)]
    epsilon_for_history(history, DELTA)
    after = rdp._compute_rdp.cache_info()
    # Two distinct (q, sigma): each order's RDP computed once for each, whatever the caller.
    assert after.misses - before.misses == 2 * _orders()
    assert after.hits - before.hits >= 2 * 2 * _orders()  # Opacus' own grid sizing, the RDP


@pytest.mark.parametrize(("q", "sigma"), [(0.01, 0.7), (0.2, 1.1), (1.0, 3.0), (1 / 313, 0.9)])
def test_memoised_values_are_opacus_own(q, sigma):
    _opacus_accountants()
    original = rdp._compute_rdp.__wrapped__
    for order in RDPAccountant.DEFAULT_ALPHAS:
        assert rdp._compute_rdp(q, sigma, order) == original(q, sigma, order)
