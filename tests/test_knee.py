"""A second modality with no code edit (issue 31): no stage script names a modality (no chest label name, no HU
constant), the knee builder writes what a fork provides, and the whole recipe runs on a tiny knee set by the README's
command lines with --data (in this process: conftest.run_script)."""
import ast
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import data as D
import volumes as V
from conftest import ROOT, run_script

# What must stay free of one modality's names and numbers: the recipe's stages and tools, and the modules they share.
CHECKED = ["distill.py", "rules.py", "llm.py", "pretrain_vision.py", "pretrain_text.py", "align.py", "evaluate.py",
           "scan.py", "localise.py", "maps.py", "common.py", "model.py", "checkpoints.py", "metrics.py", "devices.py",
           "encoders.py"]
# Where a modality lives by design: volumes.py (presets, the HU rules), data.py (label sets), dicom.py (a CT series' rescale to HU),
# the data-set builders, and bench.py (memory and speed at the paper's chest CT scale).
EXEMPT = ["volumes.py", "data.py", "dicom.py", "demo.py", "ctrate.py", "knee_demo.py", "pacs.py", "bench.py"]
# rules.py's table of synonyms for the built-in chest_ct label set is label data (what a label file gives a fork),
# read only for a label of that name; the rest of rules.py is checked.
LABEL_DATA = {"rules.py": "CHEST_CT_SYNONYMS"}


def modality_names(source, skip_assignment=None):
    """The chest label names and HU constants in Python source, docstrings and comments aside -> [(line, what)]: a
    string holding a CT-RATE label name (any case), a number at or below -100 (-500, -1000, -1024 are HU: no other
    quantity here is that negative), or a name with HU in it (AIR_HU)."""
    tree, names = ast.parse(source), [n.lower() for n in D.CHEST_CT_LABELS]
    docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    skipped = {id(x) for n in ast.walk(tree) if isinstance(n, ast.Assign) and skip_assignment is not None
               and skip_assignment in [getattr(t, "id", None) for t in n.targets] for x in ast.walk(n.value)}
    found = []
    for n in ast.walk(tree):
        if id(n) in docs or id(n) in skipped:
            continue
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            found += [(n.lineno, f"label name {x!r}") for x in names if x in n.value.lower()]
        elif isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) and isinstance(n.operand, ast.Constant) \
                and isinstance(n.operand.value, (int, float)) and n.operand.value >= 100:
            found.append((n.lineno, f"HU-like constant -{n.operand.value}"))
        elif isinstance(n, (ast.Name, ast.Attribute)) and "HU" in (n.id if isinstance(n, ast.Name) else n.attr).split("_"):
            found.append((n.lineno, f"HU name {getattr(n, 'id', None) or n.attr}"))
    return sorted(found)


def test_the_detector_finds_what_it_looks_for():
    """The check below can fail: each kind of name it looks for is found, in code, and not in a docstring."""
    src = ('"""Pleural effusion, -1000 HU: a docstring may say so."""\n'
           'def f(crop, D):\n    """Emphysema."""\n    body = crop > -500\n    return V.AIR_HU, "There is pleural effusion.", -1024.0\n'
           'KEEP = {"Cardiomegaly": ["cardiomegaly"]}\nx = 1 - 1000\ny = -99\na, b = -200, "x"\n')
    assert modality_names(src) == [(4, "HU-like constant -500"), (5, "HU name AIR_HU"), (5, "HU-like constant -1024.0"),
                                   (5, "label name 'pleural effusion'"), (6, "label name 'cardiomegaly'"),
                                   (6, "label name 'cardiomegaly'"), (9, "HU-like constant -200")]  # not lines 1, 3, 7, 8
    assert modality_names(src, skip_assignment="KEEP") == modality_names(src)[:4] + modality_names(src)[6:]  # KEEP's only


def test_no_stage_script_names_a_modality():
    """The recipe's scripts read their modality from the data set (dataset.json, the preset) and the label file, never
    from a name or number of their own: what was chest-specific moved into data.py's presets and the data sets."""
    scripts = sorted(p.name for p in ROOT.glob("*.py"))
    assert sorted(CHECKED + EXEMPT) == scripts, "a new script: add it to CHECKED, or to EXEMPT with the reason"
    found = {f: modality_names((ROOT / f).read_text(), LABEL_DATA.get(f)) for f in CHECKED}
    assert not {f: x for f, x in found.items() if x}, found


def test_intensity_rules_say_what_the_scripts_need():
    """volumes.py's answers for the scripts that draw and score volumes, by hand: CT in HU, MRI on its own scale."""
    assert V.fill_value("chest") == V.AIR_HU and V.fill_value("mri") == 0.0
    np.testing.assert_array_equal(V.empty_input("chest-multi"), [-1, -1, -1, -1])  # air is each window's floor
    np.testing.assert_allclose(V.empty_input([[-1100, 100]]), [-0.5 / 0.6])  # (-1000 - (-500)) / 600
    assert V.empty_input("mri") is None  # no fixed value: maps.py takes the scan's darkest
    ct = np.array([-1000, -850, -501, -499, 40, 700], np.float32)
    assert V.body_mask(ct, "chest").tolist() == [False, False, False, True, True, True]  # lung and air are not body
    mr = np.r_[np.zeros(100), np.full(99, 100.0), [1000.0]]  # padding, tissue, one bright voxel: 99th percentile 100
    assert V.body_mask(mr, "mri").sum() == 100
    assert V.display_window(ct, "chest") == (-1000, 200) and V.display_window(mr, "mri") == (0.0, 100.0)


# ----------------------------------------------------------------------------- the knee set and the recipe on it

@pytest.fixture(scope="module")
def knee(tmp_path_factory):
    """A tiny knee set (8 train / 4 valid / 4 test) built by knee_demo.py's command line, in a fresh working folder."""
    d = tmp_path_factory.mktemp("knee")
    code, out, err = run_script("knee_demo.py", "--out", "data/knee", "--n-train", "8", "--n-valid", "4", "--n-test", "4",
                                "--workers", "1", cwd=d)
    assert code == 0, err[-3000:]
    return d


def rows(folder):
    with open(folder / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_knee_set_is_what_a_fork_provides(knee):
    """Volumes in MR units (no HU: positive, scaled differently per volume) from a sagittal series with thick slices,
    reports, a label file in distill.py's format whose names are the manifest's columns, a preset of its own in
    dataset.json, and a mask on the volume's grid for each finding it draws."""
    d = knee / "data" / "knee"
    names, defs = D.resolve_label_set(str(d / "labels.txt"))
    assert names == ["Joint effusion", "Meniscal tear", "Anterior cruciate ligament tear", "Bone marrow oedema",
                     "Cartilage defect", "Baker cyst"] and all("|" in defs[n] for n in names)  # definition | synonyms
    info = json.loads((d / "dataset.json").read_text())
    assert info["preset"]["intensity"] == "mri" and info["synthetic"] and "vision-lite" in info["train"]
    D.get_preset(info["preset"])  # a valid preset
    table = D.load_table(d)
    assert table.label_names == names and table.splits.count("train") == 8
    peaks = []
    for r in rows(d):
        img = nib.load(d / r["image"])
        v, zooms = np.asanyarray(img.dataobj), np.array(img.header.get_zooms()[:3])
        assert v.dtype == np.int16 and v.min() >= 0 and v.max() > 100  # MR units: no negative HU, no air at -1000
        peaks.append(np.percentile(v, 99))
        slices = nib.aff2axcodes(img.affine)[2]  # sagittal: the last voxel axis runs left-right, 3-4 mm apart
        assert slices in "LR" and 3 <= zooms[2] <= 4 and zooms[0] == zooms[1] <= 1.3
        for n in names:
            f = d / r["masks"] / f"{n.replace(' ', '_')}.nii.gz"
            drawn = r[n] in ("1", "-1")
            assert f.is_file() == drawn, (r["id"], n)
            if drawn:
                m = nib.load(f)
                assert m.shape == img.shape and np.array_equal(m.affine, img.affine) and np.asanyarray(m.dataobj).any()
    assert max(peaks) / min(peaks) > 2  # each volume its own scale, as scanners differ
    text = " ".join(r["report"] for r in rows(d))
    assert "No " in text or "no " in text or "not seen" in text
    assert "knee" in text and "Impression:" in text


def test_the_recipe_runs_on_the_knee_set_unchanged(knee):
    """The README's commands with --data data/knee (distill.py reads --reports), each stage finding the previous one's
    files at its default path; then scan.py with --maps on a knee volume and localise.py against its masks."""
    d, toy = knee, ["--data", "data/knee", "--epochs", "1", "--batch-size", "4", "--workers", "0"]

    def run(script, *args):
        code, out, err = run_script(script, *args, cwd=d)
        assert code == 0, f"{script} {args}:\n{out[-3000:]}\n{err[-3000:]}"
        return out, err

    out, _ = run("distill.py", "--backend", "rules", "--reports", "data/knee", "--labels", "data/knee/labels.txt")
    assert "agreement" in out and (d / "out/distill/labels.csv").is_file()
    out, _ = run("pretrain_vision.py", "--lite", *toy)
    assert "labels: out/distill/labels.csv (6 labels)" in out and "defaults recommended by the data set" in out
    run("pretrain_text.py", "--max-len", "128", *toy)
    out, _ = run("align.py", "--lite", "--max-len", "128", *toy)
    assert "loaded vision encoder: out/vision-lite/best.pt" in out and "loaded text encoder: out/text/best.pt" in out
    aligned = torch.load(d / "out/align-lite/best.pt", weights_only=True)
    assert aligned["model_config"]["vision"]["in_channels"] == 1 and aligned["extra"]["preset"]["intensity"] == "mri"
    out, _ = run("evaluate.py", "--data", "data/knee", "--bootstrap", "20", "--workers", "0")
    summary = json.loads((d / "out/eval/summary.json").read_text())
    assert summary["labels"] == aligned["label_names"] and summary["reference"]["ood"]["fit_volumes"] == 8
    scan = rows(d / "data/knee")[-1]["image"]
    out, err = run("scan.py", f"data/knee/{scan}", "--maps", "maps", "--map-method", "exact")
    assert "Meniscal tear" in out and "distance to the training features" in out and "synthetic phantoms" in out
    assert "not CT Hounsfield units" not in err  # the preset is MR: no HU warning
    assert len(list((d / "maps").glob("*/*.png"))) == 6 and len(list((d / "maps").glob("*/*.nii.gz"))) == 6
    # A chest CT (a demo phantom, in HU) under the knee model: flagged as unlike the knees it was trained on.
    from demo import _demo_case
    nib.save(_demo_case(np.random.default_rng(0), lps=False)[2], d / "chest.nii.gz")
    out, err = run("scan.py", "chest.nii.gz")
    assert "warning: chest.nii.gz: unlike the data the model was trained on" in err, err
    out, _ = run("localise.py", "--data", "data/knee", "--methods", "exact", "--bootstrap", "20")
    res = json.loads((d / "out/localise/localise.json").read_text())
    assert "location prior: " in out and res["all"]["prior_point"]["mean"] is not None
