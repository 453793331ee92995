"""One DICOM image file as a float array in [0, 1] (needs pydicom: ``ferry-fl[dicom]``).

Grayscale pipeline, as a DICOM viewer shows the image:

1. the Modality LUT: ``RescaleSlope`` / ``RescaleIntercept`` (e.g. CT values to Hounsfield
   units), or a Modality LUT Sequence;
2. the VOI window, when ``WindowCenter`` / ``WindowWidth`` are present (the first window if
   several; DICOM's LINEAR function), mapping the window to [0, 1] and clipping outside it;
   else a VOI LUT Sequence if present; else the image's own minimum and maximum (this image
   only: no statistic of the data set);
3. ``MONOCHROME1`` (high values dark) is inverted, so bright always means high signal.

Colour images (3 samples per pixel) are scaled by their bit depth. A multi-frame file gives
its middle frame. Nothing here is shared beyond the pixels the caller returns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ferry.common.errors import FerryError

DICOM_SUFFIXES = {".dcm", ".dicom"}
INSTALL = "pip install 'ferry-fl[dicom]'"


class UnreadableImage(FerryError):
    """One image file that cannot be read (a caller may skip it); the message names it."""


def is_dicom(path: Path) -> bool:
    """A ``.dcm`` / ``.dicom`` suffix, or the ``DICM`` marker after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise FerryError(f"reading DICOM images needs pydicom: {INSTALL}") from None
    return pydicom


def _linear_window(arr: np.ndarray, ds) -> np.ndarray:
    center = ds["WindowCenter"].value
    width = ds["WindowWidth"].value
    center = float(center[0] if ds["WindowCenter"].VM > 1 else center)
    width = max(float(width[0] if ds["WindowWidth"].VM > 1 else width), 1.0)
    if str(getattr(ds, "VOILUTFunction", "LINEAR")).upper() == "LINEAR_EXACT":
        return np.clip((arr - (center - width / 2)) / width, 0.0, 1.0)
    # DICOM PS3.3 C.11.2.1.2.1 (LINEAR)
    return np.clip((arr - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)


def _min_max(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def read_dicom(path: Path) -> np.ndarray:
    """(h, w) grayscale or (h, w, 3) colour float32 in [0, 1]; :class:`UnreadableImage` when
    the file is no DICOM image, FerryError when pydicom is missing."""
    pydicom = _pydicom()
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise UnreadableImage(
            f"unreadable DICOM file {path} ({type(exc).__name__}): remove or replace it"
        ) from None
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise UnreadableImage(
            f"DICOM file {path} holds no image (no Pixel Data; e.g. a report or DICOMDIR): "
            "move it out of the class folder"
        )
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise UnreadableImage(
            f"cannot decode the pixels of DICOM file {path} ({name}; {type(exc).__name__}): "
            "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or convert it to "
            "uncompressed DICOM or PNG"
        ) from None
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[frames // 2]
    if samples == 3:
        depth = int(getattr(ds, "BitsStored", 8))
        return np.clip(arr.astype(np.float32) / float(2**depth - 1), 0.0, 1.0)
    if arr.ndim != 2:
        raise UnreadableImage(
            f"DICOM file {path} has pixels of shape {arr.shape}, not one 2-D image: "
            "export single images"
        )
    try:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            image = _linear_window(values, ds)
        elif "VOILUTSequence" in ds:
            image = _min_max(np.asarray(apply_voi_lut(values, ds), dtype=np.float64))
        else:
            image = _min_max(values)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise UnreadableImage(
            f"DICOM file {path} has an unusable rescale or window ({exc}): fix its header"
        ) from None
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        image = 1.0 - image
    return image.astype(np.float32)
