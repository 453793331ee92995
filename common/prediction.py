"""``ferry predict``: an exported model (:mod:`common.exported_model`) on data in a format
Ferry reads, one CSV row per example: its position in the data, its label when the data has
one, the prediction, and the class probabilities (or the predicted value)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ferry.common.atomic_files import write_atomic
from ferry.common.data.datasets import DataSpec, load_dataset
from ferry.common.errors import FerryError
from ferry.common.exported_model import load_model, predict, read_manifest


def read_data(model_dir: str | Path, data: str | Path):
    """``data`` read as the model's run read its data (scenario loader, label column, the
    model's class list and input shape)."""
    manifest = read_manifest(model_dir)
    settings = manifest["data"]
    spec = DataSpec(
        scenario=settings.get("scenario", "hospital-imaging"),
        data=str(data),
        num_partitions=1,
        partition="iid",
        input_shape=tuple(manifest["input_shape"]),
        label_column=settings.get("label-column", ""),
        categorical=tuple(c for c in str(settings.get("categorical", "")).split(",") if c),
        task=manifest["task"],
        classes=tuple(manifest["classes"]),
        smiles_column=settings.get("smiles-column", ""),
        window=int(settings.get("window", 30)),
    )
    return load_dataset(spec)


def predict_file(model_dir: str | Path, data: str | Path, out: str | Path) -> int:
    """Write the predictions for ``data`` to the CSV ``out``; returns the number of rows."""
    out = Path(out)
    if out.exists():
        raise FerryError(f"{out} already exists: choose a new --out (nothing was overwritten)")
    model, preprocessing = load_model(model_dir)
    dataset = read_data(model_dir, data)
    values = predict(model, preprocessing, dataset.x)
    text = io.StringIO()
    writer = csv.writer(text)
    if model.task == "classification":
        writer.writerow(["example", "label", "prediction", *(f"p_{c}" for c in model.classes)])
        for i, (label, p) in enumerate(zip(dataset.y, values, strict=True)):
            name = model.classes[int(np.argmax(p))]
            writer.writerow([i, model.classes[int(label)], name, *(f"{v:.6g}" for v in p)])
    else:
        writer.writerow(["example", "target", "prediction"])
        for i, (target, v) in enumerate(zip(dataset.y, values, strict=True)):
            writer.writerow([i, f"{float(target):.6g}", f"{float(v):.6g}"])
    write_atomic(out, text.getvalue(), exclusive=True)
    return len(dataset)
