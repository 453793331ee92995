"""The K-curve benchmark's tables, as they go into BENCHMARKS.md: per dataset, accuracy against
the number of institutions with the defaults and the best of the grid, a verdict per cell
against :data:`simulations.bench.kcurve_plan.WITHIN_POINTS`, and one reading per dataset
written from the table's own figures (:func:`interpret`; :func:`headline` for the README).
"""

from __future__ import annotations

import numpy as np

from ferry.simulations.bench.kcurve_plan import WITHIN_POINTS


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _sizes(ns: list[int]) -> str:
    return f"{ns[0]:,}" if len(ns) == 1 else f"{min(ns):,}–{max(ns):,}"


def _row_label(row: dict) -> str:
    k, ns = row["institutions"], row["train_examples"]
    if row["row"] == "alone":
        return f"each of the {k} alone ({_sizes(ns)})"
    if row["row"] == "central" or (row["row"] == "non-private" and k == 1):
        return f"1, central ({_sizes(ns)})"
    return f"{k} federated ({_sizes(ns)} each)"


def _accuracy(row: dict) -> str:
    if row["row"] != "alone":
        return _pct(row["defaults"]["accuracy"])
    accs = [m["accuracy"] for m in row["each"]]
    return f"{_pct(np.mean(accs))} ({_pct(min(accs))}–{_pct(max(accs))})"


def render(results: dict, command: str) -> str:
    s = results["sizes"]
    grid_text = (
        f"expected batch {{{', '.join(map(str, s['batches']))}}} (capped at n) × (rounds, local "
        f"epochs) {{{', '.join(f'({r}, {e})' for r, e in s['schedules'])}}} × learning rate "
        f"{{{', '.join(f'{lr:g}' for lr in s['lrs'])}}}"
    )
    seeds = f"{s['repeats']} seed{'s' if s['repeats'] > 1 else ''}"
    lines = [
        f"Command: `{command}` ({results['seconds'] / 60:.1f} min in all, "
        f"{results['jobs']} dataset{'s' if results['jobs'] > 1 else ''} at a time). A DP linear "
        "head on frozen features, trained in-process by `simulations.linear_federation` (Ferry's DP-SGD and "
        f"FedAvg; σ per institution from its own q and steps at (ε, δ = {s['delta']:g}), RDP "
        "accountant, C = 1). **Defaults**: each institution's batch from its own n and the "
        "head's size (`rule_batch_size`), epochs, rounds and learning rate from "
        f"`rule_schedule`; mean of {seeds}. **Best of grid** (1 and 5 institutions): "
        f"{grid_text}, every point once, the best {s['top']} again over the defaults' {seeds}; "
        "the best of those (a maximum over noisy means: it flatters the grid). Every row, the "
        "institutions alone included, is scored on the same records: the pooled held-out 20% "
        "of all institutions. Each institution alone has the same (ε, δ) and rule.",
    ]
    verdicts = []
    for name, d in results["datasets"].items():
        binary = d["classes"] == 2
        split = (
            f"Dirichlet label skew α = {d['alpha']:g}"
            if d["partition"] == "dirichlet"
            else d["partition"].upper()
        )
        lines += [
            "",
            f"### {name}",
            "",
            f"Data: {d['description']}; {d['records']:,} records, {split} among institutions, "
            f"{d['held_out']:,} held out ({d['seconds'] / 60:.1f} min).",
            "",
            "| ε | institutions (training examples) | defaults: accuracy | "
            + ("balanced accuracy | ROC AUC | " if binary else "")
            + "best of grid: accuracy (setting) | defaults − best (points) | within "
            f"{WITHIN_POINTS:g} points |",
            "|---|---|---|" + ("---|---|" if binary else "") + "---|---|---|",
        ]
        for row in d["rows"]:
            eps = "∞ (no DP)" if row["epsilon"] is None else f"{row['epsilon']:g}"
            cells = [eps, _row_label(row), _accuracy(row)]
            if binary:
                m = row["defaults"]
                cells += [f"{m['balanced_accuracy']:.3f}", f"{m.get('roc_auc', float('nan')):.3f}"]
            if "grid" in row:
                g = row["grid"]
                cells += [
                    f"{_pct(g['metrics']['accuracy'])} ({g['best']})",
                    f"{row['gap_points']:+.1f}",
                    "PASS" if row["within"] else "**FAIL**",
                ]
                verdicts.append((name, row))
            else:
                cells += ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", interpret(name, d)]
    failed = [
        f"{n} ε={r['epsilon']:g} K={r['institutions']}" for n, r in verdicts if not r["within"]
    ]
    lines += [
        "",
        f"Defaults within {WITHIN_POINTS:g} points of the best of the grid in "
        f"{len(verdicts) - len(failed)} of {len(verdicts)} cells"
        + (f"; not in: {', '.join(failed)}." if failed else "."),
    ]
    return "\n".join(lines) + "\n"


def _pick(d: dict, kind: str, k: int, eps) -> dict | None:
    for row in d["rows"]:
        if row["row"] == kind and row["institutions"] == k and row["epsilon"] == eps:
            return row
    return None


def interpret(name: str, d: dict) -> str:
    """One sentence on ``name``'s K-curve at the middle ε, from the table's own figures."""
    epsilons = sorted({r["epsilon"] for r in d["rows"] if r["epsilon"] is not None})
    eps = epsilons[len(epsilons) // 2]
    lone = next(r for r in d["rows"] if r["row"] == "alone" and r["epsilon"] == eps)
    k = lone["institutions"]
    fed, central = _pick(d, "federated", k, eps), _pick(d, "central", 1, eps)
    accs = [m["accuracy"] for m in lone["each"]]
    text = (
        f"{name}, ε = {eps:g}: {k} institutions of ~{np.mean(lone['train_examples']):,.0f} "
        f"training examples reach {_pct(fed['defaults']['accuracy'])} federated against "
        f"{_pct(np.mean(accs))} ({_pct(min(accs))}–{_pct(max(accs))}) each alone"
    )
    others = sorted(
        r["institutions"]
        for r in d["rows"]
        if r["row"] == "federated" and r["epsilon"] == eps and r["institutions"] != k
    )
    for other in others:
        r = _pick(d, "federated", other, eps)
        text += (
            f"; {other} of ~{np.mean(r['train_examples']):,.0f} reach "
            f"{_pct(r['defaults']['accuracy'])}"
        )
    text += (
        f"; one institution holding all {central['train_examples'][0]:,} reaches "
        f"{_pct(central['defaults']['accuracy'])} (central DP)"
    )
    private = _pick(d, "non-private", 1, None)
    if private:
        text += f", {_pct(private['defaults']['accuracy'])} without DP"
    return text + "."


def headline(results: dict, name: str | None = None) -> str:
    """One sentence for the README: what federating bought on ``name`` (default: the demo's
    preset, hospital-imaging, when it ran; else the first dataset)."""
    datasets = results["datasets"]
    name = name or ("hospital-imaging" if "hospital-imaging" in datasets else next(iter(datasets)))
    return "On " + interpret(name, datasets[name])
