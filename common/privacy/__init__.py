"""Privacy accounting: mechanisms described as data, accountants that consume them."""

from common.privacy.accounting import (
    MechanismSegment,
    compact_history,
    epsilon_for_history,
    noise_multiplier_for_target,
)

__all__ = [
    "MechanismSegment",
    "compact_history",
    "epsilon_for_history",
    "noise_multiplier_for_target",
]
