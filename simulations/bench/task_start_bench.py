"""How long an institution's ClientApp task takes to start: forked from the task launcher's
warm fork server vs a fresh Python process that imports the same modules (the launcher's way
before), same machine, same run.

Each task here does nothing once started (it only reports that it runs), so the figures are
the start cost alone, the cost every message of every round paid at every institution: wall
time from "task acquired" to "task running", and the CPU time of the task's process.

Run: ``python -m ferry.simulations.bench.task_start_bench [--tasks N] [--markdown FILE]``; a run
without ``--markdown`` writes its table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

from ferry.client import task_launcher
from ferry.simulations.bench.report import record_section

HEADING = "## Deployment: ClientApp task start, forked from a warm server vs a fresh process"


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _signal_ready(ready) -> None:
    """A forked task that only says it runs, with the CPU time its process has used."""
    ready.send(time.process_time())


# What every training task imported before the fork server: the checked ClientApp, the
# installed one (torch) and Opacus (a ResNet backbone or tabular data added torchvision or
# pandas on top; the fork server preloads those too).
BEFORE = ["ferry.client.checked_clientapp", "ferry.client.app", "opacus"]


def fresh_processes(tasks: int) -> dict:
    """Start ``tasks`` fresh processes importing :data:`BEFORE`, one at a time (the CPU time
    is the whole process's: interpreter start and imports)."""
    code = "import " + ", ".join(BEFORE)
    walls, cpu_before = [], _cpu_of_children()
    for _ in range(tasks):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-P", "-c", code], check=True, capture_output=True)
        walls.append(time.perf_counter() - started)
    return {"wall_s": sum(walls) / tasks, "cpu_s": (_cpu_of_children() - cpu_before) / tasks}


def forked_tasks(tasks: int) -> dict:
    """Warm the fork server (not counted: once per institution), then fork ``tasks`` tasks."""
    task_launcher.warm_up()
    ready_r, ready_w = task_launcher.FORKS.Pipe(duplex=False)
    warm = task_launcher.FORKS.Process(target=_signal_ready, args=(ready_w,))
    warm.start()  # the server answers once it has imported PRELOAD
    ready_r.recv()
    warm.join()
    walls, cpu = [], 0.0
    for _ in range(tasks):
        started = time.perf_counter()
        task = task_launcher.FORKS.Process(target=_signal_ready, args=(ready_w,))
        task.start()
        cpu += ready_r.recv()
        walls.append(time.perf_counter() - started)
        task.join()
    return {"wall_s": sum(walls) / tasks, "cpu_s": cpu / tasks}


def render(fresh: dict, forked: dict, tasks: int, command: str) -> str:
    ratio = fresh["wall_s"] / forked["wall_s"]
    return "\n".join(
        [
            f"Command: `{command}` ({tasks} tasks each, one at a time).",
            "",
            "| task start | wall time per task | CPU time per task |",
            "|---|---|---|",
            f"| fresh `python -P` importing {', '.join(f'`{m}`' for m in BEFORE)} (before) | "
            f"{fresh['wall_s']:.2f} s | {fresh['cpu_s']:.2f} s |",
            f"| forked from the warm fork server (now) | {forked['wall_s'] * 1000:.0f} ms | "
            f"{forked['cpu_s'] * 1000:.0f} ms |",
            f"| **ratio (before / now)** | **{ratio:.0f}×** | "
            f"**{fresh['cpu_s'] / forked['cpu_s']:.0f}×** |",
            "",
            "Every message an institution answers is one task: a 2-round deployment answers "
            "about six per institution (backbone offer and shipment, train and evaluate per "
            "round). The fork server itself imports once, when `ferry client` starts.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--markdown", default=None, help="file to update (default BENCHMARKS.md)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"fresh processes x{args.tasks}...", flush=True)
    fresh = fresh_processes(args.tasks)
    print(f"forked tasks x{args.tasks}...", flush=True)
    forked = forked_tasks(args.tasks)
    command = "python -m ferry.simulations.bench.task_start_bench" + (
        f" --tasks {args.tasks}" if args.tasks != 5 else ""
    )
    table = render(fresh, forked, args.tasks, command)
    print(table)
    record_section(args.markdown, False, HEADING, table, load)


if __name__ == "__main__":
    main()
