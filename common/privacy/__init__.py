"""Privacy accounting: mechanisms described as data, accountants that consume them."""

from ferry.common.privacy.accounting import (
    MechanismSegment,
    compact_history,
    epsilon_for_history,
    noise_multiplier_for_target,
)

UNIT_OF_PRIVACY = "one example (record) at one institution"

__all__ = [
    "UNIT_OF_PRIVACY",
    "MechanismSegment",
    "compact_history",
    "epsilon_for_history",
    "noise_multiplier_for_target",
]
