"""A no-op Flower ClientApp speaking Ferry's protocol: the bare-Flower baseline for (c).

It answers every message Ferry's server sends with a well-formed reply and does no work: it
claims to hold the backbone, echoes the head it receives, and reports one example. The
server loop, message counts and sizes are Ferry's; only the client's work is missing.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

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
            "metrics": MetricRecord({"num-examples": 1, "train-loss": 0.0, "train-accuracy": 0.0}),
            "privacy": ConfigRecord(report),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    metrics = MetricRecord({"num-examples": 1, "loss": 0.0, "accuracy": 0.0})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
