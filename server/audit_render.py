"""``ferry audit``'s output: the table and findings as text, and the epsilon-per-round plot."""

from __future__ import annotations

import math
from pathlib import Path

from ferry.server.audit_replay import replay_description
from ferry.server.audit_report import AuditReport


def _eps(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else "inf" if math.isinf(x) else f"{x:.3f}"


def render(report: AuditReport) -> str:
    lines = [
        f"ledger: {report.ledger}: {report.records} records, chain intact "
        f"(head {report.head_hash[:12]}); events: "
        + ", ".join(f"{k} {v}" for k, v in sorted(report.events.items())),
        f"replay: {replay_description()}; tolerance {report.tolerance:.0%}",
        f"signatures: {report.signatures}",
    ]
    lines += [f"warning: {w}" for w in report.warnings]
    header = (
        "institution",
        "rounds",
        "steps",
        "ε reported",
        "ε replayed (PLD)",
        "ε RDP",
        "budget (ε, δ)",
        "status",
    )
    rows = [
        (
            i.institution,
            str(i.rounds),
            str(i.steps),
            _eps(i.epsilon_reported),
            _eps(i.epsilon_replayed),
            _eps(i.epsilon_rdp),
            "-" if i.budget_epsilon is None else f"{i.budget_epsilon:g}, {i.budget_delta:g}",
            i.status,
        )
        for i in report.institutions
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        lines.append(
            "  ".join(
                cell.ljust(w) if c in (0, 7) else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    details = [d for i in report.institutions for d in i.details]
    if details:
        lines.append("findings:")
        lines += [f"  {d}" for d in details]
    return "\n".join(lines)


def write_plot(report: AuditReport, path: Path) -> str:
    """Cumulative replayed epsilon per round, one line per institution, budgets dashed."""
    try:  # matplotlib: heavy, and only for the plot (a missing one skips it)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'matplotlib>=3.8')"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    few = len(report.institutions) <= 12
    for inst in report.institutions:
        pts = [(x, y if math.isfinite(y) else math.nan) for x, y in inst.points()]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        style = (
            {"color": "tab:red", "lw": 1.6, "alpha": 0.9}
            if inst.flags
            else {"lw": 1.2 if few else 0.6, "alpha": 0.9 if few else 0.35}
        )
        label = inst.institution if few or inst.flags else None
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label, **style)
    budgets = sorted({i.budget_epsilon for i in report.institutions if i.budget_epsilon})
    for b in budgets:
        ax.axhline(b, color="black", ls="--", lw=0.9)
        ax.annotate(
            f"budget ε={b:g}",
            (0.005, b),
            xycoords=("axes fraction", "data"),
            va="bottom",
            fontsize=8,
        )
    from matplotlib.ticker import MaxNLocator  # with pyplot, above

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε (replayed, PLD)")
    ax.set_title(
        f"ferry audit: {len(report.institutions)} institutions, "
        f"{'PASS' if report.ok else 'FAIL'} ({report.ledger.parent.name})"
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        return f"plot not written: {path.parent} is not writable ({exc.strerror})"
    finally:
        plt.close(fig)
    return f"plot: {path}"
