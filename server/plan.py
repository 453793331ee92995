"""What the server's round loop works from (:class:`FederationPlan`) and keeps
(:class:`FederationState`); the loop is :mod:`server.federation`, one round's exchanges
:mod:`server.rounds`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferry.common.config import RunConfig
from ferry.common.serialization import BackboneArtifact
from ferry.common.training_defaults import resolve_schedule
from ferry.server.aggregation import RoundAggregation
from ferry.server.ledger import Ledger


@dataclass
class FederationPlan:
    """Everything the round loop needs beyond the run config."""

    cfg: RunConfig
    artifact: BackboneArtifact
    num_classes: int
    out: Path
    # Simulation only: where virtual institutions keep state and caches (sent to them).
    client_state_root: Path | None = None
    client_cache_root: Path | None = None
    run_id: str = ""
    round_timeout: float | None = None  # seconds each exchange waits; None = forever
    connect_timeout: float = 300.0  # seconds to wait for ``cfg.clients`` to connect
    resume: bool = False  # continue after the checkpoint in ``out``
    node_names: dict[int, str] = field(default_factory=dict)  # registered node id -> name
    # Where each training setting came from: {field: given | tuned | rule}
    # (common.training_defaults.resolve_schedule); recorded in ``run_started``.
    training_source: dict[str, str] = field(default_factory=dict)
    # What a round does with its usable updates (server.aggregation.RoundAggregation: the
    # rule, a secure-aggregation decoder, post-aggregation steps); None: the run config's.
    aggregation: RoundAggregation | None = None
    # The class names in class-id order (the data's in simulation; the run config's public
    # list in a deployment): they go into the final model (server.final_model).
    class_names: tuple[str, ...] = ()
    # Simulation: each partition's institution name when the data's natural split names them
    # (the groups of --partition natural, e.g. ferry.simulate(data={name: ...})); () = the
    # scenario's "hospital-000" names.
    institution_names: tuple[str, ...] = ()
    # Called with every round's record as the round ends (server.metric_sinks: TensorBoard).
    round_sinks: tuple[Callable[[dict], None], ...] = ()

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = tuple(self.cfg.names("classes"))
        # Every round asks for settled values: what the planner left out takes the rule's
        # (common.training_defaults), as every institution would take it.
        if any(getattr(self.cfg, k) is None for k in ("local_epochs", "rounds", "lr")):
            self.cfg, source = resolve_schedule(self.cfg)
            self.training_source = {**source, **self.training_source}
        if self.aggregation is None:
            self.aggregation = RoundAggregation.from_config(self.cfg)

    log: Callable[[str], None] = print
    ledger: Ledger | None = None  # opened by run_federation in ``out``


@dataclass
class FederationState:
    arrays: dict[str, np.ndarray]
    holders: set[int] = field(default_factory=set)
    institutions: dict[int, str] = field(default_factory=dict)  # node id -> institution
    exhausted: dict[int, str] = field(default_factory=dict)  # node id -> why not selected
    clients: dict[str, dict] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)  # this round: node -> why
