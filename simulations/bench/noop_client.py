"""A no-op Flower ClientApp speaking Ferry's protocol: the bare-Flower baseline for (c).

It answers every message Ferry's server sends with a well-formed reply and does no work: it
claims to hold the backbone, echoes the head it receives, and reports one example. The
server loop, message counts and sizes are Ferry's; only the client's work is missing.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.metrics import classification_statistics, regression_statistics

app = ClientApp()


@app.query("backbone_offer")
def backbone_offer(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"reply": ConfigRecord({"has": True})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    report = {
        "institution": f"noop-{context.node_config.get('partition-id', 0)}",
        "non-private": True,
        "sampling": "none",
        "delta": 0.0,
    }
    content = RecordDict(
        {
            "head": msg.content["head"],
            "metrics": MetricRecord({"num-examples": 1}),
            "privacy": ConfigRecord(report),
        }
    )
    return Message(content, reply_to=msg)


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
