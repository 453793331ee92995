"""The Flower ClientApp: decode messages, call :mod:`client.runtime`, encode replies.

Message types:
  ``query.backbone_offer``  config{sha256} -> config{has}
  ``query.backbone_ship``   arrays{backbone}, config{sha256, manifest} -> config{stored}
  ``train``                 arrays{head}, config{run} -> arrays{head}, metrics, config{privacy}
                            (privacy: the report's values plus ``signed-report`` and
                            ``signature``, :mod:`common.privacy.report`)
  ``evaluate``              arrays{head}, config{run} -> metrics
A client-side refusal (bad input, unverifiable backbone) is a reply with config{refusal}.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import runtime
from common.errors import FerryError

app = ClientApp()


def _settings(msg: Message, context: Context) -> runtime.ClientSettings:
    run = msg.content["run"]
    if "partition-id" in context.node_config:  # a virtual institution in simulation
        torch.set_num_threads(1)
        return runtime.settings_for_simulation(context.node_config, dict(run))
    return runtime.settings_for_deployment(context.node_config)


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _refuse(msg: Message, exc: FerryError) -> Message:
    kind = getattr(exc, "kind", "error")
    return Message(
        RecordDict({"refusal": ConfigRecord({"reason": str(exc), "kind": kind})}), reply_to=msg
    )


@app.query("backbone_offer")
def backbone_offer(msg: Message, context: Context) -> Message:
    try:
        has = runtime.has_backbone(_settings(msg, context), str(msg.content["run"]["sha256"]))
    except FerryError as exc:
        return _refuse(msg, exc)
    return Message(RecordDict({"reply": ConfigRecord({"has": has})}), reply_to=msg)


@app.query("backbone_ship")
def backbone_ship(msg: Message, context: Context) -> Message:
    try:
        run = msg.content["run"]
        runtime.store_backbone(
            _settings(msg, context),
            json.loads(str(run["manifest"])),
            _arrays(msg.content["backbone"]),
            str(run["sha256"]),
        )
    except FerryError as exc:
        return _refuse(msg, exc)
    return Message(RecordDict({"reply": ConfigRecord({"stored": True})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        settings = _settings(msg, context)
        req = runtime.request_from_record(dict(msg.content["run"]))
        head, metrics, report = runtime.train_round(settings, req, _arrays(msg.content["head"]))
    except FerryError as exc:
        return _refuse(msg, exc)
    content = RecordDict(
        {
            "head": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in head.items()}),
            "metrics": MetricRecord(metrics),
            # The signed report (canonical JSON text + signature) travels verbatim; the
            # other values are its unsigned copy, for the server's own bookkeeping.
            "privacy": ConfigRecord(
                {k: v for k, v in report.items() if isinstance(v, str | int | float | bool)}
            ),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        settings = _settings(msg, context)
        req = runtime.request_from_record(dict(msg.content["run"]))
        metrics = runtime.evaluate_round(settings, req, _arrays(msg.content["head"]))
    except FerryError as exc:
        return _refuse(msg, exc)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
