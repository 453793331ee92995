"""Scenario presets, by name: hospitals and banks, the data they hold, the defaults that fit.

One module per preset registers a :class:`Scenario`. Adding one: a new module here, an
import below, a test that runs it end to end, and a README section.
"""

from ferry.common.scenarios import (  # noqa: F401  (each registers its preset)
    bank_credit,
    bank_stocks,
    drug_activity,
    hospital_imaging,
    hospital_tabular,
)
from ferry.common.scenarios.registry import (
    SCENARIOS,
    Scenario,
    get_scenario,
    known_scenarios,
    with_base_rates,
    with_scenario_defaults,
)

__all__ = [
    "SCENARIOS",
    "Scenario",
    "get_scenario",
    "known_scenarios",
    "with_base_rates",
    "with_scenario_defaults",
]
