"""A no-op Flower ClientApp speaking Ferry's protocol: the bare-Flower baseline for (c).

It answers every message Ferry's server sends with a well-formed reply and does no work: it
claims to hold the backbone, echoes the head it receives, and reports one example in a signed
non-private report (the server parses it with the same codec as any institution's). The
server loop, message counts and sizes are Ferry's; only the client's work is missing.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ferry.client.receipts import sign_and_keep
from ferry.client.runtime import ACCOUNTANT
from ferry.common.evaluation_statistics import classification_statistics, regression_statistics
from ferry.common.messages import RoundRequest
from ferry.common.privacy import UNIT_OF_PRIVACY
from ferry.common.privacy.report import NON_PRIVATE_EVENT
from ferry.common.train_reply import ModelUpdate, PrivacyReply, TrainReply
from ferry.common.training_defaults import batch_size_for

app = ClientApp()


@app.query("backbone_offer")
def backbone_offer(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"reply": ConfigRecord({"has": True})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Echo the head, claim one example, and sign a non-private report (the bench's run is
    non-private), built and parsed with the same types as Ferry's client."""
    req = RoundRequest.from_record(dict(msg.content["run"]))
    name = f"noop-{context.node_config.get('partition-id', 0)}"
    report = {
        "run-id": req.run_id,
        "round": req.round,
        "institution": name,
        "unit": UNIT_OF_PRIVACY,
        "examples": 1,
        "batch-size": batch_size_for(req.run, 1, 1),  # one example: a batch of 1
        "local-epochs": req.run.local_epochs,
        "delta": req.run.delta,
        "max-grad-norm": req.run.max_grad_norm,
        "non-private": True,
        "accountant": ACCOUNTANT,
        "accountant-library": "none",
        "sampling": "poisson",
        "noise-multiplier": 0.0,
        "sample-rate": 1.0,
        "steps": 0,
        "epsilon": math.inf,
        "dp-event": NON_PRIVATE_EVENT,
        "rounds": 0,
    }
    state = Path(tempfile.gettempdir()) / "ferry-noop-clients" / req.run_id / name
    signed = sign_and_keep(state, name, report)
    head = {k: v.numpy() for k, v in msg.content["trainable"].items()}
    reply = TrainReply(ModelUpdate(head, 1), PrivacyReply.of(signed))
    return Message(reply.to_content(), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    run = msg.content["run"]
    if run.get("task") == "regression":
        stats = regression_statistics(np.zeros(1), np.zeros(1), directional=False)
    else:
        k = int(run["num-classes"])
        stats = classification_statistics(np.zeros(1), np.zeros((1, k)), k)
    metrics = MetricRecord(stats.to_record())  # one held-out example, predicted right
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
