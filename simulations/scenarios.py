"""Scenario presets, by name: what the virtual institutions hold and the defaults that fit."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import FerryError


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    institution: str  # what one client stands for


SCENARIOS = {
    "hospital-imaging": Scenario(
        "hospital-imaging",
        "lesion-type classification of small grayscale scans (built-in synthetic: 4 lesion "
        "shapes in noise and clutter, non-IID across hospitals), or an image folder via --data",
        "hospital",
    ),
}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise FerryError(
            f"unknown scenario {name!r}: choose one of {', '.join(sorted(SCENARIOS))}"
        ) from None
