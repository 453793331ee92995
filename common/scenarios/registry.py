"""The scenario registry (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ferry.common.config import class_weights
from ferry.common.data.dataset import Dataset
from ferry.common.errors import FerryError


@dataclass(frozen=True)
class Scenario:
    """A preset: what one institution stands for, what data it holds, what fits it.

    ``synthetic(spec, split)`` generates the built-in data (``split`` "target" for the
    institutions, "source" for ``ferry pretrain``); ``load(spec)`` reads a user's file or
    folder (``spec.data``) with the options the format needs. Both return a
    :class:`Dataset` and compute no statistics over it. ``classes``: the public class list
    of its built-in task (empty for regression): the run's classes when it gives none and
    uses the built-in data, or a deployment whose operator lists none. ``base_rates``: the
    public frequency of each of those classes in its built-in data, as its generator is
    constructed to produce them (a constant of the preset, never computed from institutions'
    data): the run's ``--base-rates`` when it gives none and uses the built-in data
    (:func:`with_base_rates`); empty for a balanced or regression task.
    """

    name: str
    description: str
    institution: str  # what one client stands for
    backbone: str  # the default backbone
    partition: str  # the default way a simulation splits the data
    expects: str  # what --data must be
    example: str  # a command line that runs the preset on a user's data
    synthetic: Callable[..., Dataset]
    load: Callable[..., Dataset]
    # The DP-SGD learning rate of a regression head (common.training_defaults: a
    # classification head takes the fitted rule's).
    lr: float = 1.0
    classes: tuple[str, ...] = ()
    base_rates: tuple[float, ...] = ()


SCENARIOS: dict[str, Scenario] = {}


def register_scenario(scenario: Scenario) -> Scenario:
    if scenario.name in SCENARIOS:
        raise ValueError(f"scenario {scenario.name!r} is registered twice")
    SCENARIOS[scenario.name] = scenario
    return scenario


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise FerryError(
            f"unknown scenario {name!r}: choose one of {', '.join(sorted(SCENARIOS))}"
        ) from None


def with_scenario_defaults(cfg):
    """``cfg`` (a RunConfig) with the scenario's backbone and partition where it left them
    unset, and its public class list when the run names none, is not a regression and reads
    no researcher's ``--data`` (a simulation on ``--data`` fixes the list from it). Training
    settings are chosen later, from the task (common.training_defaults)."""
    scenario = get_scenario(cfg.scenario)
    classes = cfg.classes
    if not classes and not cfg.data and cfg.task != "regression" and scenario.classes:
        classes = ",".join(scenario.classes)
    return replace(
        cfg,
        backbone=cfg.backbone or scenario.backbone,
        partition=cfg.partition or scenario.partition,
        classes=classes,
    )


def with_base_rates(cfg, num_classes: int):
    """``cfg`` (a RunConfig, scenario defaults applied, task known) with its ``base_rates``
    resolved for a simulation: "" becomes the preset's public rates when the run reads the
    built-in data with the preset's class list (otherwise it stays "": no weighting), and
    the rates must fit the task and its ``num_classes`` (:func:`common.config.class_weights`,
    a one-line refusal), checked here before any institution trains."""
    scenario = get_scenario(cfg.scenario)
    rates = cfg.base_rates
    built_in = not cfg.data and cfg.task != "regression" and scenario.base_rates
    if not rates.strip() and built_in and cfg.names("classes") == list(scenario.classes):
        rates = ",".join(repr(r) for r in scenario.base_rates)
    class_weights(rates, num_classes, cfg.task)
    return replace(cfg, base_rates=rates)


def known_scenarios() -> list[str]:
    return sorted(SCENARIOS)
