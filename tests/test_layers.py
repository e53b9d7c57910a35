"""The house's layers: every project module imports only modules of a lower layer, so each file can be read
knowing only what lies below it, and no stage script is ever imported (each is one story, run as a command)."""
import ast
import re

from conftest import ROOT

LAYERS = [("dicom",), ("data",), ("encoders",), ("model", "demo", "rules", "metrics", "llm"), ("checkpoints", "devices"), ("common",),
          ("maps",), ("distill", "pretrain_vision", "pretrain_text", "align", "evaluate", "ctrate", "pacs", "scan", "localise", "bench")]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def project_imports(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # nested imports too
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(LAYER)


def test_every_module_has_a_layer():
    assert {p.stem for p in ROOT.glob("*.py")} == set(LAYER)


def test_imports_only_go_downward():
    upward = [f"{p.name} imports {name}" for p in sorted(ROOT.glob("*.py"))
              for name in sorted(project_imports(p)) if LAYER[name] >= LAYER[p.stem]]
    assert not upward, upward


def test_readme_line_links_land_on_what_they_name():
    """The README's method section links to lines ("[model.py](model.py#L351) `masked_bce`"): each must land on the
    definition it names, or a reader lands on the wrong code as soon as a file above it grows."""
    text = (ROOT / "README.md").read_text()
    named = re.findall(r"\[([\w.]+\.py)\]\(\1#L(\d+)\)\s*`(\w+)`", text)
    assert len(named) >= 7
    for f, n, name in named:
        line = (ROOT / f).read_text().splitlines()[int(n) - 1]
        assert re.match(rf"\s*(def|class) {name}\b", line), f"{f}#L{n} is not `{name}`: {line.strip()}"
    for f, n in re.findall(r"called in \[([\w.]+\.py)\]\(\1#L(\d+)\)", text):  # the loss, where the training loop calls it
        assert "align_loss(" in (ROOT / f).read_text().splitlines()[int(n) - 1], f"{f}#L{n}"
