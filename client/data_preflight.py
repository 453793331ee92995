"""An institution's data checked before ``ferry client`` starts its SuperNode
(:mod:`client.supernode`): a readable image folder with at least two classes (one image per
class opened; pictures or DICOM files, as :mod:`common.data.image_folder` reads them), or a
readable CSV/Parquet table with at least two records (a CSV: UTF-8 text with a header of two
columns or more). Each problem is one line naming ``--data`` and the fix; the columns are
checked against the run's settings when the first round reads the data.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ferry.common.data.image_folder import IMAGE_SUFFIXES
from ferry.common.errors import FerryError

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def _check_csv_text(path: Path, head: bytes) -> None:
    """The start of a CSV file is UTF-8 text with a header of two columns or more (a label
    and something to learn from); a binary file is refused here, not in the first round."""
    if b"\0" in head:
        raise FerryError(f"--data {path} is a binary file, not a CSV table: give a text CSV")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut by the chunk's end
            raise FerryError(
                f"--data {path} is not UTF-8 text (byte {exc.start}): give a CSV table "
                "saved as UTF-8"
            ) from None
        text = head[: exc.start].decode("utf-8")
    header = next((line for line in text.splitlines() if line.strip()), "")
    columns = next(csv.reader([header]), [])
    if len(columns) < 2:
        raise FerryError(
            f"--data {path} has {len(columns)} column(s) in its header: a table needs a label "
            "column and at least one more"
        )


def check_table(path: Path) -> int:
    """Row count of a CSV or Parquet file (tables, price series, molecules); its columns are
    checked against the run's settings when the first round reads it. A CSV must be text
    with a header of two columns or more."""
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise FerryError(
            f"--data {path} is neither a folder of images nor a table "
            f"({', '.join(TABLE_SUFFIXES)}): give one of those"
        )
    if not os.access(path, os.R_OK):
        raise FerryError(f"--data {path} is not readable by this user")
    try:
        if path.suffix.lower() == ".csv":
            with open(path, "rb") as f:
                _check_csv_text(path, f.read(65536))
                f.seek(0)
                rows = max(0, sum(1 for line in f if line.strip()) - 1)
        else:
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(path).metadata.num_rows
    except FerryError:
        raise
    except Exception as exc:  # any reader failure is the same user problem
        raise FerryError(f"--data {path} cannot be read ({type(exc).__name__}): {exc}") from None
    if rows < 2:
        raise FerryError(f"--data {path} holds {rows} record(s): give at least 2")
    return rows


def check_data(path: Path) -> tuple[list[str], int]:
    """(class names, image count) of an image folder (pictures or DICOM files, as
    :mod:`common.data.image_folder` reads them), opening one image per class; for a table
    file, ([], row count)."""
    from PIL import Image, UnidentifiedImageError

    from ferry.common.data.dicom import is_dicom, read_dicom

    if path.is_file():
        return [], check_table(path)
    if not path.is_dir():
        raise FerryError(
            f"--data {path} is not a directory: give a folder with one subfolder per class"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise FerryError(f"--data {path} is not readable by this user")
    classes, count = [], 0
    try:
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            images = [
                f
                for f in sorted(sub.iterdir())
                if f.is_file() and (f.suffix.lower() in IMAGE_SUFFIXES or is_dicom(f))
            ]
            if not images:
                continue
            try:
                if images[0].suffix.lower() in IMAGE_SUFFIXES:
                    with Image.open(images[0]) as img:
                        img.verify()
                else:
                    read_dicom(images[0])  # a FerryError names the file (or how to install)
            except (UnidentifiedImageError, OSError) as exc:
                raise FerryError(
                    f"--data: unreadable image {images[0]} ({type(exc).__name__}): "
                    "remove or replace it"
                ) from None
            classes.append(sub.name)
            count += len(images)
    except PermissionError as exc:
        raise FerryError(f"--data: {exc.filename} is not readable by this user") from None
    if len(classes) < 2:
        raise FerryError(
            f"--data {path} has no usable examples in two or more classes: expected "
            f"{path}/<class name>/<image>.png (suffixes {', '.join(sorted(IMAGE_SUFFIXES))}, "
            "or DICOM files)"
        )
    return classes, count
