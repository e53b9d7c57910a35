"""Tests of volumes.py: one scan read once (a NIfTI file here; DICOM series in test_dicom.py), orientation and spacing,
rescaling, bad input, the stored volume, crop and intensity windows."""
import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import SAMPLE

import volumes as V
from volumes import DataError

REAL_CT = SAMPLE / "ct" / "totalseg_chest_ct_cropped_120x126x164_1.5mm.nii.gz"


def save_nifti(path, array, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return str(path)


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
    ref = V.load_volume(files["ras"], (1, 1, 1))
    assert ref.shape == (32, 24, 20) and ref.dtype == np.float32  # (D, H, W) = (z, y, x)
    np.testing.assert_allclose(ref, ras.transpose(2, 1, 0), atol=1e-3)
    assert np.unravel_index(ref.argmax(), ref.shape) == (22, 12, 8)  # high z -> high D index
    for name in ("lps", "perm"):
        np.testing.assert_allclose(V.load_volume(files[name], (1, 1, 1)), ref, atol=1e-3)
    # Different spacings resample to the same grid.
    down = V.load_volume(files["lps"], (2, 2, 2))
    assert down.shape == (16, 12, 10)
    # within 3% of the peak (1000): trilinear downsampling averages 8 voxels, the 2 mm file samples
    np.testing.assert_allclose(down, V.load_volume(files["2mm"], (2, 2, 2)), atol=30)
    # A manifest spacing overrides the header: claiming 2 mm doubles the grid at 1 mm.
    assert V.load_volume(files["ras"], (1, 1, 1), spacing_in=(2, 2, 2)).shape == (64, 48, 40)


def test_rescale_only_for_v1(tmp_path):
    raw = np.full((4, 4, 4), 1024, np.int16)
    v1 = save_nifti(tmp_path / "train_1_a_1.nii.gz", raw)
    v2 = save_nifti(tmp_path / "train_1_a_1_fixed.nii.gz", raw)
    assert V.is_fixed(v2) and V.is_fixed("x_fixed") and not V.is_fixed(v1)
    assert np.allclose(V.load_volume(v1, (1, 1, 1), rescale=(1, -1024)), 0)
    assert np.allclose(V.load_volume(v2, (1, 1, 1), rescale=(1, -1024)), 1024)  # never twice
    assert np.allclose(V.load_volume(v1, (1, 1, 1)), 1024)


@pytest.mark.skipif(not REAL_CT.exists(), reason=f"sample CT not found at {REAL_CT}")
def test_real_chest_ct():
    vol = V.load_volume(str(REAL_CT), (1.5, 1.5, 1.5))
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
    stored = V.preprocess_volume(str(REAL_CT), "chest")
    assert stored.shape == (120, 240, 240) and stored.dtype == np.int16
    assert stored[0, 0, 0] == V.AIR_HU  # padded with air: 164 slices of 1.5 mm = 82 of 3 mm


# ------------------------------------------------------------------------------------------ one read
def test_a_scan_is_read_once_and_handed_on(tmp_path, monkeypatch):
    """A Scan holds its grid from the header alone and reads its voxels when first asked, once; load_volume and
    preprocess_volume take it as they take the path, and give the same arrays (grid=True: where the voxels lie)."""
    from nibabel.arrayproxy import ArrayProxy
    rng = np.random.default_rng(0)
    affine = np.diag([-4.0, -4, 8, 1])
    affine[:3, 3] = [60, 50, -40]
    path = save_nifti(tmp_path / "ct.nii.gz", rng.integers(-1000, 400, (20, 18, 6)).astype(np.int16), affine)
    reads, real = [], ArrayProxy.__array__
    monkeypatch.setattr(ArrayProxy, "__array__", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    scan = V.Scan(path, "CT")
    assert scan.shape == (20, 18, 6) and np.array_equal(scan.affine, affine) and reads == []  # the header alone
    stored, grid, shape = V.preprocess_volume(scan, "demo", grid=True)
    vol, grid_again = V.load_volume(scan, V.PRESETS["demo"]["spacing"], grid=True)
    assert len(reads) == 1 and scan.voxels.dtype == np.int16  # both from the one read
    np.testing.assert_array_equal(stored, V.preprocess_volume(path, "demo"))  # a path: read afresh, the same array
    np.testing.assert_array_equal(vol, V.load_volume(path, V.PRESETS["demo"]["spacing"]))
    assert shape == vol.shape == (6, 18, 20) and np.array_equal(grid, grid_again) and stored.shape == (28, 64, 64)
    x = V.model_input(stored, "demo")  # the center crop, 4 windows
    np.testing.assert_array_equal(x, V.normalize(stored, "chest-multi")[:, 2:26, 8:56, 8:56])


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
            V.load_volume(str(tmp_path / name))
        assert name in str(e.value) and "\n" not in str(e.value)
    V.load_volume(good)  # while the intact file loads
    single = save_nifti(tmp_path / "one.nii.gz", np.zeros((8, 8, 8, 1), np.float32))
    assert V.load_volume(single, (1, 1, 1)).shape == (8, 8, 8)  # a 4D file with one channel is fine


# ------------------------------------------------------------------------------------ crop, windows
def test_pad_or_crop_and_normalize():
    v = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = V.pad_or_crop(v, (4, 3, 2), fill=-5)
    assert out.shape == (4, 3, 2) and (out[0] == -5).all() and (out[1] == v[0, :, 1:3]).all()
    hu = np.array([-2000, -1000, -400, 200, 900], np.float32)
    np.testing.assert_allclose(V.normalize(hu, "chest"), [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(V.normalize(hu, "abdomen"), [-1, -1, -0.4, 0.2, 0.9])
    # Four windows, one row each, worked by hand: [-1000, 200], mediastinal [-160, 240], lung [-1000, -700],
    # calcium/bone [200, 1200]; each clips, then maps its range linearly onto [-1, 1].
    np.testing.assert_allclose(V.normalize(hu, "chest-multi"), [[-1, -1, 0, 1, 1], [-1, -1, -1, 0.8, 1],
                                                                [-1, -1, 1, 1, 1], [-1, -1, -1, -1, 0.4]])
    assert V.normalize(hu.astype(np.int16), "chest-multi").dtype == np.float32  # the cache holds int16 HU
    assert [V.input_channels(p) for p in ("chest", "abdomen", "mri", "demo")] == [1, 1, 1, 4]
    with pytest.raises(DataError, match="unknown intensity rule 'ct'"):
        V.normalize(hu, "ct")
    V.require_channels({"in_channels": 4}, "demo", "x.pt")
    with pytest.raises(DataError, match="x.pt: a vision encoder for 1 input channel.*preset demo gives 4"):
        V.require_channels({"in_channels": 1}, "demo", "x.pt")
    mri = V.normalize(np.random.default_rng(0).gamma(2, 100, (20, 20, 20)), "mri")
    assert abs(mri.mean()) < 1e-4 and abs(mri.std() - 1) < 1e-3
