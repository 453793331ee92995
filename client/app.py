"""The Flower ClientApp: decode messages, call :mod:`client.runtime`, encode replies.

Message types:
  ``query.backbone_offer``  config{sha256} -> config{has}
  ``query.backbone_ship``   arrays{backbone}, config{sha256, manifest} -> config{stored}
  ``train``                 arrays{head}, config{run} -> arrays{head}, metrics, config{privacy}
                            (privacy: the report's values plus ``signed-report`` and
                            ``signature``, :mod:`common.privacy.report`)
  ``evaluate``              arrays{head}, config{run} -> metrics
A client-side refusal (bad input, unverifiable backbone) is a reply with config{refusal}.

In a deployed client every refusal is also written to the institution's own log (stderr, kept
by the SuperNode log). A refusal about its data reaches the server as one generic line (the
details may quote private cells: :func:`client.runtime._local_data`), and an unexpected error
in a deployed client reaches it as one generic line too, its traceback only in that log.
"""

from __future__ import annotations

import json
import sys
import traceback

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


def _deployed(context: Context) -> bool:
    return "partition-id" not in context.node_config


def _failed(msg: Message, context: Context, exc: Exception) -> Message:
    """An unexpected error: in simulation it propagates (the researcher's traceback); in a
    deployed client its text may quote private data, so only this institution's log sees it."""
    if not _deployed(context):
        raise exc
    traceback.print_exception(exc, file=sys.stderr)
    return _refuse(
        msg,
        FerryError("this institution's client failed on the round: details in its own log"),
        context,
    )


def _refuse(msg: Message, exc: FerryError, context: Context | None = None) -> Message:
    kind = getattr(exc, "kind", "error")
    if context is not None and _deployed(context):
        print(f"ferry: refused a {msg.metadata.message_type} message: {exc}", file=sys.stderr)
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
        return _refuse(msg, exc, context)
    except Exception as exc:
        return _failed(msg, context, exc)
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
        return _refuse(msg, exc, context)
    except Exception as exc:
        return _failed(msg, context, exc)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
