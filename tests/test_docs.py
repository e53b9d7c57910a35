"""What a reader follows must exist and be true (issue 32): README.md, docs/*.md, and the docstrings and --help texts.
Every line link lands on what it names and every relative link and heading anchor resolves; every `module.name` and
every "`name` in `file.py`" names something that is there; every file.py named exists; a claim about "every stage"
holds for every stage; the README's figures come from one recorded run in docs/; a CPU's flags are given with the date
they were read; and stage numbers mean what the README's picture says."""
import ast
import functools
import re
from pathlib import Path

import pytest

from conftest import ROOT, options, parse_only

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PY = sorted(ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
MODULES = {p.stem: p for p in ROOT.glob("*.py")}
STAGES = ["distill.py", "pretrain_vision.py", "pretrain_text.py", "align.py", "evaluate.py"]
TRAINING_STAGES = ["pretrain_vision.py", "pretrain_text.py", "align.py"]
# Files of other projects that a docstring names, and the package that must hold them.
EXTERNAL_FILES = {"masking_utils.py": "transformers"}
# Below this line docs/ablations.md is written by benchmarks/ablations.py from its result files (main's copy may lag):
# its words are not checked here, but its figures are a source the README may quote.
GENERATED = "<!-- RESULTS: written by benchmarks/ablations.py"


def rel(path):
    return str(path.relative_to(ROOT))


def doc_text(path):
    text = path.read_text()
    return text.split(GENERATED)[0]


@functools.cache
def docstrings(path):
    """The module's, classes' and functions' docstrings of a .py file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append(doc)
    return out


@functools.cache
def help_strings(path):
    """The literal parts of every help= of an add_argument call: what --help shows besides the docstring."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            for k in node.keywords:
                if k.arg == "help":
                    out += [n.value for n in ast.walk(k.value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return out


def prose():
    """(where, text) for every doc and every docstring and help string: what a reader reads as words."""
    for path in DOCS:
        yield rel(path), doc_text(path)
    for path in PY:
        if path.name == "test_docs.py":  # this file's words describe the patterns it checks
            continue
        for text in docstrings(path) + help_strings(path):
            yield rel(path), text


@functools.cache
def top_level_names(path):
    """The names a module binds at its top level: functions, classes, assignments, imports (re-exports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.col_offset == 0:
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.col_offset == 0:
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset == 0:
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def slug(heading):
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped (but - and _), spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md):
    out = set()
    for line in md.read_text().splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1))
            out |= {s} | {f"{s}-{i}" for i in range(1, 5)}  # a repeated heading gets -1, -2, ...
    return out


def blocks(text):
    """Paragraphs (blank-line separated) outside code blocks and HTML comments; a list item or table row is a unit of
    its own within them -> [(units, the whole paragraph)]."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    out = []
    for para in re.split(r"\n\s*\n", text):
        units, cur = [], []
        for line in para.splitlines():
            if re.match(r"\s*(- |\| |\d+\. )", line) and cur:
                units.append(" ".join(cur))
                cur = []
            cur.append(line.strip())
        units.append(" ".join(cur))
        out.append((units, " ".join(para.split())))
    return out


# -----------------------------------------------------------------------------
# links

def test_line_links_land_on_what_they_name():
    """The README's method section (and the principles table, and any doc) links to lines ("[model.py](model.py#L351)
    `masked_bce`"): each must land on the definition it names, or a reader lands on the wrong code as soon as a file
    above it grows. Every other line link must at least land inside its file."""
    readme = (ROOT / "README.md").read_text()
    assert len(re.findall(r"\[([\w.]+\.py)\]\(\1#L(\d+)\)\s*`(\w+)`", readme)) >= 7
    checked = 0
    for md in DOCS:
        text = md.read_text()
        for f, n, name in re.findall(r"\[[\w./]+\]\(((?:\.\./)?[\w/]+\.py)#L(\d+)\)\s*`(\w+)`", text):
            line = (md.parent / f).read_text().splitlines()[int(n) - 1]
            assert re.match(rf"\s*(def|class) {name}\b", line), f"{rel(md)}: {f}#L{n} is not `{name}`: {line.strip()}"
            checked += 1
        for f, n in re.findall(r"\]\(((?:\.\./)?[\w/]+\.py)#L(\d+)\)", text):
            assert int(n) <= len((md.parent / f).read_text().splitlines()), f"{rel(md)}: {f}#L{n} is past the file's end"
        for f, n in re.findall(r"called in \[([\w.]+\.py)\]\(\1#L(\d+)\)", text):  # the loss, where the training loop calls it
            assert "align_loss(" in (ROOT / f).read_text().splitlines()[int(n) - 1], f"{f}#L{n}"
    assert checked >= 15  # the method section and the principles table


def test_relative_links_and_anchors_resolve():
    """Every relative link of the README and docs/ leads to a file that exists, and its #anchor to a heading there."""
    n = 0
    for md in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path) if path else md
            assert dest.exists(), f"{rel(md)}: link to {target}: no such file"
            if anchor and dest.suffix == ".md":
                assert anchor in anchors(dest), f"{rel(md)}: link to {target}: no such heading in {rel(dest)}"
            n += 1
    assert n >= 40


# -----------------------------------------------------------------------------
# names in words

FILE_ENDINGS = {"py", "md", "json", "jsonl", "csv", "txt", "png", "pt", "npz", "npy", "gz", "sh", "nii", "log"}


def test_module_names_cited_in_docs_and_docstrings_exist():
    """`model.sentence_alignment`, `devices.cuda_speed_flags`: a module.name in a doc, docstring or help string must be a
    top-level name of that module of ours (a name it defines or imports), or the reader looks for something gone."""
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(sorted(MODULES)) + r")\.([A-Za-z_]\w*)")
    found, missing = 0, []
    for where, text in prose():
        for mod, name in pattern.findall(text):
            if name in FILE_ENDINGS:
                continue
            found += 1
            if name not in top_level_names(MODULES[mod]):
                missing.append(f"{where}: {mod}.{name}")
    assert found >= 30
    assert not missing, missing


def test_names_said_to_be_in_a_file_are_there():
    """"`Gate` in `llm.py`", "`checkpoints.exact_fp32` in `evaluate.py`": the file must hold the name."""
    pattern = re.compile(r"`([\w.]+)(?:\(\))?`\s+in\s+(?:\[`?|`)((?:\.\./)?[\w/]+\.py)")
    found, missing = 0, []
    for where, text in prose():
        for name, f in pattern.findall(text):
            path = ROOT / f.removeprefix("../")
            last = name.split(".")[-1]
            found += 1
            if not path.exists() or not re.search(rf"\b{re.escape(last)}\b", path.read_text()):
                missing.append(f"{where}: `{name}` in {f}")
    assert found >= 2
    assert not missing, missing


def test_files_named_exist():
    """Every x.py a doc, docstring or help string names is a file of this repository (where a path is given, at that
    path), or one of EXTERNAL_FILES in its installed package."""
    ours = {p.name for p in ROOT.rglob("*.py") if ".git" not in p.parts}
    found, missing = 0, []
    for where, text in prose():
        for path in re.findall(r"(?<![\w.-])((?:\.\./)?(?:[\w.-]+/)*\w+\.py)\b", text):
            found += 1
            name = Path(path).name
            if name in EXTERNAL_FILES:
                import importlib
                pkg = Path(importlib.import_module(EXTERNAL_FILES[name]).__file__).parent
                ok = any(pkg.rglob(name))
            elif "/" in path and path.split("/")[0] in ("benchmarks", "tests", "docs", "examples", ".."):
                ok = (ROOT / path.removeprefix("../")).exists()
            else:
                ok = name in ours
            if not ok:
                missing.append(f"{where}: {path}")
    assert found >= 100
    assert not missing, missing


# -----------------------------------------------------------------------------
# claims: each check is a function of the texts, run on the real ones here and on issue 32's stale ones at the end

@functools.cache
def stage_options(script):
    code, parser, _, err = parse_only(script, cwd=ROOT / "tests")
    assert parser is not None, f"{script} parsed no command line ({err})"
    return options(parser)


# "flags of every stage", "is every training stage's", "the training stages take": a claim about the stages' flags
CLAIM = re.compile(r"\bflags? (?:of|that) (?:every|each|all)(?P<t1> training)? stages?\b|\b(?:every|each|all)(?P<t2> training)? "
                   r"stage's|\b(?:every|each|all|the)(?P<t3> training)? stages? (?:takes?|accepts?|share)\b", re.I)


def sentences(text):
    """Sentences and ;-clauses, not split at "Fig. 3a" or "e.g. a"; a command in backticks left out (its flags are its
    script's, checked by tests/test_examples.py)."""
    text = re.sub(r"`[^`]*\.py\b[^`]*`", "", " ".join(text.split()))
    return re.split(r";\s+|(?<=\.)\s+(?=[A-Z`*(\[-])", text)


def every_stage_claims(items):
    """Units of text claiming something of "every stage" (or "every training stage") with flags: each flag must be
    every such stage's -> [what is wrong]."""
    wrong = []
    for where, text in items:
        for unit in sentences(text):
            m = CLAIM.search(unit)
            training = m and any(m.group(g) for g in ("t1", "t2", "t3"))
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", unit) if m else []:
                wrong += [f"{where}: {flag} is not {script}'s ({unit[:80]}...)"
                          for script in (TRAINING_STAGES if training else STAGES) if flag not in stage_options(script)]
    return wrong


def test_claims_about_every_stage_hold_for_every_stage():
    """"Flags of every stage: --data, --preset, ..." must be true of distill.py and evaluate.py too; "every training
    stage's" of pretrain_vision.py, pretrain_text.py and align.py."""
    items = list(prose())
    claims = [1 for _, t in items for u in sentences(t) if CLAIM.search(u) and "--" in u]
    assert len(claims) >= 2  # the README's data flags and align.py's --train-fraction are such claims
    assert every_stage_claims(items) == []


FIGURE = re.compile(r"(?<![\d.])(?:0\.[1-9]\d{2,3}|1\.000)(?![\d])")
COMMIT = re.compile(r"(?<![\w/])(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7}(?![\w/])")


def unsourced_figures(readme, docs):
    """README units that quote AUC-like figures or commits not found all together in one paragraph or table of docs
    -> [what is unsourced]; docs: the docs' texts."""
    paragraphs = [para for text in docs for _, para in blocks(text)]
    out = []
    for units, _ in blocks(readme):
        for unit in units:
            wanted = set(FIGURE.findall(unit)) | set(COMMIT.findall(unit))
            if wanted and not any(all(re.search(rf"(?<![\d.\w]){re.escape(x)}(?![\d\w])", p) for x in wanted)
                                  for p in paragraphs):
                out.append(f"{sorted(wanted)}: {unit[:100]}...")
    return out


def quick_start_unsourced(readme, results):
    """Figures of the README's quick-start output that docs/results.md's section 1 does not hold."""
    quick = re.search(r"<!-- QUICKSTART-OUTPUT -->(.*?)<!-- /QUICKSTART-OUTPUT -->", readme, re.S).group(1)
    section1 = results[results.index("\n## 1."):results.index("\n## 2.")]
    return sorted(x for x in set(FIGURE.findall(quick)) if x not in section1)


def test_readme_figures_come_from_one_recorded_run():
    """Each statement of the README that quotes AUC-like figures or a commit must find all of them together in one
    paragraph or table of docs/ (one run's record), so no README sentence sets figures of two runs against each other
    as if they were one comparison. The quick start's output must be that of docs/results.md's section 1."""
    readme, docs = (ROOT / "README.md").read_text(), [md.read_text() for md in DOCS[1:]]  # the study's results count
    quoted = [u for units, _ in blocks(readme) for u in units if FIGURE.search(u) or COMMIT.search(u)]
    assert len(quoted) >= 5
    assert unsourced_figures(readme, docs) == []
    assert len(FIGURE.findall(readme.split("<!-- QUICKSTART-OUTPUT -->")[1])) >= 4
    assert quick_start_unsourced(readme, (ROOT / "docs/results.md").read_text()) == []


def undated_cpu_flags(texts):
    """Paragraphs or list items that say what a CPU has (AVX...) without the date it was read."""
    return [unit[:100] for text in texts for units, _ in blocks(text) for unit in units
            if re.search(r"\bAVX", unit, re.I) and not re.search(r"\b20\d\d-\d\d-\d\d\b", unit)]


def test_cpu_flags_come_with_the_date_they_were_read():
    """Machines differ between sessions: a doc that says a CPU has (or lacks) AVX-512 says on which date that was read,
    in the same paragraph or list item."""
    texts = [doc_text(md) for md in DOCS]
    assert sum(len(re.findall(r"\bAVX", t)) for t in texts) >= 3
    assert undated_cpu_flags(texts) == []


def stage_naming(items):
    """Stage 1 is distillation (2a/2b pre-training, 3 alignment, 4 evaluation): "stage 1" beside an encoder, a head or
    pre-training is the old naming; the 3D ResNet's own stages, numbered beside channels, convolutions, voxels or maps,
    are "ResNet stage N"."""
    pretraining = re.compile(r"(?<!ResNet )\bstage[- ]1\b", re.I)
    encoder_words = re.compile(r"pre-?train|encoder|\bheads?\b|checkpoint|\bconv|voxel|\b(?:vision|text)\s+stage[- ]1", re.I)
    resnet_stage = re.compile(r"(?<!ResNet )\bstages? [1-4](?:-[1-4])?\b(?![ab0-9])", re.I)
    resnet_words = re.compile(r"\b\d+ ch\b|\bconv|voxel|channels|\bmaps?\b", re.I)
    wrong = []
    for where, text in items:
        for unit in re.split(r"(?<=[.;:])\s+|\n\s*\n|\n\|", text):
            if pretraining.search(unit) and encoder_words.search(unit):
                wrong.append(f"{where}: stage 1 is distillation: {' '.join(unit.split())[:100]}")
            elif resnet_stage.search(unit) and resnet_words.search(unit):
                wrong.append(f"{where}: say 'ResNet stage': {' '.join(unit.split())[:100]}")
    return wrong


def test_stage_numbers_mean_what_the_readme_picture_says():
    items = list(prose())
    assert sum(len(re.findall(r"ResNet stage", t)) for _, t in items) >= 5
    assert stage_naming(items) == []


def init_shared_claims(items):
    """Words on --init-shared heads that say the shared classifier gives a head's logits must state the shift: one
    shared bias, the mean of the two heads', moves each head's logits by half their difference."""
    claim = re.compile(r"classifier\(img_proj\(f\)\)|(?:vision|text|pre-trained) head's logits", re.I)
    return [f"{where}: {' '.join(unit.split())[:100]}" for where, text in items
            for unit in re.split(r"(?<=[.;])\s+|\n\s*\n", text) if claim.search(unit) and "half" not in unit]


def test_init_shared_heads_is_described_with_its_bias_shift():
    items = list(prose())
    assert sum(bool(re.search(r"classifier\(img_proj\(f\)\)", t)) for _, t in items) >= 1  # model.py's docstring
    assert init_shared_claims(items) == []


# The stale items issue 32 listed, as they stood (abridged): each check above must catch its own.
STALE = {
    "README: every stage's flags": (every_stage_claims, [("README.md", "- Flags of every stage: `--data`, `--preset`, "
                                    "`--cache`, `--uncertain mask|positive|negative`; flags a data set's `dataset.json` "
                                    "recommends apply under the command line.")]),
    "align.py: --train-fraction is every stage's": (every_stage_claims, [("align.py", "(Fig. 4c: --encoders-from). "
                                                    "--train-fraction (Fig. 3a) is every stage's.")]),
    "README: 0.947 against 0.571": (lambda readme: unsourced_figures(readme, [md.read_text() for md in DOCS[1:]]),
                                    "Then `python evaluate.py` gives the test split's zero-shot macro AUC: **0.947** "
                                    "[0.936, 0.959] with this recipe\n(2026-12-01, commit eee03c8), against 0.571 when "
                                    "alignment starts without pre-trained checkpoints."),
    "results.md: the first command ends at 0.579": (
        lambda results: quick_start_unsourced((ROOT / "README.md").read_text(), results),
        "# Results\n\n## 1. The bare quick-start command\n\n```\nepoch 1 | valid zero-shot macro AUC 0.5794 | classifier "
        "0.6110\n  Medical material                    0.522\n  macro                               0.579\n```\n\n"
        "## 2. The whole recipe on the demo set\n"),
    "benchmarks.md: AVX-512, undated": (undated_cpu_flags, ["The first toy run failed its bf16 comparison of the vision "
                                        "and align steps on this project's CPU\n(2-core AMD EPYC, AVX-512; torch "
                                        "2.13.0+cpu, oneDNN 3.12): the loss was NaN."]),
    "speed-demo.md: AVX2, no AVX-512, undated": (undated_cpu_flags, ["- Machine: 2-core AMD EPYC (KVM guest, family 25 "
                                                 "model 1, AVX2, no AVX-512), 24 GiB, no GPU\n- Date: 2026-12-01."]),
    "speed-demo.md: stage 1 = pre-training": (stage_naming, [("docs/speed-demo.md", "The recipe = demo build + lite "
                                              "vision\nstage 1 + text stage 1 + lite alignment.")]),
    "speed-demo.md: a ResNet stage without its name": (stage_naming, [("docs/speed-demo.md", "| stage 4 (512 ch, 1 x 2 x "
                                                       "2) | 12 ms | 171 ms | backward 13x forward |")]),
    "README: --init-shared heads 'equals the vision head's logits'": (init_shared_claims, [("README.md", "- **`--init-"
                                    "shared heads`** (alignment): the projections and classifier start from the two "
                                    "pre-training\n  heads, so `classifier(img_proj(f))` equals the vision head's logits "
                                    "and zero-shot starts from what\n  pre-training learned.")]),
    "model.py: 'the pre-trained read-out exactly'": (init_shared_claims, [("model.py", "    so classifier(img_proj(f)) = "
                                                     "H_img f, the pre-trained read-out exactly, and an image-text dot "
                                                     "product starts as")]),
}


@pytest.mark.parametrize("item", sorted(STALE))
def test_the_checks_catch_issue_32s_stale_items(item):
    check, text = STALE[item]
    assert check(text), f"the check passed the stale text of {item!r}"


def test_every_field_of_run_is_in_its_docstring():
    """`run` is made in devices.setup and grows in common.py: setup's docstring lists every field, so a reader finds
    what any run.x is in one place. A field set anywhere but not listed there (or listed but never set) fails."""
    import devices
    listed = set()
    for line in devices.setup.__doc__.splitlines():
        m = re.match(r"      ([a-z_0-9]+(?:, [a-z_0-9]+)*)\s{2,}\S", line)  # "      names   what they are"
        if m:
            listed |= set(m.group(1).split(", "))
    set_in_code = set()
    for path in sorted(ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
            for t in targets:
                for a in ast.walk(t):
                    if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name) and a.value.id == "run":
                        set_in_code.add(a.attr)
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "SimpleNamespace" and path.name == "devices.py":
                set_in_code |= {k.arg for k in node.keywords}
    assert len(set_in_code) >= 25
    assert set_in_code - listed == set(), "fields of run not in devices.setup's docstring"
    assert listed - set_in_code == set(), "devices.setup's docstring lists fields that nothing sets"
