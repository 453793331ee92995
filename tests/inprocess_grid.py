"""Ferry's round loop over an in-process grid: no Ray, no process, the real ClientApp handlers.

:class:`FakeGrid` hands every message to Ferry's real ClientApp handlers (virtual institutions
training with DP-SGD on their partition) and returns their replies, except where a test makes
a node stay silent (a straggler), answers with a SuperLink transport error, or makes the
server "crash" in the middle of an exchange.

:func:`simulate_in_process` is ``ferry simulate`` without Flower's Ray backend: the same plan
(:func:`ferry.server.simulation_plan.plan_simulation`: every check, the backbone, the data) and the
same round loop (:func:`ferry.server.federation.run_federation`), each client answering in this
process. Tests whose point is the run (presets, metrics, the ledger), not Ray, use it; the
tests that need Ray itself (``test_simulation_e2e``, ``test_backbone_transport``,
``test_bench``, ...) still call :func:`ferry.simulations.runner.simulate`.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

import ferry.client.app as client_app
import ferry.client.backbone_cache as backbone_cache
import ferry.client.feature_cache as feature_cache
import ferry.server.exchange as exchange
from ferry.common.config import RunConfig
from ferry.server.federation import FederationPlan, run_federation
from ferry.server.simulation_plan import plan_simulation

NODES = [2**63 + 11, 2**63 + 22, 2**63 + 33]  # 64-bit ids, as Flower's
HANDLERS = {
    "query.backbone_offer": client_app.backbone_offer,
    "query.backbone_ship": client_app.backbone_ship,
    "train": client_app.train,
    "evaluate": client_app.evaluate,
}


class Crash(Exception):
    """The server process dies here."""


class FakeGrid:
    """A Grid whose clients answer at push time, unless ``fate`` says otherwise.

    ``fate(node, message) -> "answer" | "silent" | "unavailable" | "crash"``: "crash" runs the
    client (it trains and records its spend) and then kills the server before any reply
    reaches it. Node ``nodes[i]`` is partition ``i`` of ``len(nodes)``."""

    def __init__(self, fate=None, online=None, nodes=None):
        self.nodes = list(NODES if nodes is None else nodes)
        self.fate = fate or (lambda node, msg: "answer")
        self.online = list(self.nodes if online is None else online)
        self.replies: dict[str, Message] = {}
        self.exchanged: list[tuple[Message, Message]] = []  # (message, its reply), as answered

    def get_node_ids(self):
        return list(self.online)

    def push_messages(self, messages):
        ids, crash = [], False
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            fate = self.fate(node, msg)
            if fate == "silent":
                continue
            if fate == "unavailable":  # written by the SuperLink, not by the node
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "node offline"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1
            else:
                context = Context(
                    run_id=1,
                    node_id=node,
                    node_config={
                        "partition-id": self.nodes.index(node),
                        "num-partitions": len(self.nodes),
                    },
                    state=RecordDict(),
                    run_config={},
                )
                reply = HANDLERS[msg.metadata.message_type](msg, context)
            self.replies[msg.metadata.message_id] = reply
            self.exchanged.append((msg, reply))
            crash = crash or fate == "crash"
        if crash:
            raise Crash
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def act_as_server_app(mp: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has set when it builds messages; and a fast poll."""
    mp.setattr(TaskIdentity, "_run_id", 1)
    mp.setattr(TaskIdentity, "_node_id", 0)
    mp.setattr(TaskIdentity, "_task_id", 1)
    mp.setattr(exchange, "POLL_SECONDS", 0.01)


def grid_plan(
    cfg: RunConfig, artifact, cache_root, run_id: str = "run", round_timeout: float = 5.0, **changes
) -> FederationPlan:
    """The plan of a federation over a grid of this module: outputs in ``cfg.out`` (created),
    client state under it, client caches under ``cache_root``, no output on the console."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return FederationPlan(
        cfg=cfg,
        artifact=artifact,
        num_classes=4,
        out=out,
        client_state_root=out / "clients",
        client_cache_root=cache_root,
        run_id=run_id,
        round_timeout=round_timeout,
        connect_timeout=1.0,
        log=lambda _: None,
        **changes,
    )


def empty_process_caches(mp: pytest.MonkeyPatch) -> None:
    """Forget what a client process keeps in memory (verified trunks, features), as a fresh
    Ray worker or ClientApp process would; ``mp`` restores them when its test ends."""
    mp.setattr(backbone_cache, "_LOADED", {})
    mp.setattr(feature_cache, "_MEMORY", {})


def run_in_process(plan: FederationPlan, client_app=None) -> None:
    """A stand-in for :func:`ferry.simulations.runner.run_on_ray`: the same plan and round
    loop, every institution answering in this process with Ferry's ClientApp handlers."""
    nodes = [2**63 + 1000 + i for i in range(plan.cfg.clients)]
    with pytest.MonkeyPatch.context() as mp:
        act_as_server_app(mp)
        run_federation(FakeGrid(nodes=nodes), plan)


def simulate_in_process(cfg: RunConfig) -> dict:
    """Run ``cfg`` as ``ferry simulate`` would, its ``cfg.clients`` institutions in this
    process; return the run's ``summary.json``."""
    plan = plan_simulation(cfg, log=lambda _: None)
    run_in_process(plan)
    return json.loads((plan.out / "summary.json").read_text())
