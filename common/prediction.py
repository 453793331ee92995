"""``ferry predict``: an exported model (:mod:`common.exported_model`) on data in a format
Ferry reads, one CSV row per example: the example (its file for images read from a flat
folder, else its position in the data), its label when the data has one, the prediction, and
the class probabilities (or the predicted value).

Data need no labels: a folder of images without class subfolders, a table without the
label column, or an arrays file without ``y`` is read as unlabelled examples (the label
column stays empty). Labelled data is read exactly as the run read it.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferry.common.atomic_files import write_atomic
from ferry.common.data.arrays import is_arrays_file
from ferry.common.data.datasets import DataSpec, load_dataset
from ferry.common.data.frames import read_frame
from ferry.common.data.image_folder import IMAGE_SUFFIXES, read_image
from ferry.common.data.tabular import from_frame
from ferry.common.errors import FerryError
from ferry.common.exported_model import load_model, predict, read_manifest


@dataclass
class Examples:
    """What ``ferry predict`` predicts for: inputs, one id each, and labels when known
    (class ids for classification, values for regression)."""

    x: np.ndarray
    ids: list[str]
    y: np.ndarray | None


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


def read_examples(model_dir: str | Path, data: str | Path) -> Examples:
    """``data``, labelled (read as the run read it: :func:`read_data`) or not (see the module
    docstring)."""
    manifest = read_manifest(model_dir)
    path = Path(data)
    shape = tuple(int(d) for d in manifest["input_shape"])
    if is_arrays_file(str(path)):
        return _arrays(path, manifest)
    if path.is_dir() and not any(d.is_dir() and not d.name.startswith(".") for d in path.iterdir()):
        return _flat_images(path, shape)
    label = manifest["data"].get("label-column", "")
    if path.is_file() and label:
        frame, origin = read_frame(path)
        if label not in [str(c).strip() for c in frame.columns]:
            return _unlabelled_table(frame, origin, manifest)
    dataset = read_data(model_dir, data)
    return Examples(dataset.x, [str(i) for i in range(len(dataset))], dataset.y)


def _arrays(path: Path, manifest: dict) -> Examples:
    try:
        with np.load(path, allow_pickle=False) as npz:
            x = np.asarray(npz["x"], dtype=np.float32)
            y = np.asarray(npz["y"]) if "y" in npz.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise FerryError(f"{path} is not an arrays file with x ({exc}): rewrite it") from None
    if y is not None and manifest["task"] == "classification":
        ids = {c: i for i, c in enumerate(manifest["classes"])}
        unknown = sorted({str(v) for v in y} - set(ids))
        if unknown:
            raise FerryError(
                f"{path} holds labels {', '.join(unknown[:5])} that are not the model's classes "
                f"({', '.join(manifest['classes'])}): predict without y, or fix them"
            )
        y = np.asarray([ids[str(v)] for v in y], dtype=np.int64)
    return Examples(x, [str(i) for i in range(len(x))], y)


def _flat_images(root: Path, shape: tuple[int, ...]) -> Examples:
    if len(shape) != 3:
        raise FerryError(f"{root} is a folder of images but this model takes {shape} examples")
    files = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise FerryError(
            f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): give a folder of "
            "images, or one subfolder per class"
        )
    x = np.stack([read_image(f, shape) for f in files])
    return Examples(x, [f.name for f in files], None)


def _unlabelled_table(frame, origin, manifest: dict) -> Examples:
    """A table without the label column, read with the run's columns: a placeholder label
    lets the run's own reader lay out the features, then it is dropped."""
    settings = manifest["data"]
    label = settings["label-column"]
    frame = frame.copy()
    frame[label] = manifest["classes"][0] if manifest["task"] == "classification" else "0"
    dataset = from_frame(
        frame,
        label,
        manifest["task"],
        [c for c in str(settings.get("categorical", "")).split(",") if c] or None,
        origin=origin,
        classes=tuple(manifest["classes"]),
    )
    return Examples(dataset.x, [str(i) for i in range(len(dataset))], None)


def predict_file(model_dir: str | Path, data: str | Path, out: str | Path) -> int:
    """Write the predictions for ``data`` to the CSV ``out``; returns the number of rows."""
    out = Path(out)
    if out.exists():
        raise FerryError(f"{out} already exists: choose a new --out (nothing was overwritten)")
    model, preprocessing = load_model(model_dir)
    examples = read_examples(model_dir, data)
    values = predict(model, preprocessing, examples.x)
    labels = [None] * len(examples.ids) if examples.y is None else list(examples.y)
    text = io.StringIO()
    writer = csv.writer(text)
    if model.task == "classification":
        writer.writerow(["example", "label", "prediction", *(f"p_{c}" for c in model.classes)])
        for i, label, p in zip(examples.ids, labels, values, strict=True):
            known = "" if label is None else model.classes[int(label)]
            name = model.classes[int(np.argmax(p))]
            writer.writerow([i, known, name, *(f"{v:.6g}" for v in p)])
    else:
        writer.writerow(["example", "target", "prediction"])
        for i, target, v in zip(examples.ids, labels, values, strict=True):
            known = "" if target is None else f"{float(target):.6g}"
            writer.writerow([i, known, f"{float(v):.6g}"])
    write_atomic(out, text.getvalue(), exclusive=True)
    return len(examples.ids)
