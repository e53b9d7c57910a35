"""Tests of data.py: labels, manifests, orientation/spacing, bad input, cache, dataset, CT-RATE."""
import csv
import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE

import ctrate
import data
from data import DataError

REAL_CT = SAMPLE / "ct" / "totalseg_chest_ct_cropped_120x126x164_1.5mm.nii.gz"


def save_nifti(path, array, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return str(path)


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


# ------------------------------------------------------------------------------- orientation, spacing
def blob(x, y, z):
    """An asymmetric object in world (RAS, mm) coordinates: a big blob high in z, a small one beside."""
    g = lambda cx, cy, cz, s: np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))  # noqa
    return 1000 * g(8, 12, 22, 4) + 500 * g(14, 6, 12, 3)


def test_orientation_and_spacing(tmp_path):
    n = (20, 24, 32)  # 1 mm voxels, RAS affine: voxel (i, j, k) sits at world (i, j, k)
    ras = blob(*np.meshgrid(*[np.arange(k, dtype=np.float32) for k in n], indexing="ij"))
    lps_affine = np.diag([-1.0, -1, 1, 1])
    lps_affine[:2, 3] = [n[0] - 1, n[1] - 1]  # the same world points, x and y stored flipped
    perm_affine = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])  # stored (z, x, y)
    # 2 mm voxels covering the same space: voxel i spans 1 mm voxels 2i and 2i + 1 (centre 2i + 0.5)
    aff2 = np.diag([2.0, 2, 2, 1])
    aff2[:3, 3] = 0.5
    coarse = blob(*np.meshgrid(*[2 * np.arange(k // 2, dtype=np.float32) + 0.5 for k in n], indexing="ij"))
    files = {"ras": save_nifti(tmp_path / "ras.nii.gz", ras),
             "lps": save_nifti(tmp_path / "lps.nii.gz", ras[::-1, ::-1, :], lps_affine),
             "perm": save_nifti(tmp_path / "perm.nii.gz", ras.transpose(2, 0, 1), perm_affine),
             "2mm": save_nifti(tmp_path / "c.nii.gz", coarse, aff2)}
    ref = data.load_volume(files["ras"], (1, 1, 1))
    assert ref.shape == (32, 24, 20) and ref.dtype == np.float32  # (D, H, W) = (z, y, x)
    np.testing.assert_allclose(ref, ras.transpose(2, 1, 0), atol=1e-3)
    assert np.unravel_index(ref.argmax(), ref.shape) == (22, 12, 8)  # high z -> high D index
    for name in ("lps", "perm"):
        np.testing.assert_allclose(data.load_volume(files[name], (1, 1, 1)), ref, atol=1e-3)
    # Different spacings resample to the same grid.
    down = data.load_volume(files["lps"], (2, 2, 2))
    assert down.shape == (16, 12, 10)
    # within 3% of the peak (1000): trilinear downsampling averages 8 voxels, the 2 mm file samples
    np.testing.assert_allclose(down, data.load_volume(files["2mm"], (2, 2, 2)), atol=30)
    # A manifest spacing overrides the header: claiming 2 mm doubles the grid at 1 mm.
    assert data.load_volume(files["ras"], (1, 1, 1), spacing_in=(2, 2, 2)).shape == (64, 48, 40)


def test_rescale_only_for_v1(tmp_path):
    raw = np.full((4, 4, 4), 1024, np.int16)
    v1 = save_nifti(tmp_path / "train_1_a_1.nii.gz", raw)
    v2 = save_nifti(tmp_path / "train_1_a_1_fixed.nii.gz", raw)
    assert data.is_fixed(v2) and data.is_fixed("x_fixed") and not data.is_fixed(v1)
    assert np.allclose(data.load_volume(v1, (1, 1, 1), rescale=(1, -1024)), 0)
    assert np.allclose(data.load_volume(v2, (1, 1, 1), rescale=(1, -1024)), 1024)  # never twice
    assert np.allclose(data.load_volume(v1, (1, 1, 1)), 1024)


@pytest.mark.skipif(not REAL_CT.exists(), reason=f"sample CT not found at {REAL_CT}")
def test_real_chest_ct():
    vol = data.load_volume(str(REAL_CT), (1.5, 1.5, 1.5))
    assert vol.shape == (164, 126, 120)
    # Canonical orientation of an LPS file: flip x and y, then (x, y, z) -> (z, y, x).
    raw = np.asarray(nib.load(str(REAL_CT)).dataobj)
    np.testing.assert_array_equal(vol, raw[::-1, ::-1, :].transpose(2, 1, 0))
    # HU scale: the lungs (largest connected region of -1000..-500 HU) fill a large part of this
    # chest crop and average about -800 HU (a missing or doubled rescale would move them by 1024).
    from scipy import ndimage
    parts, _ = ndimage.label((vol > -1000) & (vol < -500))
    lung = parts == np.bincount(parts.ravel())[1:].argmax() + 1
    assert lung.mean() > 0.1 and -900 <= vol[lung].mean() <= -700
    stored = data.preprocess_volume(str(REAL_CT), "chest")
    assert stored.shape == (120, 240, 240) and stored.dtype == np.int16
    assert stored[0, 0, 0] == data.AIR_HU  # padded with air: 164 slices of 1.5 mm = 82 of 3 mm


# ------------------------------------------------------------------------------------------ bad input
def test_bad_volumes_raise_dataerror(tmp_path):
    good = save_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 16)))
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(open(good, "rb").read()[:3000])
    cases = {"missing.nii.gz": "not found", "trunc.nii.gz": "cannot read",
             "flat.nii.gz": "3D", "nan.nii.gz": "NaN", "rgb.nii.gz": "3D", "text.nii.gz": "cannot read"}
    save_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32))
    save_nifti(tmp_path / "nan.nii.gz", np.where(np.eye(8)[None] > 0, np.nan, 0).repeat(8, 0).astype(np.float32))
    save_nifti(tmp_path / "rgb.nii.gz", np.zeros((8, 8, 8, 2), np.float32))
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"not a nifti"))
    for name, reason in cases.items():
        with pytest.raises(DataError, match=reason) as e:
            data.load_volume(str(tmp_path / name))
        assert name in str(e.value) and "\n" not in str(e.value)
    data.load_volume(good)  # while the intact file loads
    single = save_nifti(tmp_path / "one.nii.gz", np.zeros((8, 8, 8, 1), np.float32))
    assert data.load_volume(single, (1, 1, 1)).shape == (8, 8, 8)  # a 4D file with one channel is fine


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
    crop, k = data.PRESETS["demo"]["crop"], data.input_channels("demo")  # the demo reads 4 windows
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
    hu = data.preprocess_volume(demo_table.images[1], "demo")
    stored = data.normalize(hu, "chest-multi")
    assert stored.shape == (k, *data.PRESETS["demo"]["size"])
    center = stored[:, 2:26, 8:56, 8:56]  # (4, 28, 64, 64) -> (4, 24, 48, 48)
    np.testing.assert_array_equal(ev[1]["image"].numpy(), center)
    np.testing.assert_array_equal(center[0], data.normalize(hu, "chest")[2:26, 8:56, 8:56])  # the paper's window first
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


def test_pad_or_crop_and_normalize():
    v = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = data.pad_or_crop(v, (4, 3, 2), fill=-5)
    assert out.shape == (4, 3, 2) and (out[0] == -5).all() and (out[1] == v[0, :, 1:3]).all()
    hu = np.array([-2000, -1000, -400, 200, 900], np.float32)
    np.testing.assert_allclose(data.normalize(hu, "chest"), [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(data.normalize(hu, "abdomen"), [-1, -1, -0.4, 0.2, 0.9])
    # Four windows, one row each, worked by hand: [-1000, 200], mediastinal [-160, 240], lung [-1000, -700],
    # calcium/bone [200, 1200]; each clips, then maps its range linearly onto [-1, 1].
    np.testing.assert_allclose(data.normalize(hu, "chest-multi"), [[-1, -1, 0, 1, 1], [-1, -1, -1, 0.8, 1],
                                                                   [-1, -1, 1, 1, 1], [-1, -1, -1, -1, 0.4]])
    assert data.normalize(hu.astype(np.int16), "chest-multi").dtype == np.float32  # the cache holds int16 HU
    assert [data.input_channels(p) for p in ("chest", "abdomen", "mri", "demo")] == [1, 1, 1, 4]
    with pytest.raises(DataError, match="unknown intensity rule 'ct'"):
        data.normalize(hu, "ct")
    data.require_channels({"in_channels": 4}, "demo", "x.pt")
    with pytest.raises(DataError, match="x.pt: a vision encoder for 1 input channel.*preset demo gives 4"):
        data.require_channels({"in_channels": 1}, "demo", "x.pt")
    mri = data.normalize(np.random.default_rng(0).gamma(2, 100, (20, 20, 20)), "mri")
    assert abs(mri.mean()) < 1e-4 and abs(mri.std() - 1) < 1e-3


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
