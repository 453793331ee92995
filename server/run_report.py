"""``report.html``: one page per run for its three readers, written when the run ends.

The researcher (did it learn: per-round loss and the task's metrics), each institution's
data-protection officer (what it spent against its budget, and what left its walls outside
ε: the privacy statement) and the operator (who took part, who refused or was dropped).

One self-contained file: its charts (PNG, also written beside it as ``report_*.png``) are
embedded as ``data:`` URIs; it has no script, and its Content-Security-Policy forbids loading
anything, so opening it contacts nobody. Every name and value from the run is HTML-escaped.
It is made from the run's own files (``summary.json``, ``metrics.jsonl``, the ledger), so
``write_report(RUN)`` redraws it at any time.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from pathlib import Path

from ferry.common.atomic_files import write_atomic
from ferry.server.ledger import LEDGER_FILE, read_ledger

REPORT_FILE = "report.html"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
METRICS = {
    "classification": ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc"),
    "regression": ("rmse", "mae", "directional_accuracy"),
}
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; font-size: 1.2em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.name, th.name { text-align: left; white-space: nowrap; }
.banner { padding: 0.6em 1em; background: #fde2e1; border: 1px solid #d33; }
.over { color: #b00; font-weight: bold; } .muted { color: #666; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.4em 0; }
code { font-size: 0.92em; word-break: break-all; }
"""


def _read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: object, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "–" if value in (None, "") else _e(value)
    if isinstance(value, float) and not math.isfinite(value):
        return _e(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _delta(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else _num(value)


COUNTED = {
    "client_refused": "refused",
    "client_dropped": "dropped",
    "update_rejected": "rejected",
    "evaluation_rejected": "rejected",
}


def ledger_view(out: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, dict]]:
    """From the ledger: each institution's cumulative ε after every round it trained (as the
    server recorded its signed reports; None for a non-private run's) and, per institution,
    the rounds it refused, was dropped from, or had a reply rejected in."""
    path = out / LEDGER_FILE
    spent: dict[str, list[tuple[int, float]]] = {}
    rounds: dict[str, dict[str, set]] = {}
    if not path.exists():
        return {}, {}
    for record in read_ledger(path, check_head=False).records:
        event, name = record.get("event"), str(record.get("institution") or "")
        if event == "client_trained" and name:
            eps = record.get("epsilon_spent", record.get("epsilon_reported"))
            if isinstance(eps, int | float) and math.isfinite(eps):
                spent.setdefault(name, []).append((int(record["round"]), float(eps)))
        elif event in COUNTED and name:
            kinds = rounds.setdefault(name, {k: set() for k in set(COUNTED.values())})
            kinds[COUNTED[event]].add(record.get("round"))
    counts = {name: {k: len(v) for k, v in kinds.items()} for name, kinds in rounds.items()}
    return spent, counts


def _charts(out: Path, rounds: list[dict], task: str, spent: dict, budgets: set) -> list:
    """(title, file name, PNG bytes) of each chart; written beside the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    charts = []

    def save(fig, ax, name: str, title: str, ylabel: str) -> None:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best", ncol=2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        charts.append((title, name, (out / name).read_bytes()))

    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(xs, [r.get("loss", math.nan) for r in rounds], marker="o")
    save(fig, ax, "report_loss.png", "Federated held-out loss", "loss (pooled)")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for key in METRICS.get(task, ()):
        values = [r.get(key) for r in rounds]
        if any(isinstance(v, int | float) for v in values):
            ax.plot(xs, [v if v is not None else math.nan for v in values], marker="o", label=key)
    save(fig, ax, "report_metrics.png", f"Federated held-out {task} metrics (pooled)", "value")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    few = len(spent) <= 12
    for name, points in sorted(spent.items()):
        rx, ry = zip(*points, strict=True)
        ax.plot(rx, ry, marker="o", lw=1.2 if few else 0.6, label=name if few else None)
    for budget in sorted(budgets):
        ax.axhline(budget, color="black", ls="--", lw=0.9)
    ax.set_ylim(bottom=0)
    save(fig, ax, "report_epsilon.png", "Cumulative ε per institution (budget dashed)", "ε")
    return charts


def _institution_rows(
    summary: dict, rounds: list[dict], task: str, counted: dict[str, dict]
) -> list[str]:
    metric = "accuracy" if task == "classification" else "rmse"
    last_eval = next(
        (r["per_institution"] for r in reversed(rounds) if r.get("per_institution")), {}
    )
    names = sorted(
        set(summary.get("clients", {})) | set(last_eval) | set(summary.get("not_selected", {}))
    )
    rows = []
    for name in names:
        client = summary.get("clients", {}).get(name, {})
        count = {"refused": 0, "dropped": 0, "rejected": 0} | counted.get(name, {})
        eps, budget = client.get("epsilon"), client.get("budget_epsilon")
        over = isinstance(eps, float) and isinstance(budget, float) and eps > budget * (1 + 1e-9)
        held = last_eval.get(name, {})
        alone = summary.get("baseline", {}).get("institutions", {}).get(name, {}).get("local", {})
        local_cell = (
            f"<td>{_num(alone.get(metric))} / {_num(alone.get('balanced_accuracy'))}</td>"
            f"<td>{_num(held.get('balanced_accuracy'))}</td>"
            if "baseline" in summary
            else ""
        )
        rows.append(
            "<tr>"
            f'<td class="name">{_e(name)}</td>'
            f"<td>{_num(client.get('examples'))}</td>"
            f"<td>{_num(client.get('rounds'))}</td>"
            f"<td>{count['refused']}</td><td>{count['dropped']}</td><td>{count['rejected']}</td>"
            f"<td{' class=over' if over else ''}>{_num(eps)}</td>"
            f"<td>{_num(budget)}</td><td>{_delta(client.get('delta'))}</td>"
            f"<td>{_num(held.get('eval_examples'))}</td><td>{_num(held.get(metric))}</td>"
            f"{local_cell}</tr>"
        )
    header = (
        '<tr><th class="name">institution</th><th>training examples</th><th>rounds trained</th>'
        "<th>refused</th><th>dropped</th><th>rejected</th><th>ε spent</th><th>budget ε</th>"
        f"<th>δ</th><th>held-out examples</th><th>federated {_e(metric)} (its held-out)</th>"
        + (
            f"<th>alone, same ε ({_e(metric)} / balanced)</th><th>federated balanced</th>"
            if "baseline" in summary
            else ""
        )
        + "</tr>"
    )
    return [header, *rows]


def _statement(privacy: dict) -> str:
    items = "".join(
        f"<li><b>{_e(item.get('release'))}</b>: {_e(item.get('reveals'))}</li>"
        for item in privacy.get("not_covered", [])
    )
    against = "".join(
        f"<li><b>{_e(who)}</b>: {_e(what)}</li>" for who, what in privacy.get("against", {}).items()
    )
    return (
        f"<p><b>Unit of privacy:</b> {_e(privacy.get('unit', '–'))}. "
        f"<b>Accountant:</b> {_e(privacy.get('accountant', '–'))}. "
        f"<b>δ:</b> {_e(privacy.get('delta', '–'))}.</p>"
        f"<p><b>Mechanism:</b> {_e(privacy.get('mechanism', '–'))}</p>"
        f"<p><b>Covered by ε:</b> {_e(privacy.get('covered', '–'))}</p>"
        f"<p><b>Released outside ε (not covered):</b></p><ul>{items}</ul>"
        f"<p><b>Against whom:</b></p><ul>{against}</ul>"
        f"<p class=muted>Replay every spend with <code>ferry audit {_e(privacy.get('run', 'RUN'))}"
        "</code>; the ledger is <code>ledger.jsonl</code>.</p>"
    )


def render(out: Path) -> tuple[str, list]:
    """The page and its charts, from the run's files in ``out``."""
    summary = json.loads((out / "summary.json").read_text())
    rounds = _read_lines(out / "metrics.jsonl")
    run, privacy, final = (
        summary.get("run", {}),
        summary.get("privacy", {}),
        summary.get("final", {}),
    )
    task = str(final.get("task") or run.get("task") or "classification")
    spent, counted = ledger_view(out)
    budgets = {
        c["budget_epsilon"]
        for c in summary.get("clients", {}).values()
        if isinstance(c.get("budget_epsilon"), int | float)
    }
    charts = _charts(out, rounds, task, spent, budgets)
    config_sha = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()
    backbone = summary.get("backbone", {})
    banner = (
        '<p class="banner"><b>NON-PRIVATE run</b>: no DP guarantee (σ may be 0).</p>'
        if privacy.get("non_private")
        else ""
    )
    headline = " · ".join(
        f"{_e(k.replace('_', ' '))} {_num(final.get(k))}"
        for k in METRICS.get(task, ())
        if isinstance(final.get(k), int | float)
    )
    images = "".join(
        f'<figure><img alt="{_e(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption class=muted>{_e(title)} '
        f"({_e(name)})</figcaption></figure>"
        for title, name, data in charts
    )
    about = (
        f"{_num(summary.get('rounds_completed'))} rounds completed "
        f"({_e(summary.get('end_reason', '–'))}), {_num(summary.get('wall_time_s'), 1)} s; "
        f"task {_e(task)}; scenario {_e(run.get('scenario', '–'))}; "
        f"aggregation {_e(run.get('aggregation', '–'))}"
    )
    identity = "".join(
        f'<tr><th class="name">{label}</th><td class="name"><code>{_e(value)}</code></td></tr>'
        for label, value in (
            ("backbone", backbone.get("architecture", "–")),
            ("backbone sha256", backbone.get("sha256", "–")),
            ("run configuration sha256", config_sha),
        )
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>Ferry run {_e(run.get("run_id", out.name))}</title><style>{STYLE}</style></head>
<body>
<h1>Ferry run <code>{_e(run.get("run_id", out.name))}</code></h1>
<p class=muted>{about}</p>
{banner}
<p><b>Final federated model</b> (round {_num(final.get("round"))}, the institutions' held-out
splits pooled, each counted at most weight-cap times the median's):
{headline or "no evaluation"}. Max ε spent by any institution: {_num(privacy.get("max_epsilon"))}
(δ = {_e(privacy.get("delta", "–"))}).</p>
<h2>Per round</h2>
{images}
<h2>Per institution</h2>
<table id="institutions">{"".join(_institution_rows(summary, rounds, task, counted))}</table>
<p class=muted>ε spent and budget as the server recorded them from each institution's signed
reports (<code>ferry audit</code> verifies them); refused, dropped and rejected count rounds;
the federated metric is the final model's on that institution's own held-out split.</p>
<h2>Privacy statement</h2>
{_statement({**privacy, "run": str(out)})}
<h2>Identity</h2>
<table id="identity">{identity}</table>
</body></html>
"""
    return page, charts


def write_report(out: str | Path) -> Path:
    """Write ``out/report.html`` (and its charts beside it) from the run in ``out``."""
    out = Path(out)
    page, _ = render(out)
    write_atomic(out / REPORT_FILE, page)
    return out / REPORT_FILE
