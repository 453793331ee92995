"""Writing benchmark results: one ``## `` section per benchmark in ``BENCHMARKS.md``."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from ferry.common.atomic_files import write_atomic


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - a broken CUDA install still lets the CPU bench run
        gpu = "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gib:.0f} GiB RAM, {gpu}"


def replace_section(path: Path, heading: str, body: str) -> None:
    """Replace ``heading``'s section of the markdown file at ``path`` (or append it)."""
    text = path.read_text() if path.exists() else "# Ferry benchmarks\n"
    section = f"{heading}\n\n{body.strip()}\n"
    start = text.find(heading + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    write_atomic(path, text)


def record_section(
    target: str | None, quick: bool, heading: str, table: str, load_before: float
) -> None:
    """Write ``table`` under ``heading`` in ``target`` (None: BENCHMARKS.md for a full run,
    nothing for ``--quick``; "": nothing), with the machine and the load around the run."""
    import time

    if target is None:
        target = "" if quick else str(Path(__file__).resolve().parents[2] / "BENCHMARKS.md")
    if not target:
        return
    where = (
        f"Machine: {machine()}. Measured {time.strftime('%Y-%m-%d')}; 1-min load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (cores shared with "
        "other jobs)."
    )
    replace_section(Path(target), heading, where + "\n\n" + table)
    print(f"written to {target}")


def write_json(path: Path, key: str, results: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = results
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True))
