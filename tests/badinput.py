"""A corpus of bad input, generated on demand for tests/test_faults.py (nothing of it is stored in the repository).

toy_set() writes a small valid data set (NIfTI volumes at the demo preset's spacing, a manifest with reports and
three labels, dataset.json); the other functions write one bad variant each of a volume, a manifest, a label CSV or
a checkpoint, and return its path.
"""
import csv
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = ["A", "B", "C"]
SPACING = (4.0, 4.0, 8.0)  # the demo preset's: no resampling needed


def nifti(path, array, spacing=SPACING):
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([*spacing, 1.0])), str(path))
    return Path(path)


def good_volume(path, seed):
    return nifti(path, np.random.default_rng(seed).integers(-1000, 200, (16, 16, 8)).astype(np.int16))


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return Path(path)


def toy_set(d, n_train=4, n_valid=4):
    """A valid data set in d: manifest.csv (id, image, report, split, A, B, C) + dataset.json -> the manifest rows."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rows = [["id", "image", "report", "split", *LABELS]]
    for i in range(n_train + n_valid):
        split = "train" if i < n_train else "valid"
        good_volume(d / f"v{i}.nii.gz", i)
        values = [str((i + k) % 2) for k in range(len(LABELS))]  # both classes in every split
        report = " ".join(f"There is {n}." if v == "1" else f"No {n}." for n, v in zip(LABELS, values))
        rows.append([f"v{i}", f"v{i}.nii.gz", report, split, *values])
    write_csv(d / "manifest.csv", rows)
    (d / "dataset.json").write_text(json.dumps({"preset": "demo", "text_model": "scratch"}))
    return rows


def bad_volume(path, kind):
    """One bad volume of a kind; 'missing' writes nothing."""
    path = Path(path)
    if kind == "truncated":  # a download cut short: the first 300 bytes of a valid .nii.gz
        good_volume(path, 0)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "not_nifti":
        path.write_bytes(gzip.compress(b"this is not a NIfTI file"))
    elif kind == "2d":
        nifti(path, np.zeros((16, 16), np.int16))
    elif kind == "4d":  # two channels where one is expected
        nifti(path, np.zeros((16, 16, 8, 2), np.int16))
    elif kind in ("nan", "inf"):
        vol = np.random.default_rng(0).normal(-500, 100, (16, 16, 8)).astype(np.float32)
        vol[3, 4, 5] = np.nan if kind == "nan" else np.inf
        nifti(path, vol)
    elif kind == "constant":  # an empty export: every voxel air
        nifti(path, np.full((16, 16, 8), -1024, np.int16))
    else:
        assert kind == "missing", kind
    return path


VOLUME_KINDS = {  # kind -> the words its one-line error must contain
    "truncated": "cannot read NIfTI", "not_nifti": "cannot read NIfTI", "2d": "expected a 3D volume",
    "4d": "expected a 3D volume", "nan": "NaN or infinite", "inf": "NaN or infinite", "constant": "every voxel is -1024",
    "missing": "file not found"}


def with_bad_volume(d, kind, row=1):
    """toy_set in d with the image of manifest row `row` (1 = first train row) replaced by a bad one."""
    rows = toy_set(d)
    rows[row][1] = f"bad_{kind}.nii.gz"
    bad_volume(Path(d) / rows[row][1], kind)
    write_csv(Path(d) / "manifest.csv", rows)
    return Path(d) / rows[row][1]


def label_csv(path, rows, extra_header=(), ids=None):
    """A label CSV for the toy set: ids (default v0..), the rows' label values, optional extra columns."""
    header = ["id", *LABELS, *extra_header]
    body = [[(ids or [f"v{i}" for i in range(len(rows))])[i], *r] for i, r in enumerate(rows)]
    return write_csv(path, [header, *body])
