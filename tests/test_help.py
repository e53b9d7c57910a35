"""--help as a reader meets it (issue 32): every flag of every script shows its default, so the paper's values can be
read from --help alone, and every script's parser uses the one formatter that does it."""
import argparse
import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT, run_script
from data import HelpFormatter

STAGES = ["distill.py", "pretrain_vision.py", "pretrain_text.py", "align.py", "evaluate.py"]
TOOLS = ["scan.py", "localise.py", "demo.py", "ctrate.py", "pacs.py", "data.py preprocess", "bench.py"]


def entries(help_text):
    """--help's option entries -> {first flag: its text, continuation lines joined}."""
    out, key = {}, None
    for line in help_text.splitlines():
        m = re.match(r"  (-{1,2}[\w-]+)", line)
        if m:
            key = m.group(1)
            out[key] = line
        elif key and line.startswith("      "):
            out[key] += " " + line.strip()
        else:
            key = None
    return {k: " ".join(v.split()) for k, v in out.items()}


def test_the_formatter_shows_each_kind_of_default():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--on", action=argparse.BooleanOptionalAction, default=True, help="on unless told")
    p.add_argument("--path", default=None, help="a file")
    p.add_argument("--said", default=3, help="three (default: three, as the paper)")
    p.add_argument("--hidden", default=1, help=argparse.SUPPRESS)
    p.add_argument("positional", help="no default to show")
    got = entries(p.format_help())
    assert got["--lr"].endswith("learning rate (default: 0.0001)")
    assert got["--flag"].endswith("a switch (default: off)")
    assert got["--on"].endswith("on unless told (default: on)")
    assert got["--path"].endswith("a file (default: none)")
    assert got["--said"].endswith("three (default: three, as the paper)")  # said once, not twice
    assert "--hidden" not in got and "no default to show" in p.format_help() and "positional (default" not in p.format_help()


def parsers(path):
    """Every argparse.ArgumentParser(...) call in a file -> its keyword names."""
    tree = ast.parse(path.read_text())
    return [{k.arg for k in n.keywords} | {ast.unparse(k.value) for k in n.keywords if k.arg == "formatter_class"}
            for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("ArgumentParser")]


def test_every_parser_uses_the_formatter():
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    found = {f.name: parsers(f) for f in files}
    assert len([f for f in found.values() if f]) >= 15  # the scripts were found (17 files at 2026-12-07)
    bad = [name for name, calls in found.items() for kw in calls if not kw & {"HelpFormatter", "D.HelpFormatter"}]
    assert not bad, f"a parser without data.HelpFormatter: {bad}"


@pytest.mark.parametrize("script", STAGES + TOOLS)
def test_help_runs_and_every_flag_shows_its_default(script, tmp_path):
    code, out, err = run_script(*script.split(), "--help", cwd=tmp_path)
    assert code == 0, err
    got = entries(out)
    assert len(got) >= 3, out
    missing = [k for k, v in got.items() if k != "-h" and "default" not in v]
    assert not missing, f"{script} --help: flags without a default shown: {missing}"
