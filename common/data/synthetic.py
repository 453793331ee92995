"""Built-in synthetic image tasks: procedurally drawn shapes in noise and clutter (1x32x32).

Two tasks share one generator, so a backbone pretrained on the first transfers to the second:

* **source** (``SOURCE_SHAPES``, 8 classes): the pretraining task of ``ferry pretrain``.
* **target** (``TARGET_SHAPES``, 4 classes, "lesion types"): shapes the backbone never saw
  labelled, drawn smaller, fainter and in more clutter. This is what the virtual hospitals
  hold; its classes are built from the strokes and curves the source shapes taught.

Everything is a pure function of (task, n, seed): clients regenerate identical data, and the
data fingerprint is the generator's parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 32
SOURCE_SHAPES = ("disk", "square", "hbar", "vbar", "diag", "plus", "triangle", "diamond")
TARGET_SHAPES = ("ring", "frame", "cross", "chevron")
TASKS = {"source": SOURCE_SHAPES, "target": TARGET_SHAPES}


def _mask(shape: str, u: np.ndarray, v: np.ndarray, r: float, w: float) -> np.ndarray:
    """Boolean mask of ``shape`` in the local frame (u, v), radius r, stroke width w."""
    au, av = np.abs(u), np.abs(v)
    rad = np.sqrt(u * u + v * v)
    if shape == "disk":
        return rad <= r
    if shape == "ring":
        return np.abs(rad - r) <= w / 2
    if shape == "square":
        return np.maximum(au, av) <= r * 0.8
    if shape == "frame":
        return np.abs(np.maximum(au, av) - r * 0.8) <= w / 2
    if shape == "hbar":
        return (au <= r) & (av <= w / 2)
    if shape == "vbar":
        return (av <= r) & (au <= w / 2)
    if shape == "diag":
        return (np.abs(u - v) <= w * 0.7) & (rad <= r)
    if shape == "plus":
        return ((au <= w / 2) | (av <= w / 2)) & (np.maximum(au, av) <= r)
    if shape == "cross":
        return ((np.abs(u - v) <= w * 0.7) | (np.abs(u + v) <= w * 0.7)) & (rad <= r)
    if shape == "triangle":
        return (v <= r * 0.6) & (v >= 2 * au - r)
    if shape == "diamond":
        return au + av <= r
    if shape == "chevron":
        return (np.abs(v - (au - r * 0.3)) <= w / 2) & (au <= r * 0.9)
    raise ValueError(f"unknown shape {shape!r}")


def make_images(task: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of ``task`` as (float32 array (n, 1, 32, 32) in [0, 1], int64 labels)."""
    shapes = TASKS[task]
    rng = np.random.default_rng([seed, 1 if task == "source" else 2])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    labels = rng.integers(0, len(shapes), size=n)
    images = np.empty((n, 1, SIZE, SIZE), dtype=np.float32)
    hard = task == "target"
    for i in range(n):
        r = rng.uniform(6, 10) if hard else rng.uniform(6, 12)
        w = rng.uniform(2.0, 3.0)
        cx, cy = rng.uniform(r, SIZE - r, size=2)
        a = rng.uniform(-0.35, 0.35)
        ca, sa = np.cos(a), np.sin(a)
        u = (xx - cx) * ca + (yy - cy) * sa
        v = -(xx - cx) * sa + (yy - cy) * ca
        img = rng.uniform(0.0, 0.25) + _mask(shapes[labels[i]], u, v, r, w) * (
            rng.uniform(0.35, 0.6) if hard else rng.uniform(0.5, 0.9)
        )
        for _ in range(rng.integers(1, 4) if hard else rng.integers(0, 2)):
            bx, by, br = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(1, 2.5)
            img = img + 0.4 * (((xx - bx) ** 2 + (yy - by) ** 2) <= br * br)
        img = img + rng.normal(0, 0.15 if hard else 0.1, size=img.shape)
        images[i, 0] = np.clip(img, 0.0, 1.0)
    return images, labels.astype(np.int64)


def class_names(task: str) -> list[str]:
    return list(TASKS[task])


def write_image_folder(folder: Path, task: str, n: int, seed: int) -> Path:
    """``make_images(task, n, seed)`` written as an image folder, one subfolder per class
    (``folder/<class>/<i>.png``, 8-bit grey): data as an institution would hold it."""
    from PIL import Image  # as common.data.image_folder: not loaded for `ferry --help`

    names = class_names(task)
    images, labels = make_images(task, n, seed)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / names[label]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).astype(np.uint8)).save(target / f"{i:03d}.png")
    return folder
