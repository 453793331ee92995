"""Image folders: one subfolder per class, PNG/JPEG/BMP/TIFF or DICOM files inside.

``root/<class name>/**/<image>``. With the run's public class list (``classes``, what every
deployed institution gets) an image's class id is the position of its folder's name in that
list, so one institution's ids never depend on which classes it happens to hold; a folder
with images whose name is not in the list is an error naming it. Without a list (only the
researcher's side of a simulation) class ids follow the sorted class folder names. Files are
found at any depth below a class folder (e.g. one subfolder per patient), hidden files and
folders are ignored. DICOM files are recognised by a ``.dcm`` suffix or by their ``DICM``
marker (many have no suffix) and read by :mod:`common.data.dicom`. Every image becomes
float32 in [0, 1] with ``channels`` channels (gray repeated, or colour reduced by
luminance), resized to ``size`` (aspect ratio not kept). 16-bit PNG/TIFF are scaled by their
bit depth. An empty class folder stays a class (the class list is the federation's label
space) and is reported through ``log``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ferry.common.data.dataset import Dataset, class_key, public_class_ids, unknown_label
from ferry.common.data.dicom import UnreadableImage, is_dicom, read_dicom
from ferry.common.data.frames import warn
from ferry.common.data.partition import raw_digest
from ferry.common.errors import FerryError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def _read_picture(path: Path) -> np.ndarray:
    """(h, w) or (h, w, 3) float32 in [0, 1] from a PNG/JPEG/... file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I;16"):
                return np.asarray(img, dtype=np.float32) / 65535.0
            if img.mode in ("I", "F"):
                arr = np.asarray(img, dtype=np.float32)
                if img.mode == "I" and arr.min() >= 0 and arr.max() <= 65535:
                    return arr / (255.0 if arr.max() <= 255 else 65535.0)
                lo, hi = float(arr.min()), float(arr.max())
                return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
            if img.mode in ("L", "1", "LA"):
                return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImage(
            f"unreadable image {path} ({type(exc).__name__}): remove or replace it"
        ) from None


def _to_example(arr: np.ndarray, channels: int, height: int, width: int) -> np.ndarray:
    """(channels, height, width) from an (h, w) or (h, w, 3) array in [0, 1]."""
    from PIL import Image

    if arr.ndim == 3 and channels == 1:
        arr = arr[..., :3] @ _LUMA
    planes = [arr] if arr.ndim == 2 else [arr[..., k] for k in range(3)]
    resized = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(p, dtype=np.float32)).resize(
                (width, height), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )
        for p in planes
    ]
    if len(resized) == 1 and channels == 3:
        resized = resized * 3
    return np.clip(np.stack(resized), 0.0, 1.0)


def read_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """One image file as one example of ``shape`` (channels, height, width), as the folder
    loader reads it."""
    return _to_example(_read_picture(path), *shape)


def _visible_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def load_images(
    root: Path | str,
    channels: int,
    size: int | tuple[int, int],
    skip_unreadable: bool = False,
    log: Callable[[str], None] = warn,
    classes: Sequence[str] = (),
) -> Dataset:
    """An image folder as an image :class:`Dataset`: x (n, channels, h, w) float32 in [0, 1].

    ``size``: the side of the square output, or (height, width). An unreadable image is a
    FerryError naming it; with ``skip_unreadable`` it is skipped and the count (with the
    first few names) goes to ``log``. ``classes``: the run's public class list (see the
    module docstring); an institution may then hold images of a single class.
    """
    root = Path(root)
    if channels not in (1, 3):
        raise FerryError(f"images need 1 or 3 channels, not {channels}: fix the input shape")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not root.is_dir():
        raise FerryError(
            f"data path {root} is not a directory: give a folder with one subfolder per class"
        )
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    public = list(classes)
    ids = public_class_ids(public)
    classes = public or folders
    expected = (
        f"expected {root}/<class name>/<image> ({', '.join(sorted(IMAGE_SUFFIXES))} or DICOM)"
    )
    if not folders:
        raise FerryError(f"{root} holds no class subfolders: {expected}")
    digest = hashlib.sha256(f"channels={channels}|size={height}x{width}|{public};".encode())
    images, labels, raw, skipped, empty = [], [], [], [], []
    for position, name in enumerate(folders):
        label = ids.get(class_key(name), -1) if public else position
        found = 0
        for path in _visible_files(root / name):
            dicom = path.suffix.lower() not in IMAGE_SUFFIXES and is_dicom(path)
            if path.suffix.lower() not in IMAGE_SUFFIXES and not dicom:
                continue
            if label < 0:
                raise unknown_label(name, f"{root}/{name}", public)
            st = path.stat()
            digest.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
            try:
                arr = read_dicom(path) if dicom else _read_picture(path)
            except UnreadableImage as exc:
                if not skip_unreadable:
                    raise UnreadableImage(f"{exc}, or pass --skip-unreadable") from None
                skipped.append(path)
                continue
            images.append(_to_example(arr, channels, height, width))
            labels.append(label)
            raw.append(raw_digest([path.read_bytes()]))  # the file as stored: the split's key
            found += 1
        if not found:
            empty.append(name)
    if skipped:
        names = ", ".join(str(p.relative_to(root)) for p in skipped[:5])
        log(
            f"{root}: skipped {len(skipped)} unreadable image(s) of {len(skipped) + len(images)}"
            f" ({names}{' ...' if len(skipped) > 5 else ''})"
        )
    if not images:
        raise FerryError(f"no usable images in {root}: {expected}")
    if not public and len(set(labels)) < 2:
        raise FerryError(
            f"{root} holds images of a single class ({classes[labels[0]]}): "
            "give at least two class subfolders with images"
        )
    if empty:
        kept = "they stay classes" if not public else "the run's classes are unchanged"
        log(f"{root}: class folder(s) {', '.join(empty)} hold no images; {kept}")
    return Dataset(
        x=np.stack(images).astype(np.float32),
        y=np.asarray(labels, dtype=np.int64),
        task="classification",
        classes=classes,
        fingerprint="images:" + digest.hexdigest(),
        modality="image",
        record_keys=np.asarray(raw, dtype=np.uint64),
    )


def load_image_folder(
    root: Path, input_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images (n, c, h, w) in [0, 1], labels, class names) from ``root/<class>/<image>``."""
    channels, height, width = input_shape
    data = load_images(root, channels, (height, width))
    return data.x, data.y, data.classes
