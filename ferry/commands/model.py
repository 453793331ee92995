"""``ferry export`` and ``ferry predict``: a run's final model as a folder, and its use."""

from __future__ import annotations

import argparse

# As in the other commands: the handlers import torch only when they run.


def add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a finished run's final model as a self-contained folder"
    )
    p.add_argument("run", help="run directory (--out of `ferry simulate` or `ferry server`)")
    p.add_argument("--out", required=True, help="new folder for the model")
    p.add_argument(
        "--backbone-weights",
        metavar="DIR",
        help="the backbone the run used, if it is no longer where the run read it",
    )
    p.set_defaults(func=cmd_export)


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict with an exported model; one CSV row per example")
    p.add_argument("model", help="folder written by `ferry export`")
    p.add_argument(
        "--data", required=True, help="an image folder (one subfolder per class) or a table"
    )
    p.add_argument("--out", required=True, help="CSV file to write (must not exist)")
    p.set_defaults(func=cmd_predict)


def cmd_export(args: argparse.Namespace) -> int:
    from ferry.server.model_export import export_model

    out = export_model(args.run, args.out, args.backbone_weights)
    print(f"model written to {out}: load it with ferry.load_model({str(out)!r})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ferry.common.prediction import predict_file

    rows = predict_file(args.model, args.data, args.out)
    print(f"{rows} predictions written to {args.out}")
    return 0
