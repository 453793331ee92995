"""``ferry --version`` and ``--help``: every choice listed, each default said once."""

from __future__ import annotations

import re

import pytest

from ferry.cli import main
from ferry.commands.run_options import BACKBONES, SCENARIOS
from ferry.common.backbones import known_backbones
from ferry.common.scenarios import known_scenarios


def test_version_names_ferry_and_what_its_guarantees_rest_on(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(
        r"ferry \S+ \(flwr 1\.41\.0, opacus 1\.6\.0, torch \S+, dp-accounting \S+\)", line
    ), line


def test_help_lists_the_registered_scenarios_and_backbones():
    assert SCENARIOS == tuple(known_scenarios())
    assert BACKBONES == tuple(known_backbones())


@pytest.mark.parametrize("command", ["simulate", "pretrain", "tune", "server", "client"])
def test_help_lists_every_choice_and_says_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert not re.search(r"\(default: [^)]*\) \(default:", text), text
    if command == "simulate":
        for choice in (*SCENARIOS, *BACKBONES, "dirichlet", "natural", "lora", "mlp", "ghost"):
            assert choice in text, choice
        assert "package.module:builder" in text
