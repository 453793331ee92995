"""The Flower ClientApp: decode messages, call :mod:`client.runtime`, encode replies.

Message types:
  ``query.backbone_offer``  config{sha256} -> config{has}
  ``query.backbone_ship``   arrays{backbone}, config{sha256, manifest} -> config{stored}
  ``train``                 :class:`~common.messages.TrainRequest` ->
                            :class:`~common.train_reply.TrainReply` (arrays{trainable},
                            metrics{num-examples}, config{privacy}: the signed report)
  ``evaluate``              :class:`~common.messages.TrainRequest` ->
                            :class:`~common.messages.EvaluationReply` (metrics)
A client-side refusal (bad input, unverifiable backbone) is a
:class:`~common.messages.Refusal` (config{refusal}). Train and evaluate messages are parsed
by their codec before anything runs; a message that does not parse is refused.

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
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ferry.client import institution_settings, runtime
from ferry.common.errors import FerryError
from ferry.common.imports import CodeFailed
from ferry.common.messages import EvaluationReply, Refusal, TrainRequest
from ferry.common.privacy.report import REPLY_BODY, REPLY_SIGNATURE
from ferry.common.train_reply import ModelUpdate, PrivacyReply, TrainReply

app = ClientApp()


def _settings(msg: Message, context: Context) -> institution_settings.ClientSettings:
    run = msg.content["run"]
    if "partition-id" in context.node_config:  # a virtual institution in simulation
        torch.set_num_threads(1)
        return institution_settings.settings_for_simulation(context.node_config, dict(run))
    return institution_settings.settings_for_deployment(context.node_config)


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
    if context is not None and _deployed(context):
        print(f"ferry: refused a {msg.metadata.message_type} message: {exc}", file=sys.stderr)
    return Message(Refusal.of(exc).to_content(), reply_to=msg)


def _backbone_refusal(msg: Message, exc: FerryError, context: Context) -> Message:
    """A refused backbone: in a deployed client its own log keeps the details, and the server
    learns them only when they name nothing of the institution's (a module that fails while
    importing may quote its paths and settings: the server gets one generic line)."""
    if _deployed(context) and isinstance(exc, CodeFailed):
        print(f"ferry: refused a backbone: {exc}", file=sys.stderr)
        exc = FerryError(
            "this institution could not load the backbone's code: details in its own log"
        )
    return _refuse(msg, exc, context)


@app.query("backbone_offer")
def backbone_offer(msg: Message, context: Context) -> Message:
    try:
        has = runtime.has_backbone(_settings(msg, context), str(msg.content["run"]["sha256"]))
    except FerryError as exc:
        return _backbone_refusal(msg, exc, context)
    except Exception as exc:
        return _failed(msg, context, exc)
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
        return _backbone_refusal(msg, exc, context)
    except Exception as exc:
        return _failed(msg, context, exc)
    return Message(RecordDict({"reply": ConfigRecord({"stored": True})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        request = TrainRequest.from_content(msg.content)
        settings = _settings(msg, context)
        trained, metrics, report = runtime.train_round(settings, request.request, request.arrays)
        signed = {k: report[k] for k in (REPLY_BODY, REPLY_SIGNATURE)}
        reply = TrainReply(ModelUpdate(trained, metrics["num-examples"]), PrivacyReply.of(signed))
    except FerryError as exc:
        return _refuse(msg, exc, context)
    except Exception as exc:
        return _failed(msg, context, exc)
    return Message(reply.to_content(), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        request = TrainRequest.from_content(msg.content)
        settings = _settings(msg, context)
        req = request.request
        metrics = runtime.evaluate_round(settings, req, request.arrays)
        reply = EvaluationReply.from_record(metrics, req.task, req.num_classes)
    except FerryError as exc:
        return _refuse(msg, exc, context)
    except Exception as exc:
        return _failed(msg, context, exc)
    return Message(reply.to_content(), reply_to=msg)
