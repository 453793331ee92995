"""An institution's own settings: who it is, where its privacy state and caches live, its data,
its budget and its held-out split. In simulation they come from the node config and the
simulation's settings; in a deployment only from its SuperNode's ``--node-config`` (set by
``ferry client``): nothing here comes from the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ferry.client.budget_guard import Budget
from ferry.client.held_out import HeldOutSplit, pin_split
from ferry.common.errors import FerryError
from ferry.common.message_fields import institution_names


@dataclass(frozen=True)
class ClientSettings:
    """Institution-side settings: who it is, where its state and caches live, its data."""

    institution: str
    state_dir: Path
    cache_dir: Path
    partition_id: int
    num_partitions: int
    budget: Budget | None = None  # None: no budget (only allowed for non-private runs)
    data_path: str = ""  # a deployed institution's own data (all of it is this client's)
    report_key: Path | None = None  # signs privacy reports; None: a key in state_dir
    # A deployed institution's own held-out split (client.held_out); None: the run's settings
    # decide it (simulation, where the researcher owns the data).
    held_out: HeldOutSplit | None = None


def simulated_institution(scenario: str, partition: int, names: tuple[str, ...] = ()) -> str:
    """A virtual institution's name: the data's (a natural split's group) when the run
    names them, else the scenario's kind of institution and the partition number."""
    if partition < len(names):
        return names[partition]
    return f"{scenario.split('-')[0]}-{partition:03d}"


def settings_for_simulation(node_config: dict, run: dict) -> ClientSettings:
    """A virtual institution's settings: partition from the node config, its state and cache
    under the simulation's roots, its budget from the simulation's per-institution setting."""
    pid = int(node_config["partition-id"])
    names = institution_names(run.get("institution-names", ""))
    institution = simulated_institution(str(run["scenario"]), pid, names)
    budget = None
    if "budget-epsilon" in run or not run.get("non-private", False):
        budget = Budget(
            float(run.get("budget-epsilon", run.get("target-epsilon", run.get("epsilon")))),
            float(run.get("budget-delta", run["delta"])),
        )
    return ClientSettings(
        institution,
        Path(str(run["state-root"])) / institution,
        Path(str(run["cache-root"])) / institution,
        pid,
        int(node_config["num-partitions"]),
        budget,
    )


def settings_for_deployment(node_config: dict) -> ClientSettings:
    """A deployed institution's settings, from its SuperNode's ``--node-config`` (set by
    ``ferry client``): nothing here comes from the server."""
    missing = [
        k
        for k in ("institution", "data-path", "state-dir", "budget-epsilon", "budget-delta")
        if k not in node_config
    ]
    if missing:
        raise FerryError(
            f"this SuperNode's node config lacks {', '.join(missing)}: start it with "
            "`ferry client` (which sets them)"
        )
    state_dir = Path(str(node_config["state-dir"]))
    return ClientSettings(
        institution=str(node_config["institution"]),
        state_dir=state_dir,
        cache_dir=Path(str(node_config.get("cache-dir") or state_dir / "cache")),
        partition_id=0,
        num_partitions=1,
        budget=Budget(float(node_config["budget-epsilon"]), float(node_config["budget-delta"])),
        data_path=str(node_config["data-path"]),
        report_key=(
            Path(str(node_config["report-key"])) if node_config.get("report-key") else None
        ),
        # The institution's own held-out split, pinned in its state directory: the server's
        # test-fraction and seed never decide which of its records are held out.
        held_out=pin_split(
            state_dir,
            float(node_config["test-fraction"]) if "test-fraction" in node_config else None,
        ),
    )
