"""Every run writes ``report.html``: checked in a real headless Chromium.

A 3-institution run under strong label skew writes the page at its end. Chromium (Debian's
package; ``make test`` installs it) renders it: the screenshot is not blank, the rendered DOM
holds the per-institution table with each institution's ε as the summary states it, and the
browser logs no console message and no blocked load (the page loads nothing: its charts are
``data:`` URIs and its Content-Security-Policy forbids everything else). Names from the run
are escaped: a name that is markup stays text.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferry.cli import main
from ferry.common.config import RunConfig
from ferry.server.run_report import REPORT_FILE, write_report

from inprocess_grid import simulate_in_process

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    cfg = RunConfig(
        clients=3,
        rounds=2,
        examples=900,
        alpha=0.1,  # strong label skew
        weights="random",
        epsilon=4.0,
        out=str(root / "run"),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERRY_HOME", str(root / "ferry-home"))
        simulate_in_process(cfg)
    return root / "run"


def browse(page: Path, shot: Path) -> tuple[str, str]:
    """(rendered DOM, browser log) of ``page`` in headless Chromium; its screenshot in
    ``shot``. Every host resolves to nothing, so a load that escaped the CSP would fail."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `make chromium` (apt-get install chromium)")
    common = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={shot.parent / 'chromium-profile'}",
    ]
    url = page.resolve().as_uri()
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    )
    pic = subprocess.run(
        [*common, "--window-size=1280,2400", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dom.stdout, dom.stderr + pic.stderr


def test_every_run_writes_a_report_that_chromium_renders_without_errors(run, tmp_path):
    page = run / REPORT_FILE
    assert page.is_file()
    dom, log = browse(page, tmp_path / "shot.png")
    console = [line for line in log.splitlines() if "CONSOLE" in line or "Refused to" in line]
    assert not console, console
    image = np.asarray(Image.open(tmp_path / "shot.png").convert("L"), dtype=np.float32)
    assert image.shape[0] >= 2000 and (image < 200).mean() > 0.02, "the screenshot is blank"
    table = re.search(r'<table id="institutions">(.*?)</table>', dom, re.S)
    assert table, dom[:2000]
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)
    summary = json.loads((run / "summary.json").read_text())
    assert len(rows) == 1 + len(summary["clients"]) == 4
    for name, client in summary["clients"].items():
        (row,) = [r for r in rows if f">{name}<" in r]
        assert f"<td>{client['epsilon']:.3f}</td>" in row
    assert dom.count("data:image/png;base64,") == 3  # loss, metrics, ε: all embedded
    assert "Released outside ε" in dom and summary["backbone"]["sha256"] in dom


def test_names_in_a_report_are_text_not_markup(run, tmp_path):
    """An institution named with markup (a hostile name in a run's files) cannot add a script
    or a remote load to the page that its readers open."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    summary = json.loads((copy / "summary.json").read_text())
    hostile = '<script>alert(1)</script><img src="http://evil.example/x">'
    summary["clients"][hostile] = summary["clients"].popitem()[1]
    (copy / "summary.json").write_text(json.dumps(summary))
    text = write_report(copy).read_text()
    assert "<script" not in text and 'src="http://' not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_ferry_report_redraws_it_and_refuses_a_directory_without_a_run(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / REPORT_FILE).unlink()
    assert main(["report", str(copy)]) == 0 and (copy / REPORT_FILE).is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no summary.json" in err[0]


def test_an_institutions_privacy_report_for_its_dpo_renders_from_the_audit(run, tmp_path):
    """``ferry audit RUN --institution NAME --report FILE``: every round it trained with its
    mechanism, its ε after each (reported and replayed) against its budget, what left outside
    ε and the verdict; HTML checked in Chromium, Markdown as text."""
    summary = json.loads((run / "summary.json").read_text())
    name, client = sorted(summary["clients"].items())[1]
    page, notes = tmp_path / "dpo.html", tmp_path / "dpo.md"
    for target in (page, notes):
        argv = ["audit", str(run), "--institution", name, "--report", str(target), "--no-plot"]
        assert main(argv) == 0
    dom, log = browse(page, tmp_path / "dpo.png")
    assert not [line for line in log.splitlines() if "CONSOLE" in line or "Refused to" in line]
    rounds = re.search(r'<table id="rounds">(.*?)</table>', dom, re.S).group(1)
    assert rounds.count("<tr>") == 1 + client["rounds"] == 3
    assert f"<td>{client['epsilon']:.3f}</td>" in rounds  # its last report, as it signed it
    assert "PASS" in dom and "Released outside ε" in dom and "held-out split" in dom
    text = notes.read_text()
    assert f"# Privacy report: {name}" in text and text.count("| PoissonSampled\\(") == 2
    assert (tmp_path / "dpo.png").is_file()


@pytest.mark.parametrize(
    ("name", "extra", "words"),
    [
        ("r.html", ["--institution", "nobody"], "no signed report from 'nobody'"),
        ("r.html", [], "--report needs --institution NAME"),
        ("r.pdf", ["--institution", "hospital-000"], "must end in .html or .md"),
    ],
)
def test_a_bad_privacy_report_request_is_one_line_exit_2(run, tmp_path, capsys, name, extra, words):
    target = tmp_path / name
    assert main(["audit", str(run), "--report", str(target), "--no-plot", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not target.exists()


def test_a_privacy_report_never_overwrites_a_file(run, tmp_path, capsys):
    target = tmp_path / "r.md"
    target.write_text("the DPO's notes")
    argv = ["audit", str(run), "--institution", "hospital-000", "--report", str(target)]
    assert main(argv) == 2 and target.read_text() == "the DPO's notes"
    assert "already exists" in capsys.readouterr().err


def test_the_table_counts_each_institutions_refused_dropped_and_rejected_rounds(run, tmp_path):
    """The counts come from the ledger's records, which name the institution (the round
    records in metrics.jsonl key them by node id)."""
    from ferry.server.ledger import Ledger

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    names = sorted(json.loads((copy / "summary.json").read_text())["clients"])
    ledger = Ledger(copy)
    for event, name, rnd in (
        ("client_refused", names[0], 1),
        ("client_refused", names[0], 2),
        ("client_dropped", names[1], 2),
        ("update_rejected", names[2], 1),
        ("evaluation_rejected", names[2], 1),  # the same round: counted once
    ):
        ledger.append(event, run_id="r", round=rnd, institution=name, node_id="1", reason="x")
    text = write_report(copy).read_text()
    rows = {name: re.search(rf">{name}</td>(.*?)</tr>", text, re.S).group(1) for name in names}
    cells = {name: re.findall(r"<td[^>]*>([^<]*)</td>", row) for name, row in rows.items()}
    # training examples, rounds trained, refused, dropped, rejected, ...
    assert [cells[n][2:5] for n in names] == [["2", "0", "0"], ["0", "1", "0"], ["0", "0", "1"]]


def test_a_non_private_run_gets_its_report_and_says_it_has_no_guarantee(tmp_path):
    cfg = RunConfig(
        clients=2,
        rounds=1,
        examples=300,
        weights="random",
        non_private=True,
        noise_multiplier=0.0,
        out=str(tmp_path / "run"),
    )
    simulate_in_process(cfg)
    text = (tmp_path / "run" / REPORT_FILE).read_text()
    assert "NON-PRIVATE run" in text
    target = tmp_path / "np.md"
    assert main(
        [
            "audit",
            str(tmp_path / "run"),
            "--institution",
            "hospital-000",
            "--report",
            str(target),
            "--no-plot",
        ]
    ) in (0, 1)
    assert "NO DP GUARANTEE" in target.read_text()


def test_the_dpo_report_states_ferrys_own_privacy_terms_as_literal_text(run, tmp_path):
    """The operator rewrites summary.json's privacy statement with a false unit of privacy
    and a tracking image: the DPO's report states Ferry's own terms, and no name or value
    becomes Markdown markup."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["privacy"]["unit"] = "one patient ![t](https://tracker.example/p.png)"
    (copy / "summary.json").write_text(json.dumps(summary))
    target = tmp_path / "dpo.md"
    argv = ["audit", str(copy), "--institution", "hospital-000", "--report", str(target)]
    assert main([*argv, "--no-plot"]) == 0
    text = target.read_text()
    assert "tracker.example" not in text and "one patient" not in text
    assert "one example \\(record\\) at one institution" in text
    from ferry.server.audit_institution import literal

    assert literal("![t](http://x/y.png) <img src=z>") == (
        "\\!\\[t\\]\\(http://x/y.png\\) \\<img src=z\\>"
    )


def test_a_markdown_report_never_overwrites_the_chart_beside_it(run, tmp_path, capsys):
    (tmp_path / "r.png").write_bytes(b"precious")
    argv = ["audit", str(run), "--institution", "hospital-000", "--report", str(tmp_path / "r.md")]
    assert main(argv) == 2 and (tmp_path / "r.png").read_bytes() == b"precious"
    assert not (tmp_path / "r.md").exists() and "r.png already exists" in capsys.readouterr().err
