"""Simulation benchmarks at 100 and 1,000 virtual institutions, Ferry vs a no-op client.

(c) steady-state round time (rounds 2+, i.e. after the backbone shipped and features were
    cached) of Ferry's client vs :mod:`ferry.simulations.bench.noop_client`, same server loop,
    same number of virtual clients, same sampling;
(e) peak resident memory of the whole simulation (driver, Ray's processes and workers: the
    sum of VmRSS over the process tree, sampled every 0.2 s).

Each simulation runs in a fresh child process, so each starts Ray anew and its memory is its
own. Run: ``python -m simulations.bench.sim_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

EXAMPLES_PER_CLIENT = 40
# (virtual clients, rounds, fraction sampled per round) of each Ferry-vs-no-op pair.
QUICK_SIZES = [(100, 3, 0.5)]
FULL_SIZES = [(100, 4, 0.5), (1000, 4, 0.1)]


def _tree_rss(root: int) -> int:
    """Sum of VmRSS (bytes) over ``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as f:
                kb = next((int(line.split()[1]) for line in f if line.startswith("VmRSS")), 0)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = kb * 1024
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_child(kind: str, clients: int, rounds: int, fraction: float, home: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-{clients}-"))
    cmd = [
        sys.executable,
        "-m",
        "ferry.simulations.bench.sim_bench",
        "--child",
        kind,
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--fraction",
        str(fraction),
        "--out",
        str(out / "run"),
    ]
    env = {**os.environ, "FERRY_HOME": home, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} simulation with {clients} clients failed:\n{output[-3000:]}")
    rounds_done = [json.loads(line) for line in (out / "run" / "metrics.jsonl").open()]
    steady = [r["seconds"] for r in rounds_done[1:]] or [rounds_done[0]["seconds"]]
    return {
        "kind": kind,
        "clients": clients,
        "fraction": fraction,
        "rounds": len(rounds_done),
        "first_round_s": rounds_done[0]["seconds"],
        "steady_round_s": sum(steady) / len(steady),
        "peak_rss_bytes": peak,
    }


def child_main(kind: str, clients: int, rounds: int, fraction: float, out: str) -> None:
    from ferry.common.config import RunConfig
    from ferry.simulations.runner import simulate

    cfg = RunConfig(
        clients=clients,
        rounds=rounds,
        fraction_train=fraction,
        weights="random",
        examples=EXAMPLES_PER_CLIENT * clients,
        alpha=100.0,
        out=out,
        non_private=kind == "noop",
        noise_multiplier=0.0 if kind == "noop" else None,
    )
    app = None
    if kind == "noop":
        from ferry.simulations.bench.noop_client import app
    simulate(cfg, log=lambda line: print(line, flush=True), client_app=app)


def run(quick: bool) -> dict:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    home = tempfile.mkdtemp(prefix="bench-home-")
    results = []
    for clients, rounds, fraction in sizes:
        for kind in ("noop", "ferry"):
            r = run_child(kind, clients, rounds, fraction, home)
            print(
                f"  {kind} x{clients}: steady round {r['steady_round_s']:.2f}s, "
                f"peak {r['peak_rss_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
            results.append(r)
    return {"runs": results}


def render(results: dict, command: str) -> str:
    by = {(r["kind"], r["clients"]): r for r in results["runs"]}
    lines = [
        f"Command: `{command}`",
        "",
        "| virtual clients | sampled per round | Ferry round | no-op round | ratio (target ≤ 1.5× at 1,000) | Ferry peak memory | no-op peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients in sorted({c for _, c in by}):
        f, n = by[("ferry", clients)], by[("noop", clients)]
        frac = f["fraction"]
        lines.append(
            f"| {clients:,} | {int(clients * frac)} | {f['steady_round_s']:.2f} s | "
            f"{n['steady_round_s']:.2f} s | **{f['steady_round_s'] / n['steady_round_s']:.2f}×** | "
            f"{f['peak_rss_bytes'] / 2**30:.2f} GiB | {n['peak_rss_bytes'] / 2**30:.2f} GiB |"
        )
    lines += [
        "",
        "Round times are the mean of rounds 2+ (round 1 also ships the backbone and "
        "computes every sampled client's features once); peak memory is the sum of "
        "resident memory over the simulation's whole process tree (target: 1,000 clients "
        "within 8 GiB).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=("ferry", "noop"))
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.clients, args.rounds, args.fraction, args.out)
        return None
    results = run(args.quick)
    print(
        render(
            results, "python -m simulations.bench.sim_bench" + (" --quick" if args.quick else "")
        )
    )
    return results


if __name__ == "__main__":
    main()
