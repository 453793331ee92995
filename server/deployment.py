"""The ServerApp's deployment path: a :class:`FederationPlan` for real institutions.

``ferry server`` submits the run with ``mode = "deployment"`` in the run config. Unlike a
simulation nothing is generated here: the institutions hold their own data, so the number of
classes comes from the config, and the backbone from its weights path. Run-config keys:

``mode``             "deployment"
``num-classes``      classes of the task the institutions' data is labelled with
``round-timeout``    seconds each exchange of a round waits for replies (stragglers dropped)
``connect-timeout``  seconds to wait for ``clients`` institutions before starting with fewer
``resume``           true: continue the run in ``out`` after its last checkpointed round
``institutions``     JSON {node id: institution name} of the registered SuperNodes (for the
                     ledger, when a node drops before it ever replied)

plus every :class:`common.config.RunConfig` setting (``clients`` = institutions expected).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from ferry.common.config import RunConfig
from ferry.common.errors import FerryError
from ferry.common.model import initial_trainable_arrays, out_dim
from ferry.common.scenarios import with_scenario_defaults
from ferry.server.aggregation import rule_named
from ferry.server.backbone_source import choose_training, resolve_backbone
from ferry.server.checkpoint import CHECKPOINT_FILE
from ferry.server.federation import FederationPlan
from ferry.server.ledger import LEDGER_FILE
from ferry.server.outputs import RUN_FILES, prepare_out_dir

MODE = "deployment"
DEPLOYMENT_KEYS = (
    "mode",
    "num-classes",
    "round-timeout",
    "connect-timeout",
    "resume",
    "institutions",
)


def is_deployment(run_config: dict) -> bool:
    return str(run_config.get("mode", "")) == MODE


def _positive(run_config: dict, key: str, default: float) -> float:
    value = run_config.get(key, default)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise FerryError(
            f"{key} {run_config.get(key)!r} is invalid: use a positive number of seconds"
        )
    return value


@dataclass(frozen=True)
class DeploymentSettings:
    """A validated deployment run config."""

    cfg: RunConfig
    num_classes: int
    round_timeout: float
    connect_timeout: float
    resume: bool
    node_names: dict[int, str]


def check_deployment(run_config: dict) -> DeploymentSettings:
    """Validate a deployment run config without touching the disk (raises FerryError)."""
    run_config = dict(run_config)
    cfg = RunConfig.from_mapping(
        {k: v for k, v in run_config.items() if k not in DEPLOYMENT_KEYS}
    ).validate()
    cfg = with_scenario_defaults(cfg)
    rule_named(cfg.aggregation)  # the operator's own rule must import here, before any run
    try:
        num_classes = int(run_config["num-classes"])
    except (KeyError, TypeError, ValueError):
        num_classes = 0
    if cfg.task == "regression":
        num_classes = 0
    else:
        cfg = replace(cfg, task="classification")
    if cfg.task == "classification" and num_classes < 2:
        raise FerryError(
            f"num-classes {run_config.get('num-classes')!r} is invalid: give the number of "
            'classes in the institutions\' data (at least 2), or task = "regression"'
        )
    if not cfg.out or not Path(cfg.out).is_absolute():
        raise FerryError(f"out {cfg.out!r} is invalid: a deployment run needs an absolute path")
    resume = str(run_config.get("resume", False)).lower() in ("true", "1")
    out = Path(cfg.out)
    if resume:
        if not (out / CHECKPOINT_FILE).exists():
            raise FerryError(f"{out} holds no {CHECKPOINT_FILE}: nothing to resume")
        if (out / "summary.json").exists():
            raise FerryError(f"the run in {out} has already finished: nothing to resume")
    elif any((out / f).exists() for f in (*RUN_FILES, CHECKPOINT_FILE, LEDGER_FILE)):
        raise FerryError(
            f"{out} already holds a run: choose a new out directory, or resume it with "
            f"--resume {out} (nothing was overwritten)"
        )
    try:
        names = json.loads(str(run_config.get("institutions") or "{}"))
        names = {int(k): str(v) for k, v in names.items()}
    except (ValueError, AttributeError) as exc:
        raise FerryError(f"institutions is not a JSON object of node id -> name ({exc})") from None
    return DeploymentSettings(
        cfg,
        num_classes,
        _positive(run_config, "round-timeout", 600.0),
        _positive(run_config, "connect-timeout", 300.0),
        resume,
        names,
    )


def plan_deployment(run_config: dict, log=print) -> FederationPlan:
    """Validate a deployment run config and build its plan (raises FerryError)."""
    s = check_deployment(run_config)
    artifact = resolve_backbone(s.cfg.backbone, s.cfg.weights, s.cfg.seed, s.cfg.scenario)
    cfg, source = choose_training(s.cfg, artifact, log)
    initial_trainable_arrays(artifact, cfg, out_dim(cfg.task, s.num_classes))
    out = Path(s.cfg.out) if s.resume else prepare_out_dir(s.cfg.out)
    return FederationPlan(
        cfg=cfg,
        artifact=artifact,
        num_classes=s.num_classes,
        out=out,
        run_id=out.name,
        round_timeout=s.round_timeout,
        connect_timeout=s.connect_timeout,
        resume=s.resume,
        node_names=s.node_names,
        log=log,
        training_source=source,
    )
