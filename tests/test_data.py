"""Tests of data.py: labels, manifests, bad input through the CLI, cache, dataset, CT-RATE. One scan's preprocessing
(orientation, spacing, rescaling, bad volumes, crop, windows) is volumes.py's: tests/test_volumes.py."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_volumes import save_nifti

import ctrate
import data
import volumes
from data import DataError


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    return str(path)


# ------------------------------------------------------------------------------------------- labels
def test_parse_label():
    for text, want in [("1", 1), ("1.0", 1), ("0", 0), (" 0.0 ", 0), ("-1", -1), ("-1.0", -1)]:
        assert data.parse_label(text, "x") == want
    assert np.isnan(data.parse_label("", "x")) and np.isnan(data.parse_label("  ", "x"))
    for bad in ["yes", "2", "0.5", "nan", "True"]:
        with pytest.raises(DataError, match="where.csv row 3"):
            data.parse_label(bad, "where.csv row 3")


def test_targets_and_mask_all_states_and_policies():
    v = np.array([1, 0, -1, np.nan], np.float32)
    expect = {"mask": ([1, 0, 0, 0], [1, 1, 0, 0]), "positive": ([1, 0, 1, 0], [1, 1, 1, 0]),
              "negative": ([1, 0, 0, 0], [1, 1, 1, 0])}
    for policy, (t, m) in expect.items():
        targets, mask = data.targets_and_mask(v, policy)
        assert targets.tolist() == t and mask.tolist() == m and targets.dtype == np.float32
    targets, mask = data.targets_and_mask(np.stack([v, v]))  # (N, C) works too
    assert targets.shape == mask.shape == (2, 4)
    with pytest.raises(ValueError):
        data.targets_and_mask(v, "ignore")


def test_read_labels_and_errors(tmp_path):
    f = write_csv(tmp_path / "labels.csv", ["VolumeName", "A", "B"], [["v1", "1", ""], ["v2", "-1", "0"]])
    ids, names, values = data.read_labels(f)
    assert ids == ["v1", "v2"] and names == ["A", "B"]
    np.testing.assert_array_equal(values, [[1, np.nan], [-1, 0]])
    assert data.read_labels(f, names=["B", "A"])[1] == ["B", "A"]  # returned in the requested order
    cases = [([["v1", "1", "0"], ["v1", "0", "0"]], ["A", "B"], r"labels\.csv row 2: .*duplicate id 'v1'"),
             ([["v1", "1", "0"], ["v2", "yes", "0"]], ["A", "B"], r"labels\.csv row 2 \(id v2\), column 'A'"),
             ([["v1", "1", "0"]], ["A", "C"], r"labels\.csv: label columns: missing \['C'\], unknown \['B'\]")]
    for rows, names, pattern in cases:
        write_csv(f, ["VolumeName", "A", "B"], rows)
        with pytest.raises(DataError, match=pattern) as e:
            data.read_labels(f, names=names)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"missing \[\], unknown \['B'\]"):
        data.read_labels(f, names=["A"])


def test_resolve_label_set(tmp_path):
    assert data.resolve_label_set("chest_ct")[0] == data.CHEST_CT_LABELS and len(data.CHEST_CT_LABELS) == 18
    assert len(data.resolve_label_set("abdomen_ct")[0]) == 30
    txt = tmp_path / "labels.txt"
    txt.write_text("# my labels\nTumor: a mass\n\nCyst\n")
    assert data.resolve_label_set(str(txt)) == (["Tumor", "Cyst"], {"Tumor": "a mass"})
    f = write_csv(tmp_path / "l.csv", ["id", "image", "report", "Tumor"], [])
    assert data.resolve_label_set(f)[0] == ["Tumor"]
    with pytest.raises(DataError):
        data.resolve_label_set("no_such_set")


# ------------------------------------------------------------------------------------------ bad input
def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "data.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_preprocess_cli_reports_failures_without_traceback(tmp_path):
    good = np.random.default_rng(0).integers(-1000, 200, (10, 10, 6)).astype(np.int16)  # not constant: that is refused
    save_nifti(tmp_path / "good.nii.gz", good, np.diag([4.0, 4, 8, 1]))
    save_nifti(tmp_path / "broken.nii.gz", np.full((10, 10, 6), np.nan, np.float32))
    write_csv(tmp_path / "manifest.csv", ["image", "report"], [["good.nii.gz", "ok"], ["broken.nii.gz", "x"]])
    r = run_cli("preprocess", "--data", str(tmp_path), "--preset", "demo", "--workers", "2")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if "broken.nii.gz" in ln]
    assert len(lines) == 1 and "NaN" in lines[0]
    assert (tmp_path / "cache-demo" / "good.npy").exists() and not (tmp_path / "cache-demo" / "broken.npy").exists()
    r = run_cli("preprocess", "--data", str(tmp_path / "nope.csv"))  # bad input: one line, exit 2
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "nope.csv" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_help():
    r = run_cli("--help")
    assert r.returncode == 0 and "preprocess" in r.stdout and "ctrate" in r.stdout and "(D, H, W)" in r.stdout


# ----------------------------------------------------------------------------------- manifest, table
def test_load_table_and_with_labels(tmp_path):
    (tmp_path / "vols").mkdir()
    save_nifti(tmp_path / "vols" / "a.nii.gz", np.zeros((4, 4, 4), np.int16))
    header = ["image", "report", "spacing", "rescale_slope", "rescale_intercept", "Tumor", "Cyst"]
    write_csv(tmp_path / "manifest.csv", header, [["vols/a.nii.gz", "Tumor.", "1,1,2", "1", "-1024", "1", ""],
                                                  ["vols/b.nii.gz", "Cyst.", "", "", "", "0", "-1"]])
    t = data.load_table(tmp_path)
    assert t.ids == ["a", "b"] and t.splits == ["train", "train"] and t.label_names == ["Tumor", "Cyst"]
    assert t.images[0] == str(tmp_path / "vols" / "a.nii.gz") and os.path.exists(t.images[0])
    assert t.meta[0] == {"spacing": (1, 1, 2), "rescale": (1, -1024)} and t.meta[1] == {}
    np.testing.assert_array_equal(t.labels, [[1, np.nan], [0, -1]])
    assert len(t.subset("train")) == 2 and len(t.subset("valid")) == 0
    lab = write_csv(tmp_path / "ref.csv", ["VolumeName", "X"], [["b.nii.gz", "1"], ["a.nii.gz", "0"], ["c", "1"]])
    t2 = t.with_labels(lab)
    assert t2.label_names == ["X"] and t2.labels[:, 0].tolist() == [0, 1] and t2.ids == t.ids
    write_csv(tmp_path / "ref.csv", ["VolumeName", "X"], [["b.nii.gz", "1"]])
    with pytest.raises(DataError, match=r"ref\.csv: no row for 1 .*a"):
        t.with_labels(lab)
    write_csv(tmp_path / "manifest.csv", ["id", "image", "split", "Tumor"], [["a", "x.nii.gz", "valid", "1"],
                                                                             ["a", "y.nii.gz", "test", "0"]])
    with pytest.raises(DataError, match=r"manifest\.csv row 2 \(id a\): duplicate id"):
        data.load_table(tmp_path)
    write_csv(tmp_path / "manifest.csv", ["image", "spacing"], [["x.nii.gz", "1,1"]])
    with pytest.raises(DataError, match=r"row 1 .*'spacing'"):
        data.load_table(tmp_path / "manifest.csv")


# ----------------------------------------------------------------------------------- dataset, cache
@pytest.fixture
def demo_table(tmp_path):
    """Two volumes at the demo spacing (4, 4, 8 mm): one smaller, one larger than the stored size."""
    aff = np.diag([4.0, 4, 8, 1])
    rng = np.random.default_rng(0)
    save_nifti(tmp_path / "small.nii.gz", rng.integers(-1000, 200, (8, 8, 4)).astype(np.int16), aff)
    save_nifti(tmp_path / "large.nii.gz", rng.integers(-1000, 200, (80, 70, 40)).astype(np.int16), aff)
    write_csv(tmp_path / "manifest.csv", ["image", "report", "A"], [["small.nii.gz", "s", "1"],
                                                                     ["large.nii.gz", "l", "-1"]])
    return data.load_table(tmp_path)


def test_dataset_shapes_determinism_and_center(demo_table):
    crop, k = volumes.PRESETS["demo"]["crop"], volumes.input_channels("demo")  # the demo reads 4 windows
    assert k == 4
    train = data.VolumeReportDataset(demo_table, "demo", train=True, seed=3)
    for i in range(2):
        item = train[i]
        assert item["image"].shape == (k, *crop) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert train[1]["targets"].tolist() == [0] and train[1]["mask"].tolist() == [0]  # uncertain masked
    assert train[0]["report"] == "s" and train[0]["id"] == "small" and train[0]["index"] == 0
    a = train[1]["image"]
    assert torch.equal(a, data.VolumeReportDataset(demo_table, "demo", train=True, seed=3)[1]["image"])
    train.set_epoch(1)
    assert not torch.equal(a, train[1]["image"])
    train.set_epoch(0)
    assert torch.equal(a, train[1]["image"])
    ev = data.VolumeReportDataset(demo_table, "demo", train=False)
    hu = volumes.preprocess_volume(demo_table.images[1], "demo")
    stored = volumes.normalize(hu, "chest-multi")
    assert stored.shape == (k, *volumes.PRESETS["demo"]["size"])
    center = stored[:, 2:26, 8:56, 8:56]  # (4, 28, 64, 64) -> (4, 24, 48, 48)
    np.testing.assert_array_equal(ev[1]["image"].numpy(), center)
    np.testing.assert_array_equal(center[0], volumes.normalize(hu, "chest")[2:26, 8:56, 8:56])  # the paper's window first
    batch = torch.utils.data.default_collate([ev[0], ev[1]])  # any sizes stack
    assert batch["image"].shape == (2, k, *crop)
    text_only = data.VolumeReportDataset(demo_table, "demo", train=True, images=False)
    assert "image" not in text_only[0]


def test_cache_used_resumed_and_checked(demo_table, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert data.preprocess_dataset(tmp_path, cache, "demo") == []
    assert json.loads((cache / "preprocess.json").read_text())["size"] == [28, 64, 64]
    assert sorted(os.listdir(cache)) == ["large.npy", "preprocess.json", "small.npy"]
    before = data.VolumeReportDataset(demo_table, "demo", train=False)[1]["image"]
    os.remove(demo_table.images[1])  # from now on only the cache has this volume
    ds = data.VolumeReportDataset(demo_table, "demo", train=False, cache_dir=cache)
    assert torch.equal(ds[1]["image"], before)
    with pytest.raises(DataError, match="not found"):
        data.VolumeReportDataset(demo_table, "demo", train=False)[1]
    capsys.readouterr()
    assert data.preprocess_dataset(tmp_path, cache, "demo") == []  # resume: nothing left to do
    assert "2 already cached" in capsys.readouterr().out
    with pytest.raises(DataError, match="preprocess.json"):
        data.VolumeReportDataset(demo_table, "chest", train=False, cache_dir=cache)
    with pytest.raises(DataError, match="preprocess.json"):
        data.preprocess_dataset(tmp_path, cache, "chest")


# ------------------------------------------------------------------------------------------- CT-RATE
def test_ctrate_manifest(tmp_path):
    vols = tmp_path / "dataset" / "valid"
    (vols / "valid_1" / "valid_1_a").mkdir(parents=True)
    save_nifti(vols / "valid_1" / "valid_1_a" / "valid_1_a_1.nii.gz", np.zeros((4, 4, 4), np.int16))  # v1
    save_nifti(vols / "valid_2_a_1_fixed.nii.gz", np.zeros((4, 4, 4), np.int16))  # v2, flat
    names = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    reports = write_csv(tmp_path / "reports.csv", names, [
        ["valid_1_a_1.nii.gz", "c", "t", "Nodule seen.", "Nodule."],
        ["valid_2_a_1.nii.gz", "c", "t", "Clear lungs.", "Normal."],
        ["valid_3_a_1.nii.gz", "c", "t", "Not downloaded.", ""]])
    rows = [[f"valid_{k}_a_1.nii.gz"] + ["0"] * 18 for k in (1, 2, 3)]
    rows[0][10] = "1"  # Lung nodule
    labels = write_csv(tmp_path / "labels.csv", ["VolumeName"] + data.CHEST_CT_LABELS, rows)
    meta = write_csv(tmp_path / "meta.csv", ["VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept"],
                     [[f"valid_{k}_a_1.nii.gz", "[0.68359375, 0.68359375]", "1.5", "1", "-1024"] for k in (1, 2, 3)])
    out = tmp_path / "ctrate" / "manifest.csv"
    ctrate.ctrate_manifest(reports, labels, tmp_path / "dataset", out, meta)
    t = data.load_table(out)
    assert t.ids == ["valid_1_a_1", "valid_2_a_1"] and t.splits == ["valid", "valid"]
    assert t.reports == ["Nodule seen.\nNodule.", "Clear lungs.\nNormal."]
    assert t.meta[0] == {"spacing": (0.68359375, 0.68359375, 1.5), "rescale": (1, -1024)}
    assert t.meta[1] == {} and t.images[1].endswith("valid_2_a_1_fixed.nii.gz")  # v2: never rescaled
    assert t.label_names == data.CHEST_CT_LABELS and t.labels[0, 9] == 1 and t.labels.sum() == 1
    assert all(os.path.exists(p) for p in t.images)
    write_csv(labels, ["VolumeName"] + data.CHEST_CT_LABELS, rows[:2])
    with pytest.raises(DataError, match=r"labels\.csv: no row for volume valid_3_a_1"):
        ctrate.ctrate_manifest(reports, labels, tmp_path / "dataset", out, meta)
    r = subprocess.run([sys.executable, str(ROOT / "ctrate.py"), "--reports", reports, "--labels", labels, "--volumes",
                        str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "valid_3_a_1" in r.stderr and "Traceback" not in r.stderr


def test_pick_labels_prefers_fresh_distilled_labels(tmp_path, monkeypatch):
    import common  # the stage plumbing picks the labels (moved from data.py with this test)
    monkeypatch.chdir(tmp_path)  # DISTILL_LABELS is relative to where a stage runs
    write_csv(tmp_path / "manifest.csv", ["id", "image", "report", "A"],
              [["a", "a.nii.gz", "r", "1"], ["b", "b.nii.gz", "r", "0"]])
    table = data.load_table(tmp_path)
    assert common.pick_labels(table)[1] == "the manifest label columns"  # nothing distilled yet
    (tmp_path / "out" / "distill").mkdir(parents=True)
    write_csv(tmp_path / common.DISTILL_LABELS, ["id", "A"], [["a", "0"], ["b", "1"]])
    t, used = common.pick_labels(table)
    assert used == common.DISTILL_LABELS and t.labels[:, 0].tolist() == [0, 1]
    # A data set rebuilt after distillation (same ids, new reports): the stale labels are not used silently.
    os.utime(tmp_path / common.DISTILL_LABELS, (1e9, 1e9))
    t, used = common.pick_labels(table)
    assert t.labels[:, 0].tolist() == [1, 0] and "older than" in used and "run distill.py again" in used
    assert common.pick_labels(table, common.DISTILL_LABELS)[0].labels[:, 0].tolist() == [0, 1]  # --labels: as asked
