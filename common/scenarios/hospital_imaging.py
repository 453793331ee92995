"""``hospital-imaging``: lesion or pathology image classification at hospitals."""

from __future__ import annotations

import json
from pathlib import Path

from ferry.common.data.dataset import Dataset
from ferry.common.data.image_folder import load_images
from ferry.common.data.synthetic import class_names, make_images
from ferry.common.scenarios.registry import Scenario, register_scenario


def synthetic(spec, split: str = "target") -> Dataset:
    task = "source" if split == "source" else "target"
    images, labels = make_images(task, spec.examples, spec.seed)
    source = json.dumps({"task": task, "n": spec.examples, "seed": spec.seed})
    return Dataset(
        images, labels, "classification", class_names(task), "synthetic:" + source, "image"
    )


TARGET_CLASSES = class_names("target")


def load(spec) -> Dataset:
    channels, size = spec.input_shape[0], spec.input_shape[-1]
    return load_images(
        Path(spec.data),
        channels,
        size,
        skip_unreadable=spec.skip_unreadable,
        classes=spec.classes,
    )


register_scenario(
    Scenario(
        name="hospital-imaging",
        description="lesion-type classification of scans. Built-in synthetic data: 4 lesion "
        "shapes in noise and clutter, non-IID across hospitals",
        institution="hospital",
        backbone="ferry-cnn",
        partition="dirichlet",
        expects="a folder with one subfolder per class holding PNG/JPEG or DICOM images "
        "(DICOM needs `pip install 'ferry-fl[dicom]'`)",
        example="ferry simulate --scenario hospital-imaging --data scans/",
        synthetic=synthetic,
        load=load,
        classes=tuple(TARGET_CLASSES),
    )
)
