"""Image folders: one subfolder per class, PNG/JPEG/BMP files inside."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import FerryError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


def load_image_folder(
    root: Path, input_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images (n, c, h, w) in [0, 1], labels, class names) from ``root/<class>/<image>``."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise FerryError(
            f"data path {root} is not a directory: give a folder with one subfolder per class"
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    channels, height, width = input_shape
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    img = img.convert("L" if channels == 1 else "RGB").resize((width, height))
                    arr = np.asarray(img, dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as exc:
                raise FerryError(
                    f"unreadable image {path} ({type(exc).__name__}): remove or replace it"
                ) from None
            images.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise FerryError(
            f"no usable examples in {root}: expected {root}/<class name>/<image>.png "
            f"(suffixes {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    if len(set(labels)) < 2:
        raise FerryError(
            f"{root} holds a single class ({classes[labels[0]]}): "
            "give at least two class subfolders"
        )
    return np.stack(images).astype(np.float32), np.asarray(labels, dtype=np.int64), classes
