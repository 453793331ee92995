"""A user's backbone package, installed into a folder: code, metadata and entry point.

:func:`install` writes what ``pip install`` of a small package would leave in site-packages:
the module ``ferry_testnets`` (a decorated builder, ``ferry_testnets:tiny_cnn``) and its
``.dist-info`` declaring that builder in the ``ferry.backbones`` entry-point group. With the
folder on ``PYTHONPATH`` (or ``sys.path``) it is an installed, declared Ferry backbone.
``undeclared`` adds a module on the same path that no distribution declares and whose import
leaves a mark: what an operator might name to make an institution run code.
"""

from __future__ import annotations

from pathlib import Path

PATH = "ferry_testnets:tiny_cnn"
UNDECLARED = "ferry_testnets_side_effect:tiny_cnn"

MODULE = """
from torch import nn

import ferry


@ferry.backbone(
    feature_dim=32,
    input_shape=(1, 32, 32),
    preprocessing={"grayscale": True, "size": 32, "mean": 0.5, "std": 0.25},
    last_stage="3",
    description="a user's tiny CNN, installed as a package",
)
def tiny_cnn(input_shape=(1, 32, 32)):
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
"""

SIDE_EFFECT = """
import os
from pathlib import Path

Path(os.environ["FERRY_TEST_MARK"]).write_text("imported")
from ferry_testnets import tiny_cnn  # noqa: E402,F401
"""


def install(folder: Path) -> Path:
    """Write the package into ``folder`` (a site-packages of its own); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ferry_testnets.py").write_text(MODULE)
    (folder / "ferry_testnets_side_effect.py").write_text(SIDE_EFFECT)
    info = folder / "ferry_testnets-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ferry-testnets\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ferry.backbones]\ntiny-cnn = {PATH}\n")
    return folder
