"""``ferry audit RUN --institution NAME --report FILE``: one institution's privacy report, for
its data-protection officer.

Made from the audit alone (:func:`server.audit.audit_ledger`: authentic signed reports,
replayed by an independent accountant), never from the server's own numbers or words: every
round the institution trained with its mechanism (σ, q, steps), its ε after each round as it
reported it and as the audit replayed it, against its budget; the releases outside ε as
Ferry's own code states them (:func:`common.privacy.statement.privacy_statement`, not the
operator's ``summary.json``); and the audit's verdict with its caveats. Every name and value
is escaped (HTML) or set as literal text (Markdown). ``.html`` (one self-contained page: its
chart is a ``data:`` URI, no script, a Content-Security-Policy that loads nothing) or ``.md``
(Markdown, the chart written beside it).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from ferry.common.atomic_files import write_atomic
from ferry.common.errors import FerryError
from ferry.common.privacy.statement import privacy_statement
from ferry.server.audit_checks import InstitutionAudit
from ferry.server.audit_report import AuditReport

FORMATS = (".html", ".md")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _f(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _rows(inst: InstitutionAudit) -> list[list[str]]:
    rows = []
    for record, replayed in zip(inst.records, inst.curve, strict=True):
        seg = record.segment
        rows.append(
            [
                str(record.round if record.round is not None else "–"),
                str(record.client_rounds or "–"),
                record.mechanism,
                f"{seg.noise_multiplier:.4g}",
                f"{seg.sample_rate:.4g}",
                str(seg.steps),
                f"{record.delta:g}",
                _f(record.epsilon_reported),
                _f(replayed),
            ]
        )
    return rows


HEADER = [
    "round",
    "its round",
    "mechanism",
    "σ",
    "q",
    "steps",
    "δ",
    "ε reported (cumulative)",
    "ε replayed (PLD)",
]


def _chart(inst: InstitutionAudit) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 3.4))
    xs = [x for x, _ in inst.points()]
    ax.plot(xs, inst.curve, marker="o", label="replayed (PLD)")
    reported = [r.epsilon_reported for r in inst.records]
    if any(v is not None for v in reported):
        ax.plot(xs, [math.nan if v is None else v for v in reported], ls=":", label="reported")
    if inst.budget_epsilon:
        ax.axhline(inst.budget_epsilon, color="black", ls="--", lw=0.9, label="budget")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set(xlabel="round", ylabel="cumulative ε", title=f"{inst.institution}: ε over the run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _no_guarantee(inst: InstitutionAudit) -> bool:
    """No finite ε to state: no replayable report, noise-free rounds, or no reported ε."""
    return (
        not inst.records
        or any(r.segment.noise_multiplier == 0 for r in inst.records)
        or not math.isfinite(inst.epsilon_replayed)
    )


def check_target(path: str | Path) -> Path:
    """``path`` if a report may be written there (and, for Markdown, its chart beside it);
    else a one-line FerryError."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise FerryError(f"--report {path} must end in .html or .md")
    files = [path, path.with_suffix(".png")] if path.suffix.lower() == ".md" else [path]
    for target in files:
        if target.exists():
            raise FerryError(
                f"{target} already exists: choose a new --report (nothing overwritten)"
            )
    return path


def institution_audit(report: AuditReport, name: str) -> InstitutionAudit:
    found = [i for i in report.institutions if i.institution == name]
    if not found:
        known = ", ".join(i.institution for i in report.institutions) or "none"
        raise FerryError(
            f"the ledger has no signed report from {name!r}: name one of its institutions ({known})"
        )
    return found[0]


def write_institution_report(report: AuditReport, name: str, path: Path) -> Path:
    """Write ``name``'s privacy report to ``path`` (``.html`` or ``.md``); a one-line
    FerryError for an unknown institution, another format or an existing file."""
    path = check_target(path)
    inst = institution_audit(report, name)
    bare = _no_guarantee(inst)
    statement = privacy_statement(inst.delta or 0.0, non_private=bare)
    verdict = report.verdict()
    status = inst.status
    banner = (
        "NO DP GUARANTEE for this institution's releases: its reports carry no finite ε (a "
        "non-private run, or reports the audit could not replay: see the findings)"
        if bare
        else ""
    )
    facts = [
        ("institution", inst.institution),
        ("ledger", str(report.ledger)),
        ("ledger head", report.head_hash or "–"),
        ("rounds trained", str(inst.rounds)),
        ("DP-SGD steps", str(inst.steps)),
        ("ε spent (reported by it)", _f(inst.epsilon_reported)),
        ("ε spent (replayed, PLD)", _f(inst.epsilon_replayed)),
        ("ε (RDP cross-check)", _f(inst.epsilon_rdp)),
        ("budget", f"ε {_f(inst.budget_epsilon)}, δ {inst.budget_delta}"),
        ("δ", str(inst.delta)),
        ("unit of privacy", str(statement.get("unit", "one example"))),
        (
            "accountant",
            f"{statement.get('accountant', 'PRV (Opacus)')}; replayed with "
            "dp-accounting PLD, cross-checked by RDP",
        ),
        ("this institution's audit status", status),
        ("audit verdict (whole ledger)", verdict),
    ]
    outside = [
        (i.get("release", ""), i.get("reveals", "")) for i in statement.get("not_covered", [])
    ]
    chart = _chart(inst)
    if path.suffix.lower() == ".md":
        text = _markdown(inst, facts, statement, outside, report, path, banner)
        write_atomic(path.with_suffix(".png"), chart, exclusive=True)
    else:
        text = _html(inst, facts, statement, outside, report, chart, banner)
    write_atomic(path, text, exclusive=True)
    return path


MARKDOWN_SPECIAL = "\\`*_{}[]()<>#+!|~"


def literal(text: object) -> str:
    """``text`` as literal Markdown: one line, every character Markdown could act on escaped
    (a name cannot become a link, an image, an HTML tag or a table cell)."""
    flat = " ".join(str(text).split())
    return "".join(f"\\{c}" if c in MARKDOWN_SPECIAL else c for c in flat)


def _markdown(inst, facts, statement, outside, report, path: Path, banner: str) -> str:
    cell = literal
    lines = [f"# Privacy report: {cell(inst.institution)}", ""]
    if banner:
        lines += [f"**{cell(banner)}**", ""]
    lines += ["| | |", "|---|---|", *(f"| {cell(k)} | {cell(v)} |" for k, v in facts), ""]
    lines += [f"Mechanism: {cell(statement.get('mechanism', ''))}", ""]
    lines += [f"Covered by ε: {cell(statement.get('covered', ''))}", ""]
    lines += ["## Every round it trained", ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in _rows(inst)]
    lines += ["", f"![ε over the run]({path.with_suffix('.png').name})", ""]
    lines += ["## Released outside ε", ""]
    lines += [f"- **{cell(r)}**: {cell(w)}" for r, w in outside]
    lines += ["", "## Findings and caveats", ""]
    lines += [f"- {cell(d)}" for d in [*inst.details, *report.caveats()]] or ["- none"]
    return "\n".join(lines) + "\n"


def _html(inst, facts, statement, outside, report, chart: bytes, banner: str) -> str:
    e = lambda s: html.escape(str(s), quote=True)  # noqa: E731
    fact_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts)
    head = "".join(f"<th>{e(h)}</th>" for h in HEADER)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in _rows(inst)
    )
    released = "".join(f"<li><b>{e(r)}</b>: {e(w)}</li>" for r, w in outside)
    findings = (
        "".join(f"<li>{e(d)}</li>" for d in [*inst.details, *report.caveats()]) or "<li>none</li>"
    )
    image = base64.b64encode(chart).decode()
    ok = "PASS" if report.ok else "FAIL"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>Privacy report: {e(inst.institution)}</title>
<style>body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 64em; }}
table {{ border-collapse: collapse; margin: 0.6em 0; }} th, td {{ border: 1px solid #ccc;
padding: 0.25em 0.6em; text-align: left; }} th {{ background: #f2f2f2; }}
img {{ max-width: 100%; }}</style></head>
<body>
<h1>Privacy report: {e(inst.institution)} <small>({ok})</small></h1>
{f'<p style="padding:0.6em;background:#fde2e1"><b>{e(banner)}</b></p>' if banner else ""}
<table id="facts">{fact_rows}</table>
<p><b>Mechanism:</b> {e(statement.get("mechanism", ""))}</p>
<p><b>Covered by ε:</b> {e(statement.get("covered", ""))}</p>
<h2>Every round it trained</h2>
<table id="rounds"><tr>{head}</tr>{body}</table>
<img alt="ε over the run" src="data:image/png;base64,{image}">
<h2>Released outside ε</h2><ul>{released}</ul>
<h2>Findings and caveats</h2><ul>{findings}</ul>
</body></html>
"""
