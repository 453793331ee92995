"""Ferry's Python API: ``ferry.simulate`` and ``ferry.load_model`` (``import ferry``).

``ferry.simulate(**settings)`` takes the settings ``ferry simulate`` takes, spelled as Python
names (``clients=3, rounds=2, epsilon=3.0, data="my-images/"``; every option of ``ferry
simulate --help``), runs the same simulation (same checks, same DP-SGD, ledger and summary)
and returns a :class:`Run`. Bad settings raise :class:`ferry.common.errors.FerryError` with
the one-line message the command prints, before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ferry.common.config import RunConfig
from ferry.common.exported_model import ExportedModel, Preprocessing, load_model
from ferry.server.model_export import export_model
from ferry.server.outputs import institution_privacy
from ferry.simulations.runner import simulate as run_simulation


@dataclass(frozen=True)
class Run:
    """A finished run: its directory and what it wrote there."""

    out: Path

    @property
    def summary(self) -> dict:
        """``summary.json``: final metrics, per-institution privacy, traffic, statement."""
        return json.loads((self.out / "summary.json").read_text())

    @property
    def rounds(self) -> list[dict]:
        """``metrics.jsonl``: one record per round (federated metrics, participants, ε)."""
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]

    @property
    def privacy(self) -> dict[str, dict]:
        """Per institution: ε spent, δ, rounds trained, budget ε (as its signed reports said)."""
        return institution_privacy(self.summary)

    @property
    def ledger(self) -> Path:
        return self.out / "ledger.jsonl"

    def export(self, folder: str | Path) -> Path:
        """The final model as a self-contained folder (what ``ferry export`` writes)."""
        return export_model(self.out, folder)

    def model(self) -> tuple[ExportedModel, Preprocessing]:
        """The final model, ready in eval mode, and its preprocessing (exported once, into
        ``out/exported``)."""
        folder = self.out / "exported"
        if not folder.exists():
            self.export(folder)
        return load_model(folder)


def simulate(*, log=print, **settings) -> Run:
    """Run a simulation with ``ferry simulate``'s settings; return the finished :class:`Run`.
    ``log`` receives the progress lines (``print`` by default)."""
    cfg = RunConfig.from_mapping(settings).validate()
    summary = run_simulation(cfg, log=log)
    return Run(Path(summary["run"]["out"]))
