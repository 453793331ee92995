"""Typed run configuration, validated once at the edge.

The same :class:`RunConfig` comes from the ``ferry`` command line (and ``--config FILE``), from
``[tool.flwr.app.config]`` under ``flwr run .``, and travels to clients as a flat Flower
ConfigRecord. Keys use the dashed spelling of the command-line options.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ferry.common.errors import FerryError
from ferry.common.imports import IMPORT_PATH


@dataclass(frozen=True)
class RunConfig:
    scenario: str = "hospital-imaging"
    data: str = ""  # "" = the scenario's built-in synthetic data
    clients: int = 10
    # Training settings: None = chosen for the run (common.training_defaults): a DP-aware rule
    # from what is public (each institution's n, the run's epsilon), or settings tuned on public
    # data and recorded with the backbone (`ferry tune`). A value given here always wins.
    rounds: int | None = None
    fraction_train: float = 1.0
    epsilon: float = 3.0
    delta: float = 1e-5
    noise_multiplier: float | None = None  # None = derive from (epsilon, delta) per client
    max_grad_norm: float = 1.0
    non_private: bool = False
    # Each virtual institution's own budget (simulation); None = the run's epsilon / delta.
    # Deployed institutions set theirs in their client config; no server can override it.
    budget_epsilon: float | None = None
    budget_delta: float | None = None
    min_clients: int = 1  # end the run when fewer institutions with budget left remain
    # How the server combines updates (server.aggregation): fedavg | trimmed-mean | median |
    # krum. Every rule bounds influence: no institution weighs more than weight_cap x the
    # round's median claimed count, and each update's change is clipped to max_update_norm
    # (0 = adaptive: a multiple of the round's median change norm).
    aggregation: str = "fedavg"
    weight_cap: float = 2.0
    max_update_norm: float = 0.0
    local_epochs: int | None = None
    batch_size: int | None = None  # expected (Poisson) batch; None = per institution, from n
    lr: float | None = None  # SGD learning rate of the mean clipped gradient
    head: str = "linear"
    # What institutions train (common.trainable): head | lora | conv-adapter | last-block.
    trainable: str = "head"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = ""  # comma-separated name patterns; "" = the backbone's default
    adapter_dim: int = 16
    clipping: str = "flat"  # flat | ghost (Opacus ghost clipping: less memory, same mechanism)
    backbone: str = ""  # "" = the scenario's default backbone
    weights: str = ""  # pretrain output dir; "random" = no pretraining; "" = default location
    # How the data is read (scenario presets set sensible defaults; see README "Scenarios").
    label_column: str = ""  # tabular / molecules: the column to predict
    categorical: str = ""  # tabular: comma-separated columns to treat as categories
    task: str = "auto"  # auto | classification | regression
    # The public class list, comma-separated, in class-id order: each record's label is mapped
    # by it (never by the classes found in the data). "" = the scenario's built-in classes
    # with its synthetic data; a simulation on --data fixes it from the researcher's data.
    classes: str = ""
    # The public frequency of each class, comma-separated in class-id order (only their ratios
    # matter): each example's clipped gradient is weighted by min(rates) / its class's rate, so
    # the rare class is heard and sensitivity stays <= C (client.linear_dp). "" = the preset's
    # public rates with its built-in data (a simulation), else none; "off" = none.
    base_rates: str = ""
    date_column: str = ""  # price series: the date column
    value_columns: str = ""  # price series: comma-separated price columns ("" = all numeric)
    window: int = 30  # price series: days of past returns per example
    horizon: int = 1  # price series: predict the return over the next HORIZON days
    # Price series: the public held-out cutoff (YYYY-MM-DD): a window is held out when its
    # forecast period starts on or after it, trained on when it ends before it. "" = in a
    # simulation, fixed from the researcher's data; a deployment must give it.
    test_from: str = ""
    smiles_column: str = ""  # molecules: the SMILES column
    skip_unreadable: bool = False  # image folders / molecules: skip bad files, report the count
    # How a simulation splits the data among virtual institutions.
    partition: str = ""  # iid | dirichlet | quantity | natural; "" = the scenario's default
    partition_column: str = ""  # natural split: the column naming each example's institution
    alpha: float = 0.5
    examples: int = 4000
    test_fraction: float = 0.2
    seed: int = 0
    # Where clients compute: "auto" = CUDA when a client sees a GPU, else CPU.
    device: str = "auto"
    max_physical_batch: int = 0  # > 0: Opacus BatchMemoryManager physical batch size
    # Simulation resources per virtual client (Ray); fractions of a GPU share one GPU.
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    ray_address: str = ""  # "" = start Ray here; "auto" or HOST:PORT = join a Ray cluster
    out: str = ""

    @property
    def derive_noise(self) -> bool:
        return self.noise_multiplier is None

    def validate(self) -> RunConfig:
        """Return self, or raise :class:`FerryError` naming the field, the value and the fix."""

        def bad(name: str, value: object, fix: str) -> FerryError:
            return FerryError(f"--{name.replace('_', '-')} {value!r} is invalid: {fix}")

        if self.clients < 1:
            raise bad("clients", self.clients, "give at least 1 client")
        if self.rounds is not None and self.rounds < 1:
            raise bad("rounds", self.rounds, "give at least 1 round")
        for name, most in _LIMITS.items():  # counts and sizes: bounded where they enter
            if getattr(self, name) is not None and getattr(self, name) > most:
                raise bad(name, getattr(self, name), f"use at most {most:,}")
        if not 0 < self.fraction_train <= 1:
            raise bad("fraction_train", self.fraction_train, "use a fraction in (0, 1]")
        if not self.non_private and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise bad("epsilon", self.epsilon, "use a positive, finite epsilon (e.g. 3)")
        if not 0 < self.delta < 1:
            raise bad("delta", self.delta, "use 0 < delta < 1/n, e.g. 1e-5")
        if not self.derive_noise:
            if not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
                raise bad(
                    "noise_multiplier",
                    self.noise_multiplier,
                    "a noise multiplier must be >= 0; leave it out to derive it from --epsilon",
                )
            if self.noise_multiplier == 0 and not self.non_private:
                raise bad(
                    "noise_multiplier",
                    0,
                    "0 gives no privacy; mark the run non-private with --non-private",
                )
            if self.noise_multiplier > 1e6:
                raise bad(
                    "noise_multiplier",
                    self.noise_multiplier,
                    "no model learns under this much noise: use at most 1e6 (typically 0.5-10)",
                )
            if self.noise_multiplier > 0 and self.non_private:
                # One meaning of "private" everywhere: a noised round is accounted, always.
                raise bad(
                    "noise_multiplier",
                    self.noise_multiplier,
                    "a non-private run adds no noise: drop --noise-multiplier or --non-private",
                )
        if self.budget_epsilon is not None and not (
            self.budget_epsilon > 0 and math.isfinite(self.budget_epsilon)
        ):
            raise bad("budget_epsilon", self.budget_epsilon, "use a positive, finite budget")
        if self.budget_delta is not None and not 0 < self.budget_delta < 1:
            raise bad("budget_delta", self.budget_delta, "use 0 < budget delta < 1")
        if not 1 <= self.min_clients <= self.clients:
            raise bad("min_clients", self.min_clients, f"use 1 to --clients ({self.clients})")
        own_rule = IMPORT_PATH.fullmatch(self.aggregation)
        if self.aggregation not in AGGREGATION_RULES and not own_rule:
            raise bad(
                "aggregation",
                self.aggregation,
                f"use {', '.join(AGGREGATION_RULES)}, or your own rule as package.module:function",
            )
        if not (self.weight_cap >= 1 and math.isfinite(self.weight_cap)):
            raise bad("weight_cap", self.weight_cap, "use a finite cap >= 1 (e.g. 2)")
        if not (self.max_update_norm >= 0 and math.isfinite(self.max_update_norm)):
            raise bad("max_update_norm", self.max_update_norm, "use 0 (adaptive) or a finite bound")
        needed = updates_needed(self.aggregation, ASSUMED_HOSTILE)
        if self.min_clients < needed:
            raise bad(
                "min_clients",
                self.min_clients,
                f"{self.aggregation} needs at least {needed} updates per round to withstand "
                f"{ASSUMED_HOSTILE} hostile institution: use --min-clients {needed} or more "
                f"(and as many --clients), or --aggregation fedavg",
            )
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise bad("max_grad_norm", self.max_grad_norm, "use a positive, finite clipping norm")
        if self.local_epochs is not None and self.local_epochs < 1:
            raise bad("local_epochs", self.local_epochs, "use at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise bad("batch_size", self.batch_size, "use at least 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", self.lr, "use a positive learning rate")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise bad("alpha", self.alpha, "the Dirichlet concentration must be > 0")
        if not 0 < self.test_fraction < 1:
            raise bad("test_fraction", self.test_fraction, "use a fraction in (0, 1)")
        if self.device not in ("auto", "cpu", "cuda") and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise bad("device", self.device, "use auto, cpu, cuda or cuda:N")
        if self.max_physical_batch < 0:
            raise bad("max_physical_batch", self.max_physical_batch, "use 0 (off) or more")
        if not 0 < self.cpus_per_client <= _LIMITS["cpus_per_client"]:
            raise bad("cpus_per_client", self.cpus_per_client, "use a positive number of CPUs")
        if not 0 <= self.gpus_per_client <= _LIMITS["gpus_per_client"]:
            raise bad("gpus_per_client", self.gpus_per_client, "use 0 or a (fraction of a) GPU")
        from ferry.common.trainable import TRAINABLE_PARTS  # torch: not for `ferry --help`

        if self.trainable not in TRAINABLE_PARTS:
            raise bad("trainable", self.trainable, f"choose one of {', '.join(TRAINABLE_PARTS)}")
        if self.lora_rank < 1:
            raise bad("lora_rank", self.lora_rank, "a LoRA rank must be >= 1 (e.g. 8)")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise bad("lora_alpha", self.lora_alpha, "use a positive LoRA alpha (e.g. 16)")
        if self.adapter_dim < 1:
            raise bad("adapter_dim", self.adapter_dim, "an adapter bottleneck must be >= 1")
        if self.clipping not in ("flat", "ghost"):
            raise bad("clipping", self.clipping, "use flat or ghost")
        if self.task not in ("auto", "classification", "regression"):
            raise bad("task", self.task, "use auto, classification or regression")
        if self.classes:
            names = self.names("classes")
            if self.task == "regression":
                raise bad("classes", self.classes, "a regression task has no classes: drop it")
            if len(names) < 2 or len(set(names)) != len(names):
                raise bad("classes", self.classes, "list at least two distinct class names")
        if parse_base_rates(self.base_rates) is not None and self.task == "regression":
            raise bad("base_rates", self.base_rates, "a regression task has no classes: drop it")
        if self.test_from and not _is_date(self.test_from):
            raise bad("test_from", self.test_from, "write the cutoff date as YYYY-MM-DD")
        if self.window < 2:
            raise bad("window", self.window, "use a window of at least 2 days")
        if self.horizon < 1:
            raise bad("horizon", self.horizon, "forecast at least 1 day ahead")
        if self.partition not in ("", "iid", "dirichlet", "quantity", "natural"):
            raise bad("partition", self.partition, "use iid, dirichlet, quantity or natural")
        if self.partition == "natural" and not self.partition_column and self.data:
            raise bad("partition", "natural", "name the institution column with --partition-column")
        if not 0 <= self.seed < 2**32:
            raise bad("seed", self.seed, "use a seed from 0 to 2**32 - 1")
        if self.examples < 2 * self.clients:
            raise bad("examples", self.examples, f"give at least 2 per client ({2 * self.clients})")
        return self

    def class_weights(self, num_classes: int, task: str) -> tuple[float, ...] | None:
        """The weights training applies after clipping, from ``base_rates``
        (:func:`class_weights`: None for none, a one-line refusal for rates that do not fit)."""
        return class_weights(self.base_rates, num_classes, task)

    def names(self, field_name: str) -> list[str]:
        """A comma-separated setting as a list (``lora_targets``, ``categorical``, ...)."""
        return [v.strip() for v in str(getattr(self, field_name)).split(",") if v.strip()]

    def to_record(self) -> dict[str, bool | int | float | str]:
        """Flat dict with dashed keys (Flower ConfigRecord / run_config shape)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_mapping(cls, mapping: dict) -> RunConfig:
        """Build from dashed or underscored keys; unknown keys are an error naming them."""
        names = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise FerryError(
                    f"unknown setting {key!r}: known settings are "
                    f"{', '.join(n.replace('_', '-') for n in names)}"
                )
            kind = {"bool": bool, "int": int, "float": float}.get(
                str(names[name].type).split(" ")[0], str
            )
            if kind is str and isinstance(value, list | tuple):  # e.g. classes = ["a", "b"]
                value = ",".join(str(v) for v in value)
            values[name] = _coerce(key, value, kind)
        return cls(**values)


# Aggregation rules (server.aggregation) and how many hostile institutions a run's robust
# rules are sized for.
AGGREGATION_RULES = ("fedavg", "trimmed-mean", "median", "krum")
ASSUMED_HOSTILE = 1


def updates_needed(rule: str, hostile: int) -> int:
    """The fewest updates with which ``rule`` withstands ``hostile`` hostile ones: Krum needs
    n > 2f + 2 (Blanchard et al. 2017); the median and a mean trimmed by f at each end need
    n > 2f (the honest ones are a majority at every coordinate); FedAvg, bounded, needs 1."""
    if rule == "krum":
        return 2 * hostile + 3
    return 2 * hostile + 1 if rule in ("median", "trimmed-mean") else 1


def parse_base_rates(text: str) -> tuple[float, ...] | None:
    """``--base-rates`` as numbers: None for "" or "off" (no weighting), else one positive,
    finite number per class; a one-line :class:`FerryError` naming the fix otherwise."""
    text = str(text).strip()
    if not text or text.lower() == "off":
        return None
    shown = text if len(text) <= 60 else text[:57] + "..."
    fix = "give each class's public frequency in class-id order (e.g. 0.92,0.08), or off"
    try:
        rates = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise FerryError(f"--base-rates {shown!r} is invalid: {fix}") from None
    if not all(math.isfinite(r) and r > 0 for r in rates):
        raise FerryError(f"--base-rates {shown!r} is invalid: rates must be positive and finite")
    if len(rates) < 2:
        raise FerryError(f"--base-rates {shown!r} is invalid: {fix}, one rate per class")
    return rates


def class_weights(
    base_rates: str, num_classes: int, task: str = "classification"
) -> tuple[float, ...] | None:
    """The per-class weights training applies to each example's gradient *after* clipping
    (:mod:`client.linear_dp`, :mod:`client.dp_trainer`), from the run's public base rates:
    ``w_c = min(rates) / rate_c``, so every weight lies in [0, 1] (the rarest class gets 1; a
    weight may underflow to 0, never exceed 1). An example then adds at most ``w_y C <= C``
    to the clipped sum: the sensitivity, hence σ, q, steps and the accounting, are those of
    the unweighted mechanism. None: no weighting. A one-line refusal for rates a regression
    task or a class count they do not fit."""
    rates = parse_base_rates(base_rates)
    if rates is None:
        return None
    if task == "regression":
        raise FerryError("--base-rates is invalid for a regression task (no classes): drop it")
    if len(rates) != num_classes:
        raise FerryError(
            f"--base-rates lists {len(rates):,} rates but the task has {num_classes:,} classes: "
            "give one public rate per class, in class-id order, or off"
        )
    lowest = min(rates)
    # lowest <= r, and IEEE division rounds correctly, so lowest / r <= 1 exactly; min() only
    # states it.
    return tuple(min(1.0, lowest / r) for r in rates)


def read_toml(path: str | os.PathLike) -> dict:
    """A TOML file as a dict; FerryError (one line) for a missing, unreadable, binary or
    malformed file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise FerryError(f"cannot read config file {path} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise FerryError(f"config file {path} is not text (not UTF-8): give a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise FerryError(f"config file {path} is not valid TOML ({exc})") from None


def _is_date(text: str) -> bool:
    import numpy as np  # only for the config keys that hold dates; `ferry --help` skips it

    try:
        np.datetime64(text.strip(), "D")
    except ValueError:
        return False
    return True


# Upper bounds of counts and sizes: far above any real run, low enough that a typo (or a
# hostile config) cannot make Ferry spin for hours deriving σ or allocate terabytes.
_LIMITS = {
    "clients": 10_000,
    "rounds": 10_000,
    "local_epochs": 1_000,
    "batch_size": 1_000_000,
    "examples": 10_000_000,
    "window": 10_000,
    "horizon": 10_000,
    "lora_rank": 4_096,
    "adapter_dim": 4_096,
    "max_physical_batch": 1_000_000,
    "cpus_per_client": 1_024,
    "gpus_per_client": 64,
}


def _coerce(key: str, value: object, kind: type) -> object:
    # A TOML `rounds = true` or `rounds = 2.7` is a mistake, not 1 or 2.
    wrong = (kind in (int, float) and isinstance(value, bool)) or (
        kind is int and isinstance(value, float) and not value.is_integer()
    )
    if wrong or isinstance(value, dict):
        raise FerryError(f"setting {key!r} must be a {kind.__name__}, got {value!r}")
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise FerryError(f"setting {key!r} must be a {kind.__name__}, got {value!r}") from None
