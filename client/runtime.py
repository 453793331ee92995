"""What a Ferry client does, as plain functions the Flower ClientApp calls (and tests call).

Private (never leaves this process): raw examples, their features, per-example gradients,
preprocessing statistics, split-point activations. Released per round: the trained part's
arrays (head, adapters or last block: :mod:`common.trainable`), the training example count
n (it sets q; not covered by DP), the privacy report, and the sufficient statistics of the
local held-out split (counts and sums, not covered by DP). Nothing else computed on the
training split is released (:mod:`common.privacy.statement`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ferry.client.backbone_cache import BackboneCache
from ferry.client.budget_guard import (
    BudgetExceeded,
    can_afford_another,
    check_steps,
    reserve_round,
)
from ferry.client.dp_trainer import DPTrainConfig, predict_tail, resolve_device, train_tail
from ferry.client.feature_cache import FeatureCache, feature_key
from ferry.client.held_out import data_settings_of, pin_data_settings
from ferry.client.institution_settings import (
    ClientSettings,
)
from ferry.client.privacy_state import PrivacyState
from ferry.client.receipts import sign_and_keep
from ferry.common.data.datasets import DataSpec, Partition, load_partition, whole
from ferry.common.errors import FerryError
from ferry.common.evaluation_statistics import classification_statistics, regression_statistics
from ferry.common.messages import RoundRequest
from ferry.common.model import out_dim, split_for_run
from ferry.common.privacy import UNIT_OF_PRIVACY
from ferry.common.privacy.accounting import MechanismSegment, noise_multiplier_for_target
from ferry.common.privacy.dp_events import event_to_json, segment_event
from ferry.common.privacy.report import NON_PRIVATE_EVENT
from ferry.common.private_files import write_private
from ferry.common.trainable import SplitModel, load_trainable_state, trainable_state
from ferry.common.training_defaults import (
    batch_size_for,
    plan_for,
    resolve_schedule,
    round_plan,
    trainable_size,
)

ACCOUNTANT = "prv"
PROGRESS = logging.getLogger("ferry.progress")


def request_from_record(record: dict) -> RoundRequest:
    """The server's ``run`` record as a validated :class:`RoundRequest`
    (:meth:`common.messages.RoundRequest.from_record`), or a one-line refusal."""
    return RoundRequest.from_record(record)


def has_backbone(settings: ClientSettings, sha256: str) -> bool:
    return BackboneCache(settings.cache_dir).has(sha256)


def store_backbone(settings: ClientSettings, manifest: dict, tensors: dict, sha256: str) -> None:
    BackboneCache(settings.cache_dir).store(manifest, tensors, sha256)


@dataclass
class LocalData:
    """One institution's partition, its model split, and its cached split-point activations."""

    part: Partition
    model: SplitModel
    feats: dict[str, np.ndarray]
    manifest: dict


def _local_data(settings: ClientSettings, req: RoundRequest) -> LocalData:
    """This institution's partition, the run's model split, and the trunk's activations at
    the split point (train and test), from the feature cache."""
    if settings.data_path:  # deployed: the data settings are pinned before any data is read
        req = _with_pinned_data_settings(settings, req)
    artifact, backbone = BackboneCache(settings.cache_dir).load(req.backbone_sha256)
    manifest = artifact.manifest
    spec = DataSpec.from_run(req.run, settings.num_partitions, tuple(manifest["input_shape"]))
    # The task and the class list are public, from the run config: never inferred here.
    spec = replace(spec, task=req.task)
    if req.task == "classification" and spec.classes and len(spec.classes) != req.num_classes:
        raise FerryError(
            f"the run lists {len(spec.classes)} classes ({', '.join(spec.classes)}) but "
            f"num-classes is {req.num_classes}: the operator must list the institutions' "
            "classes (classes in the run config) with as many names as num-classes"
        )
    if settings.data_path:
        spec = whole(replace(spec, data=settings.data_path))
    if settings.held_out is not None:  # the institution's own split, never the server's
        spec = replace(
            spec, test_fraction=settings.held_out.test_fraction, seed=settings.held_out.salt
        )
    with _data_errors_stay_local(settings):
        part = load_partition(spec, settings.partition_id)
        _check_layout(part, manifest, settings)
    model = split_for_run(backbone, manifest, req.run, out_dim(req.task, req.num_classes))
    pre = manifest["preprocessing"]
    key = feature_key(req.backbone_sha256, part.fingerprint, pre, model.split)
    feats = FeatureCache(settings.cache_dir).get(
        key,
        model.trunk,
        pre,
        {"train": part.train_x, "test": part.test_x},
        device=resolve_device(req.run.device),
    )
    return LocalData(part, model, feats, manifest)


def _with_pinned_data_settings(settings: ClientSettings, req: RoundRequest) -> RoundRequest:
    """``req`` if its data-shaping settings match those the institution pinned on first use
    (client.held_out.pin_data_settings; an empty class list or cutoff takes the pinned one),
    else a one-line refusal naming the setting: it depends on the configuration alone."""
    wanted = data_settings_of(req.run)
    used = pin_data_settings(settings.state_dir, wanted)
    if used == wanted:
        return req
    run = replace(req.run, classes=",".join(used["classes"]), test_from=str(used["test-from"]))
    return replace(req, run=run)


class DataRefused(FerryError):
    """A deployed institution's data does not fit the run; the details stay in its log."""

    kind = "data"


@contextlib.contextmanager
def _data_errors_stay_local(settings: ClientSettings):
    """In a deployed client, a :class:`FerryError` raised while reading and preparing the
    institution's data (it may quote a cell value, a label or a row number: private) goes to
    the institution's own log (stderr, which the SuperNode log keeps) and the server gets one
    generic line. In simulation the researcher owns the data and sees the full message."""
    if not settings.data_path:
        yield
        return
    try:
        yield
    except FerryError as exc:
        print(
            f"ferry: {settings.institution}: round refused, data problem: {exc}",
            file=sys.stderr,
            flush=True,
        )
        raise DataRefused(
            f"{settings.institution}'s data does not fit the run's settings (label column, "
            "classes, task): details in its own log"
        ) from None


def _check_layout(part: Partition, manifest: dict, settings: ClientSettings) -> None:
    """Non-image data must have the layout the backbone was pretrained on."""
    if part.train.modality == "image":
        return
    want = tuple(manifest["input_shape"])
    got = tuple(part.train_x.shape[1:])
    if got != want:
        columns = manifest.get("pretraining", {}).get("columns") or []
        missing = [c for c in columns if c not in part.train.columns]
        hint = f" (missing: {', '.join(missing[:5])})" if missing else ""
        raise FerryError(
            f"{settings.institution}'s data has layout {got} but backbone "
            f"{manifest['architecture']} expects {want}{hint}: give data with the columns the "
            "backbone was pretrained on, or pretrain a backbone on data like yours"
        )


def _tail(data: LocalData, arrays: dict[str, np.ndarray]) -> torch.nn.Module:
    tail = data.model.tail
    load_trainable_state(tail, arrays)
    return tail


def noise_for(
    req: RoundRequest, num_examples: int, state_dir: Path | None = None, params: int = 1
) -> float:
    """The run's noise multiplier: given, or derived so that all planned rounds stay within
    the run's (epsilon, delta) for this institution's sample rate and step count.

    A derivation (a PRV bisection, seconds) is remembered in ``state_dir/noise_cache.json``:
    deployed clients run each round in a fresh process, where in-memory caches are empty."""
    run = resolve_schedule(req.run)[0]
    if not run.derive_noise:
        return float(run.noise_multiplier)
    if run.non_private:
        return 0.0
    q, steps = plan_for(run, num_examples, params)
    key = json.dumps([run.epsilon, run.delta, q, steps * run.rounds, ACCOUNTANT])
    cache_file = state_dir / "noise_cache.json" if state_dir else None
    cache = {}
    if cache_file and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except ValueError:
            cache = {}  # a damaged cache is only a lost speed-up
    if key in cache:
        return float(cache[key])
    total = steps * run.rounds
    started = time.monotonic()
    PROGRESS.info("deriving σ for ε=%g over %d steps at q=%.4g (PRV)", run.epsilon, total, q)
    sigma = noise_multiplier_for_target(run.epsilon, run.delta, q, total, ACCOUNTANT)
    PROGRESS.info("σ = %.4f (derived in %.1fs)", sigma, time.monotonic() - started)
    if cache_file:
        cache[key] = sigma
        write_private(cache_file, json.dumps(cache).encode())  # it holds q, so n: 0600
    return sigma


def train_round(
    settings: ClientSettings, req: RoundRequest, arrays: dict
) -> tuple[dict, dict, dict]:
    """One DP training round: (trainable arrays, ``{"num-examples": n}``, privacy report).

    Refused (one line, nothing spent) before any data is read: a request with any value out of
    range (:meth:`RoundRequest.validate`), and a non-private round at an institution with a
    budget (every deployed one): a budget is never bypassed by the server's mark."""
    req.validate()
    # Settings the server left out take the public rule's values (common.training_defaults),
    # as the server's own check of the report assumes.
    req = replace(req, run=resolve_schedule(req.run)[0])
    if req.run.non_private and settings.budget is not None:
        raise BudgetExceeded(
            f"{settings.institution} has a privacy budget (ε={settings.budget.epsilon:g}) and "
            "trains no non-private round: the operator must run without --non-private"
        )
    data = _local_data(settings, req)
    part = data.part
    n = part.num_train
    if n == 0:
        raise FerryError(f"{settings.institution} has no training examples")
    if not req.run.non_private and req.run.delta >= 1.0 / n:
        raise FerryError(
            f"delta {req.run.delta:g} >= 1/n = {1.0 / n:.3g} for {settings.institution} "
            f"({n} examples) gives no meaningful guarantee: use --delta below {1.0 / n:.1g}"
        )
    # A foreign, lost or damaged privacy state is refused before anything else (this also
    # creates the state directory). A server-chosen batch size or epoch count with absurdly
    # many steps is refused before the noise derivation, the accountant or training hang on it.
    PrivacyState.open(settings.state_dir, settings.institution)
    params = trainable_size(trainable_state(data.model.tail))  # p, as the server counts it
    batch = batch_size_for(req.run, n, params)
    check_steps(round_plan(n, batch, req.run.local_epochs)[1], n)
    cfg = DPTrainConfig(
        # First: rates that do not fit the task are refused before σ is derived or anything spent.
        class_weights=req.run.class_weights(req.num_classes, req.task),
        noise_multiplier=noise_for(req, n, settings.state_dir, params),
        max_grad_norm=req.run.max_grad_norm,
        batch_size=batch,
        local_epochs=req.run.local_epochs,
        lr=req.run.lr,
        non_private=req.run.non_private,
        device=resolve_device(req.run.device),
        max_physical_batch=req.run.max_physical_batch,
        clipping=req.run.clipping,
    )
    cfg.validate()
    q, steps = round_plan(n, cfg.batch_size, cfg.local_epochs)
    planned = MechanismSegment(cfg.noise_multiplier, q, steps)
    tail = _tail(data, arrays)  # arrays that do not fit this model fail here, spending nothing
    # Before any training, under the state's lock: re-read the spend on disk, refuse a round
    # that would take us over budget, and record the planned round (write-ahead; a round that
    # then fails or never replies is over-counted, never lost).
    state = reserve_round(
        settings.state_dir,
        settings.institution,
        planned,
        req.run.delta,
        settings.budget,
        ACCOUNTANT,
        spend=cfg.private,  # the trainer's own definition: a noised round always spends
        round=req.round,
        run=req.run_id,
    )
    outcome = train_tail(tail, data.feats["train"], part.train_y, cfg, req.task)
    report = {
        "run-id": req.run_id,
        "round": req.round,
        "institution": settings.institution,
        "unit": UNIT_OF_PRIVACY,
        # q = 1/ceil(n/B) and steps = epochs * ceil(n/B): an auditor checks them from these
        "examples": n,
        "batch-size": cfg.batch_size,
        "local-epochs": cfg.local_epochs,
        "delta": req.run.delta,
        "max-grad-norm": req.run.max_grad_norm,
        "non-private": outcome.segment is None,
        "accountant": ACCOUNTANT,
        "accountant-library": f"opacus {_opacus_version()}",
        "sampling": "poisson",
    }
    if settings.budget is not None:
        report["budget-epsilon"] = settings.budget.epsilon
        report["budget-delta"] = settings.budget.delta
    if outcome.segment is not None:
        if outcome.segment != planned:
            raise FerryError(f"Opacus ran {outcome.segment}, not the planned {planned}")
        # The spend was recorded (write-ahead) by reserve_round, before training.
        report.update(
            {
                "noise-multiplier": outcome.segment.noise_multiplier,
                "sample-rate": outcome.segment.sample_rate,
                "steps": outcome.segment.steps,
                "dp-event": event_to_json(segment_event(outcome.segment)),
                "epsilon": state.epsilon(req.run.delta, ACCOUNTANT),
                "rounds": state.rounds(),
                "budget-left-for-another-round": settings.budget is None
                or can_afford_another(state.history, planned, req.run.delta, settings.budget),
            }
        )
    else:
        report.update(
            {"noise-multiplier": 0.0, "sample-rate": 1.0, "steps": 0, "epsilon": math.inf}
        )
        report.update({"dp-event": NON_PRIVATE_EVENT, "rounds": state.rounds()})
    # Signed with a key only this institution holds and kept in its receipt chain before
    # the reply leaves: the server can store it, not alter it (client.receipts).
    report.update(
        sign_and_keep(settings.state_dir, settings.institution, report, settings.report_key)
    )
    # Nothing computed on the training split is released but the DP arrays and n (which
    # sets q): no train loss or accuracy (a free query with a head the server chooses).
    metrics = {"num-examples": n}
    return outcome.trainable_state, metrics, report


def _opacus_version() -> str:
    import opacus

    return opacus.__version__


def evaluate_round(settings: ClientSettings, req: RoundRequest, arrays: dict) -> dict:
    """The sufficient statistics of the global model's predictions on this institution's
    held-out split (counts and sums, :mod:`common.metrics`; not DP): the server computes
    every metric from them. Nothing computed on the training split is released here; a
    deployed institution's held-out split is its own (:mod:`client.held_out`), so no
    evaluate message can move training records into it."""
    req.validate()
    data = _local_data(settings, req)
    y = data.part.test_y
    width = 1 if req.task == "regression" else req.num_classes
    out = predict_tail(_tail(data, arrays), data.feats["test"]) if len(y) else np.zeros((0, width))
    if req.task == "regression":
        stats = regression_statistics(y, out[:, 0], directional=data.part.test.directional)
    else:
        stats = classification_statistics(y, out, req.num_classes)
    return stats.to_record()
