"""The house's layers: every project module imports only modules of a lower layer, so each file can be read
knowing only what lies below it, and no stage script is ever imported (each is one story, run as a command)."""
import ast

from conftest import ROOT

LAYERS = [("dicom",), ("volumes",), ("data",), ("encoders",), ("model", "demo", "rules", "metrics", "llm"), ("checkpoints", "devices"),
          ("common",),
          ("maps",), ("distill", "pretrain_vision", "pretrain_text", "align", "evaluate", "ctrate", "pacs", "scan", "localise", "bench",
                      "knee_demo")]
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
