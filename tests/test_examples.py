"""Every command a script suggests runs as written (issue 32). The example lines of each script's docstring (its --help
text) and the README's command blocks are run in this process up to the script's parse_args (conftest.parse_only):
the script exists and the command line parses, and nothing is read, built or trained. A command named inline, in a
doc, a docstring, a help string or a message (`python data.py preprocess`, "next: python evaluate.py --ckpt ..."),
must name a script that exists and flags that script has."""
import ast
import functools
import importlib.util
import re
import shlex

import pytest

from conftest import ROOT, options, parse_only

RUNNABLE = re.compile(r"^if __name__ == .__main__.:|^args = p\.parse_args\(", re.M)  # a script, not a library module
SCRIPTS = [p for p in sorted(ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")) if RUNNABLE.search(p.read_text())]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Modules a benchmark imports at its top that are not in requirements.txt: without them it cannot be parsed here.
OPTIONAL = {"benchmarks/dicom_read.py": ["SimpleITK", "dcm2niix"]}


def command(line):
    """A shell line -> (script, args) of its `python <script>.py ...` or `torchrun ... <script>.py ...`, or None. Comments, environment
    assignments (KEY=... python ...) and "..." placeholders are dropped; `python -m` (pytest, a server) is not ours."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
        tokens = tokens[1:]
    if not tokens or tokens[0] not in ("python", "torchrun"):
        return None
    i = 1 if tokens[0] == "python" else next((j for j, t in enumerate(tokens) if t.endswith(".py")), len(tokens))
    if i >= len(tokens) or not tokens[i].endswith(".py"):
        return None
    return tokens[i], [t for t in tokens[i + 1:] if t != "..."]


def joined_lines(text):
    """Lines with their backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def docstring_examples():
    """(where, script, args) for each example line of each script's docstring: a line that is a command."""
    out = []
    for path in SCRIPTS:
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        for n, line in enumerate(joined_lines(doc), 1):
            for part in re.split(r"&&|;", line):
                if (cmd := command(part.strip())) is not None:
                    out.append((f"{path.relative_to(ROOT)} docstring, line {n}", *cmd))
    return out


def readme_examples():
    """(where, script, args) for each command line of the README's ```bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in joined_lines(block):
            if (cmd := command(line.strip())) is not None:
                out.append((f"README: {line.strip()[:50]}", *cmd))
    return out


EXAMPLES = docstring_examples() + readme_examples()


def missing_optional(script):
    return [m for m in OPTIONAL.get(script, []) if importlib.util.find_spec(m) is None]


def test_the_examples_were_found():
    """Each stage's docstring gives example commands (house style: demo CPU, one GPU, torchrun), and so do the tools'."""
    wheres = {w.split(" docstring")[0] for w, *_ in EXAMPLES}
    assert {"distill.py", "pretrain_vision.py", "pretrain_text.py", "align.py", "evaluate.py", "scan.py", "localise.py",
            "demo.py", "pacs.py", "ctrate.py", "data.py", "bench.py"} <= wheres
    assert sum(w.startswith("README") for w, *_ in EXAMPLES) >= 15
    assert sum(w.startswith("align.py docstring") for w, *_ in EXAMPLES) >= 3  # the torchrun line among them
    assert not any("--nproc_per_node" in args for *_, args in EXAMPLES)  # torchrun's own flags are not the script's


@pytest.mark.parametrize("where, script, args", EXAMPLES, ids=[w for w, *_ in EXAMPLES])
def test_example_command_parses_as_written(where, script, args, tmp_path):
    assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
    if missing_optional(script):
        pytest.skip(f"{script} needs {missing_optional(script)}, not installed here")
    code, parser, parsed, err = parse_only(script, *args, cwd=tmp_path)
    assert parser is not None, f"{where}: {script} never parsed a command line"
    assert code == 0 and parsed is not None, f"{where}: python {script} {' '.join(args)}: {err.strip()}"


@functools.cache
def script_options(script):
    code, parser, _, err = parse_only(script, cwd=ROOT / "tests")
    assert parser is not None, f"{script}: no parser ({err})"
    return options(parser)


def code_strings(path):
    """Every literal string of a .py file (the literal parts of f-strings too): docstrings, help, messages."""
    return [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def inline_commands():
    """(where, script, flags) for every `python <script>.py ...` named in the docs, docstrings, help strings and messages."""
    pattern = re.compile(r"(?:python|torchrun(?: --?[\w-]+(?: \d+)?)*) ((?:[\w-]+/)*[\w-]+\.py)\b([^`,;()#\n\"']*)")
    texts = [(str(p.relative_to(ROOT)), p.read_text()) for p in DOCS]
    texts += [(str(p.relative_to(ROOT)), s) for p in sorted(ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
              for s in code_strings(p)]
    return [(where, script, re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest))
            for where, text in texts for script, rest in pattern.findall(text)]


def test_commands_named_inline_use_flags_their_script_has():
    found, wrong = inline_commands(), []
    assert len(found) >= 60
    for where, script, flags in found:
        path = ROOT / script if (ROOT / script).exists() else ROOT / "benchmarks" / script
        if not path.exists():
            wrong.append(f"{where}: python {script}: no such script")
            continue
        name = str(path.relative_to(ROOT))
        if missing_optional(name) or not RUNNABLE.search(path.read_text()):
            continue
        wrong += [f"{where}: python {script} {flag}: no such flag" for flag in flags if flag not in script_options(name)]
    assert not wrong, wrong
