"""Molecules (CSV or Parquet: a SMILES column and an activity column) as fingerprints.

Contract (stateless: each molecule's bits depend on its SMILES alone):

* ``featurizer="morgan"``: Morgan (ECFP-like) bit fingerprints of ``radius`` and ``bits``
  from RDKit's ``rdFingerprintGenerator``; RDKit decides which SMILES are valid.
* ``featurizer="ngram"``, the fallback without RDKit: bit ``sha1("ngram:" + g) mod bits`` is
  set for every character n-gram ``g`` of the SMILES of length 1 to ``radius + 2``. It sees
  substrings, not chemistry, and validates syntax only (characters, balanced brackets and
  parentheses, paired ring-closure digits).
* ``featurizer="auto"``: Morgan when RDKit imports, else the fallback. The two are not
  interchangeable: the dataset's fingerprint names the one used (so feature caches never mix
  them), and every institution of one federation must use the same one.
* ``x`` is (n, bits) float32 in {0, 1}. The activity is a class (``active``/``inactive``,
  0/1) or a number (e.g. pIC50), parsed like a table's label (:func:`parse_target`).

Invalid SMILES are an error naming the row, or, with ``skip_invalid``, are skipped and their
count reported through ``log``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ferry.common.data.dataset import Dataset
from ferry.common.data.frames import (
    Origin,
    columns_named,
    enough_rows,
    frame_origin,
    non_blank_rows,
    read_frame,
    warn,
)
from ferry.common.data.labels import parse_target
from ferry.common.data.partition import row_digests
from ferry.common.errors import FerryError

FEATURIZERS = ("auto", "morgan", "ngram")
_SMILES_CHARS = re.compile(r"^[A-Za-z0-9@+\-\[\]()=#$/\\%.:*~]+$")


def rdkit_available() -> bool:
    try:
        from rdkit.Chem import rdFingerprintGenerator  # noqa: F401
    except ImportError:
        return False
    return True


def _featurizer(name: str) -> str:
    if name not in FEATURIZERS:
        raise FerryError(f"featurizer {name!r} is unknown: use one of {', '.join(FEATURIZERS)}")
    if name == "auto":
        return "morgan" if rdkit_available() else "ngram"
    if name == "morgan" and not rdkit_available():
        raise FerryError("Morgan fingerprints need RDKit: pip install 'ferry-fl[chem]'")
    return name


def smiles_syntax_ok(smiles: str) -> bool:
    """The fallback's check: allowed characters, balanced () and [], paired ring digits."""
    if not smiles or not _SMILES_CHARS.match(smiles):
        return False
    depth, in_atom, rings = 0, False, {}
    i = 0
    while i < len(smiles):
        ch = smiles[i]
        if in_atom:
            in_atom = ch != "]"
        elif ch == "[":
            in_atom = True
        elif ch == "]":
            return False
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return False
        elif ch == "%":
            label, i = smiles[i + 1 : i + 3], i + 2
            if not (len(label) == 2 and label.isdigit()):
                return False
            rings[label] = rings.get(label, 0) + 1
        elif ch.isdigit():
            rings[ch] = rings.get(ch, 0) + 1
        i += 1
    return depth == 0 and not in_atom and all(c % 2 == 0 for c in rings.values())


def _morgan(smiles: list[str], bits: int, radius: int) -> tuple[np.ndarray, np.ndarray, str]:
    import rdkit
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)
    x = np.zeros((len(smiles), bits), dtype=np.float32)
    ok = np.zeros(len(smiles), dtype=bool)
    RDLogger.DisableLog("rdApp.*")  # RDKit would print one stderr line per invalid SMILES
    try:
        for i, text in enumerate(smiles):
            mol = Chem.MolFromSmiles(text) if text else None
            if mol is not None and mol.GetNumAtoms() > 0:
                x[i] = generator.GetFingerprintAsNumPy(mol)
                ok[i] = True
    finally:
        RDLogger.EnableLog("rdApp.*")
    return x, ok, f"morgan(rdkit {rdkit.__version__}, radius {radius}, {bits} bits)"


def _ngrams(smiles: list[str], bits: int, radius: int) -> tuple[np.ndarray, np.ndarray, str]:
    longest = radius + 2
    x = np.zeros((len(smiles), bits), dtype=np.float32)
    ok = np.zeros(len(smiles), dtype=bool)
    bit_of: dict[str, int] = {}
    for i, text in enumerate(smiles):
        if not smiles_syntax_ok(text):
            continue
        ok[i] = True
        for n in range(1, longest + 1):
            for j in range(len(text) - n + 1):
                gram = text[j : j + n]
                if gram not in bit_of:
                    digest = hashlib.sha1(f"ngram:{gram}".encode()).digest()
                    bit_of[gram] = int.from_bytes(digest[:8], "big") % bits
                x[i, bit_of[gram]] = 1.0
    return x, ok, f"smiles-ngram(lengths 1-{longest}, {bits} bits)"


def from_frame(
    frame,
    smiles_column: str = "smiles",
    activity_column: str = "activity",
    task: str = "auto",
    bits: int = 2048,
    radius: int = 2,
    skip_invalid: bool = False,
    featurizer: str = "auto",
    origin: Origin | None = None,
    log: Callable[[str], None] = warn,
    min_rows: int = 1,
    classes: Sequence[str] = (),
) -> Dataset:
    """A table of molecules already in memory (a pandas DataFrame) as a :class:`Dataset`.

    ``classes``: the run's public class list; each row's activity is mapped by it alone
    (:func:`common.data.labels.parse_target`)."""
    if bits < 8 or radius < 0:
        raise FerryError(f"bits {bits} / radius {radius}: use bits >= 8 and radius >= 0")
    featurizer = _featurizer(featurizer)
    frame = frame.copy()
    frame.columns = [str(c).strip() for c in frame.columns]
    origin = origin or frame_origin(frame, "the molecule table")
    columns_named(frame, [smiles_column], origin, "SMILES", "--smiles-column")
    columns_named(frame, [activity_column], origin, "activity", "--label-column")
    frame, rows = non_blank_rows(frame)
    enough_rows(len(frame), min_rows, origin)
    raw = row_digests(frame)  # the rows as read: what the held-out split hashes

    text = frame[smiles_column].astype("string").str.strip().fillna("").tolist()
    encode = _morgan if featurizer == "morgan" else _ngrams
    x, ok, method = encode(text, bits, radius)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        checker = "RDKit cannot parse it" if featurizer == "morgan" else "its syntax is broken"
        if not skip_invalid:
            i = int(bad[0])
            raise FerryError(
                f"{origin.name}, {origin.row(int(rows[i]))}, column '{smiles_column}': "
                f"{text[i]!r} is not a valid SMILES ({checker}): fix or remove the row, or "
                "pass --skip-unreadable to skip invalid molecules"
            )
        shown = ", ".join(origin.row(int(rows[i]), explain=False) for i in bad[:5])
        log(
            f"{origin.name}: skipped {len(bad)} of {len(text)} molecules with invalid SMILES "
            f"({shown}{' ...' if len(bad) > 5 else ''})"
        )
        keep = np.flatnonzero(ok)
        if not len(keep):
            raise FerryError(f"{origin.name}: no row holds a valid SMILES: check --smiles-column")
        x, frame, rows, raw = (
            x[keep],
            frame.iloc[keep].reset_index(drop=True),
            rows[keep],
            raw[keep],
        )
        enough_rows(len(frame), min_rows, origin)
    public = list(classes)
    y, classes, task = parse_target(
        frame[activity_column], activity_column, task, origin, rows, public
    )
    key = (
        f"{origin.fingerprint}|smiles={smiles_column}|activity={activity_column}|task={task}"
        f"|skip={skip_invalid}|{method}|classes={public}"
    )
    return Dataset(
        x=x,
        y=y,
        task=task,
        classes=classes,
        fingerprint=f"molecules:{method}:" + hashlib.sha256(key.encode()).hexdigest(),
        modality="molecule",
        record_keys=raw,
    )


def load_molecules(
    path: Path | str,
    smiles_column: str = "smiles",
    activity_column: str = "activity",
    task: str = "auto",
    bits: int = 2048,
    radius: int = 2,
    skip_invalid: bool = False,
    featurizer: str = "auto",
    log: Callable[[str], None] = warn,
    min_rows: int = 1,
    classes: Sequence[str] = (),
) -> Dataset:
    """A CSV or Parquet table of molecules as a :class:`Dataset` (see the module docstring)."""
    frame, origin = read_frame(path)
    return from_frame(
        frame,
        smiles_column,
        activity_column,
        task,
        bits,
        radius,
        skip_invalid,
        featurizer,
        origin,
        log,
        min_rows,
        classes,
    )
