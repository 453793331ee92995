"""DP-aware training settings: what a run uses for the settings its operator leaves out.

DP-SGD at a fixed (ε, δ) rewards large expected batches and enough passes over the data
(Ponomareva et al. 2023, "How to DP-fy ML", §5; De et al. 2022). Each step adds Gaussian noise
of norm about σ·C·√p to the clipped sum of a part with p trainable values, while the signal is
at most C per example: the batch that keeps the mean gradient's noise in check grows with √p,
and with Poisson sampling the σ a budget needs grows only about as fast as the batch, so the
larger batch comes almost free, up to the whole institution (q = 1). The noisier the mean
gradient (the smaller ε), the smaller the step it can take. Ferry's defaults follow that, from
what is known without touching private data:

* **batch size** (per institution): ``5·√p`` within [32, 1024] and at most the institution's
  own n (:func:`rule_batch_size`; n is released anyway: it sets q, and p is public: the size of
  the arrays the server sends);
* **local epochs, rounds, learning rate** (the same for every institution): 6 rounds of 5
  local epochs at learning rate ``min(2, 0.3·ε)`` (:func:`rule_schedule`); a regression head
  takes its preset's learning rate, a non-private run 0.1 (unclipped gradients are larger).

Explicit options always win; next come settings tuned on public data and recorded with the
backbone (``ferry tune``, ``tuning.json``); the rule fills the rest. Every value a run uses,
and where it came from, is printed at start and written to the ledger's ``run_started``
record; each institution's batch size is in its signed privacy report, and the server checks
it against the rule for the report's n.

The constants were fitted on public data with the in-process federation of
:mod:`server.tuning` (digits on the ImageNet EfficientNet-Lite0, p = 12,810; the
hospital-imaging preset on ``ferry-cnn``, p = 260; breast cancer on a tabular encoder), at
ε = 1, 3, 8 for 1 and 5 institutions, against a grid of batch sizes 64 to 512, (rounds,
epochs) (5, 1), (5, 3), (6, 5) and learning rates 0.25 to 2; the figures, and the command that
measures them, are in ``BENCHMARKS.md`` (``python -m simulations.bench.kcurve_bench``).
"""

from __future__ import annotations

import dataclasses
import math

from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.privacy.accounting import UnreachableTarget, noise_multiplier_for_target
from ferry.common.scenarios import get_scenario

# Fitted constants (see the module docstring).
BATCH_PER_SQRT_PARAMS = 5.0
MIN_BATCH, MAX_BATCH = 32, 1024
ROUNDS, LOCAL_EPOCHS = 6, 5
LR_PER_EPSILON, MAX_LR = 0.3, 2.0
NON_PRIVATE_LR = 0.1


@dataclasses.dataclass(frozen=True)
class Schedule:
    local_epochs: int
    rounds: int
    lr: float


def rule_batch_size(n: int, params: int) -> int:
    """The expected (Poisson) batch size of an institution with ``n`` training examples that
    trains ``params`` values."""
    if n < 1 or params < 1:
        raise ValueError(f"an institution trains at least one value on one example ({n}, {params})")
    b = round(BATCH_PER_SQRT_PARAMS * math.sqrt(params))
    return max(1, min(n, MAX_BATCH, max(MIN_BATCH, b)))


def rule_schedule(cfg: RunConfig) -> Schedule:
    """Local epochs, rounds and learning rate for ``cfg``'s privacy (and task)."""
    lr = NON_PRIVATE_LR if cfg.non_private else min(MAX_LR, LR_PER_EPSILON * cfg.epsilon)
    if cfg.task == "regression":  # squared errors: the preset's own step size
        lr = get_scenario(cfg.scenario).lr
    return Schedule(local_epochs=LOCAL_EPOCHS, rounds=ROUNDS, lr=lr)


def trainable_size(arrays) -> int:
    """p: how many values the trainable arrays hold (what the server sends each round)."""
    return int(sum(int(a.size) for a in arrays.values()))


def round_plan(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sample rate q, steps) one round runs on ``num_examples`` examples; Opacus' formula."""
    batches = max(1, math.ceil(num_examples / batch_size))
    return 1.0 / batches, local_epochs * batches


def plan_for(cfg: RunConfig, n: int, params: int) -> tuple[float, int]:
    """(q, steps) of one round of ``cfg`` at an institution of ``n`` training examples that
    trains ``params`` values, every setting the run leaves out chosen as
    :func:`resolve_schedule` chooses it."""
    run = resolve_schedule(cfg)[0]
    return round_plan(n, batch_size_for(run, n, params), run.local_epochs)


def batch_size_for(cfg: RunConfig, n: int, params: int) -> int:
    """The batch size an institution of ``n`` training examples that trains ``params`` values
    uses in ``cfg``'s run: the run's, when it names one, else :func:`rule_batch_size`. Client
    and server both call this, so the server can check the batch size in every signed
    report."""
    return int(cfg.batch_size) if cfg.batch_size is not None else rule_batch_size(n, params)


# Where each setting came from, as printed and recorded.
GIVEN, TUNED, RULE = "given", "tuned", "rule"
TUNED_FIELDS = ("batch_size", "local_epochs", "rounds", "lr")


def resolve_schedule(cfg: RunConfig, tuned: dict | None = None) -> tuple[RunConfig, dict]:
    """``cfg`` with local epochs, rounds and learning rate filled in (the batch size too when
    ``tuned`` names one; otherwise each institution takes :func:`rule_batch_size` of its n),
    and where each came from: {field: "given" | "tuned" | "rule"}.

    ``tuned``: settings recorded by ``ferry tune`` for this run's ε (None: none)."""
    rule = rule_schedule(cfg)
    values, source = {}, {}
    for name in TUNED_FIELDS:
        given = getattr(cfg, name)
        if given is not None:
            values[name], source[name] = given, GIVEN
        elif tuned and tuned.get(name) is not None:
            values[name], source[name] = tuned[name], TUNED
        elif name == "batch_size":
            values[name], source[name] = None, RULE  # per institution, from its own n
        else:
            values[name], source[name] = getattr(rule, name), RULE
    return dataclasses.replace(cfg, **values), source


def describe(cfg: RunConfig, source: dict) -> str:
    """One line: the settings a run uses and where each came from."""
    batch = (
        f"batch {cfg.batch_size} ({source['batch_size']})"
        if cfg.batch_size is not None
        else f"batch per institution {BATCH_PER_SQRT_PARAMS:g}·√p within [{MIN_BATCH}, "
        f"{MAX_BATCH}], at most n (rule)"
    )
    return (
        f"training: {batch}, {cfg.local_epochs} local epochs ({source['local_epochs']}), "
        f"{cfg.rounds} rounds ({source['rounds']}), lr {cfg.lr:g} ({source['lr']})"
    )


def training_record(cfg: RunConfig, source: dict) -> dict:
    """The ledger's account of a run's training settings: each value (the batch size as the
    rule an institution applies to its own n, when it is per institution) and its source."""
    batch = cfg.batch_size
    if batch is None:
        batch = (
            f"per institution: round({BATCH_PER_SQRT_PARAMS:g}*sqrt(p)) within "
            f"[{MIN_BATCH}, {MAX_BATCH}] and at most n (p = trainable values)"
        )
    return {
        "batch_size": batch,
        "local_epochs": cfg.local_epochs,
        "rounds": cfg.rounds,
        "lr": cfg.lr,
        "source": dict(source),
    }


def check_feasible(cfg: RunConfig, sizes: list[int], params: int) -> None:
    """Refuse, in one line naming the fix, a run whose settings cannot meet its budget at
    some institution of the given training-split ``sizes``: a batch larger than the
    institution (no sampling left to amplify privacy), or an ε that needs more noise than the
    accountant's range at the smallest or the largest institution. Checked before any work;
    a deployed institution checks its own n the same way before it spends anything."""
    if cfg.batch_size is not None and cfg.batch_size > min(sizes):
        raise FerryError(
            f"--batch-size {cfg.batch_size} is larger than the smallest institution "
            f"({min(sizes)} training examples): use --batch-size {min(sizes)} or less, or leave "
            "it out so that each institution sizes its batch from its own n"
        )
    if cfg.non_private or not cfg.derive_noise:
        return
    for n in sorted({min(sizes), max(sizes)}):
        q, steps = round_plan(n, batch_size_for(cfg, n, params), cfg.local_epochs)
        try:  # RDP: a safe, fast upper bound on the PRV σ the institution will derive
            noise_multiplier_for_target(cfg.epsilon, cfg.delta, q, steps * cfg.rounds, "rdp")
        except UnreachableTarget:
            raise FerryError(
                f"--epsilon {cfg.epsilon:g} cannot be met by an institution of {n} examples "
                f"over {cfg.rounds} rounds of {steps} steps: it needs a noise multiplier above "
                "the accountant's range (1e4): give a larger --epsilon, or fewer --rounds or "
                "--local-epochs"
            ) from None
