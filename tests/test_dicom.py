"""DICOM series as input (dicom.py, volumes.load_volume): series written with pydicom at test time, from the shared real
chest CT and from small synthetic volumes, read back to the NIfTI path's tensor; each classic way to get a series wrong
has its documented outcome here (dicom.py's docstring lists them). pacs.py's index and manifest are in test_pacs.py."""
import numpy as np
import nibabel as nib
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLossless, RLELossless, generate_uid

import dicom
import volumes as V
from conftest import SAMPLE
from dicomfake import LPS, read_back, write_localiser, write_series

REAL_CT = SAMPLE / "ct" / "totalseg_chest_ct_cropped_120x126x164_1.5mm.nii.gz"
AFFINE = np.array([[-2.0, 0, 0, 30], [0, -2.5, 0, 40], [0, 0, 3.0, -50], [0, 0, 0, 1]])  # LPS-oriented, like most CT


def phantom(shape=(20, 18, 12), seed=0):
    """A small HU volume (X, Y, Z) whose every voxel differs: any flip, shift or swap of an axis shows."""
    return np.random.default_rng(seed).integers(-1000, 1500, shape).astype(np.int16)


def nifti(tmp_path, vol, affine=AFFINE, name="ref.nii.gz"):
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / name))
    return str(tmp_path / name)


def native(path, affine=AFFINE):
    """load_volume at the volume's own spacing: no interpolation, so a correct reader matches the NIfTI path exactly."""
    return V.load_volume(str(path), tuple(np.abs(np.diag(affine)[:3])))


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.mark.skipif(not REAL_CT.exists(), reason="shared sample data not beside the checkout")
@pytest.mark.parametrize("feet_first", [False, True])
def test_real_ct_series_gives_the_nifti_tensor(tmp_path, capsys, feet_first):
    """The real chest CT as a series: files shuffled, InstanceNumber reversed, a localiser beside it; head-first and
    feet-first. The preprocessed chest tensor is the NIfTI path's, voxel for voxel."""
    img = nib.load(REAL_CT)
    vol = np.asanyarray(img.dataobj)
    z = vol.shape[2]
    order = np.random.default_rng(1).permutation(z)
    study, _ = write_series(tmp_path / "s", vol, img.affine, order=order, instance_numbers=np.arange(z, 0, -1),
                            feet_first=feet_first)
    write_localiser(tmp_path / "s", study)
    want = V.preprocess_volume(str(REAL_CT), "chest")
    got = V.preprocess_volume(str(tmp_path / "s"), "chest")
    assert got.dtype == np.int16 and got.shape == want.shape == (120, 240, 240)
    np.testing.assert_array_equal(got, want)
    err = capsys.readouterr().err
    assert "dropped 1 localiser image(s), kept 164 slices" in err and "gantry tilt" not in err


def test_synthetic_series_head_and_feet_first_match_nifti(tmp_path, capsys):
    vol = phantom()
    ref = native(nifti(tmp_path, vol))
    for name, kw in (("hf", {}), ("ff", {"feet_first": True}),
                     ("shuffled", {"order": np.random.default_rng(0).permutation(12), "instance_numbers": np.arange(12)[::-1]})):
        write_series(tmp_path / name, vol, AFFINE, **kw)
        np.testing.assert_array_equal(native(tmp_path / name), ref, err_msg=name)
        assert capsys.readouterr().err == ""  # a clean series reads without a word
    v, a = dicom.read_series(str(tmp_path / "hf"))  # the hand-off itself: the voxels and the RAS affine written
    np.testing.assert_array_equal(v, vol)
    np.testing.assert_allclose(a, AFFINE, atol=1e-4)


def test_a_ras_stored_volume_reads_the_same(tmp_path):
    """The same anatomy stored RAS (x flipped, y flipped) instead of LPS: reorientation makes them one tensor."""
    vol = phantom()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [(vol.shape[0] - 1), (vol.shape[1] - 1)]
    ras_affine = AFFINE @ flip  # voxel (i, j) -> (X-1-i, Y-1-j) of the LPS-stored one
    write_series(tmp_path / "ras", vol[::-1, ::-1], ras_affine)
    np.testing.assert_array_equal(native(tmp_path / "ras", ras_affine), native(nifti(tmp_path, vol)))


def test_rescale_slope_2_intercept_minus_1024_uint16(tmp_path):
    vol = (phantom() // 2 * 2).astype(np.int16)  # even HU: (HU + 1024) / 2 is a whole stored value
    write_series(tmp_path / "u16", vol, AFFINE, slope=2.0, intercept=-1024.0, stored=np.uint16)
    assert read_back(sorted((tmp_path / "u16").iterdir())[0]).PixelRepresentation == 0  # really unsigned on disk
    np.testing.assert_array_equal(native(tmp_path / "u16"), native(nifti(tmp_path, vol)))


def test_localiser_with_the_series_own_uid_and_another_orientation_are_dropped(tmp_path, capsys):
    vol = phantom()
    _, series = write_series(tmp_path / "s", vol, AFFINE)
    study = read_back(sorted((tmp_path / "s").iterdir())[0]).StudyInstanceUID
    write_localiser(tmp_path / "s", study, series_uid=series)  # same UID, ImageType ...\LOCALIZER
    d = read_back(sorted((tmp_path / "s").iterdir())[3])  # a sagittal image slipped into the series (no LOCALIZER)
    d.ImageOrientationPatient, d.SOPInstanceUID = [0, 1, 0, 0, 0, -1], generate_uid()
    d.save_as(tmp_path / "s" / "sagittal.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(native(tmp_path / "s"), native(nifti(tmp_path, vol)))
    assert "dropped 1 localiser, 1 another orientation image(s), kept 12 slices" in capsys.readouterr().err


def test_two_series_in_one_folder_are_listed_and_one_is_picked(tmp_path):
    vol = phantom()
    _, lung = write_series(tmp_path / "st", vol, AFFINE, description="LUNG 1.0", kernel="B70f", name="a")
    _, soft = write_series(tmp_path / "st", vol + 7, AFFINE, description="MEDIASTINUM", kernel="B30f", name="b")
    with pytest.raises(V.DataError) as e:
        native(tmp_path / "st")
    lines = str(e.value).splitlines()
    assert "2 series in one folder" in lines[0] and "::SeriesInstanceUID" in lines[0] and len(lines) == 3
    for uid, desc, kernel in ((lung, "LUNG 1.0", "B70f"), (soft, "MEDIASTINUM", "B30f")):
        line = next(ln for ln in lines if uid in ln)
        assert desc in line and "12 images" in line and "pixel spacing 2.5x2 mm" in line and kernel in line
    ref = native(nifti(tmp_path, vol))
    np.testing.assert_array_equal(native(f"{tmp_path / 'st'}::{lung}"), ref)
    np.testing.assert_array_equal(native(f"{tmp_path / 'st'}::{soft}"), ref + 7)
    with pytest.raises(V.DataError, match="no image series 1.2.3"):
        native(f"{tmp_path / 'st'}::1.2.3")


def test_a_missing_slice_is_refused_naming_the_gap(tmp_path):
    write_series(tmp_path / "s", phantom(), AFFINE)
    (tmp_path / "s" / "img0005.dcm").unlink()  # slice 5, at z = -50 + 5 * 3 = -35 mm
    with pytest.raises(V.DataError) as e:
        native(tmp_path / "s")
    msg = one_line(e)
    assert "a gap of 6.00 mm between the slices at -38.00 and -32.00 mm" in msg and "median step 3.00 mm" in msg


def test_irregular_steps_are_resampled_onto_the_median_step(tmp_path, capsys):
    """Positions jittered by up to 0.4 of a step; HU linear in z, which linear interpolation reproduces exactly."""
    z = -50 + 3.0 * np.arange(12) + np.r_[0, np.random.default_rng(2).uniform(-1.2, 1.2, 10), 0]
    vol = np.broadcast_to(np.rint(10 * z).astype(np.int16), (20, 18, 12)).copy()  # HU = 10 * z mm
    pos = (LPS @ AFFINE @ np.c_[np.zeros((12, 3)), np.ones(12)].T).T[:, :3]
    pos[:, 2] = z
    write_series(tmp_path / "s", vol, AFFINE, positions=pos)
    got = native(tmp_path / "s")  # (D, H, W): D from -50 to -17 mm every 3 mm
    assert got.shape == (12, 18, 20)
    np.testing.assert_allclose(got[:, 0, 0], 10 * (-50 + 3.0 * np.arange(12)), atol=0.51)  # int16 rounding
    assert "irregular slice steps" in capsys.readouterr().err


def test_gantry_tilt_is_resampled_exactly_onto_the_patient_axes(tmp_path, capsys):
    """A 20-degree tilt: each slice tilted about x, positions stepping along z. HU is linear in world y and z, so exact
    trilinear resampling reproduces it wherever the tilted grid covers the output; dropping the shear would not."""
    t = np.radians(20)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = [2, 0, 0], [0, 2 * np.cos(t), 2 * np.sin(t)], [0, 0, 3]  # RAS, sheared
    affine[:3, 3] = [-20, -20, -30]
    ijk = np.stack(np.meshgrid(np.arange(16), np.arange(24), np.arange(20), indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]  # (X, Y, Z, 3) RAS mm of each stored voxel
    hu = lambda w: 4 * w[..., 1] + 6 * w[..., 2]  # noqa: E731
    write_series(tmp_path / "s", np.rint(hu(world)).astype(np.int16), affine)
    got = V.load_volume(str(tmp_path / "s"), (2.0, 2.0, 2.0))  # (D, H, W) on the patient's axes
    assert "gantry tilt of 20.0 degrees" in capsys.readouterr().err
    corners = np.stack(np.meshgrid(*[[-0.5, n - 0.5] for n in (16, 24, 20)], indexing="ij")).reshape(3, -1)
    lo = (affine[:3, :3] @ corners + affine[:3, 3:]).min(1)  # the output grid: the box around the tilted volume
    d, h, w = np.meshgrid(*[np.arange(n) for n in got.shape], indexing="ij")
    out_world = np.stack([lo[0] + (w + .5) * 2, lo[1] + (h + .5) * 2, lo[2] + (d + .5) * 2], -1)
    src = (out_world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T  # where each output voxel lies in the stored grid
    inside = ((src >= 0) & (src <= np.array([15, 23, 19]))).all(-1)
    assert inside.sum() > 0.3 * inside.size
    np.testing.assert_allclose(got[inside], hu(out_world)[inside], atol=0.6)  # rounding of the stored HU
    sheared = dicom.read_series(str(tmp_path / "s"))[1]
    np.testing.assert_allclose(sheared, affine, atol=1e-4)  # the shear is in the hand-off, not dropped


def test_compressed_pixel_data(tmp_path):
    """RLE decodes with numpy alone (same tensor); JPEG Lossless without a plugin is refused, naming the plugin."""
    vol = phantom()
    write_series(tmp_path / "rle", vol, AFFINE)
    for f in (tmp_path / "rle").iterdir():
        d = pydicom.dcmread(f)
        d.compress(RLELossless)
        d.save_as(f, enforce_file_format=True)
    assert pydicom.dcmread(next((tmp_path / "rle").iterdir())).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(native(tmp_path / "rle"), native(nifti(tmp_path, vol)))
    if pydicom.pixels.get_decoder(JPEGLossless).is_available:
        pytest.skip("a JPEG Lossless plugin is installed here: the refusal cannot be shown")
    write_series(tmp_path / "jpeg", vol, AFFINE)
    for f in (tmp_path / "jpeg").iterdir():  # headers as a JPEG Lossless export has them; the bitstream never decoded
        d = pydicom.dcmread(f)
        d.file_meta.TransferSyntaxUID = JPEGLossless
        d.PixelData = encapsulate([b"\xff\xd8 not a real bitstream \xff\xd9"])
        d["PixelData"].VR = "OB"
        d.save_as(f, enforce_file_format=True)
    with pytest.raises(V.DataError) as e:
        native(tmp_path / "jpeg")
    msg = one_line(e)
    assert "JPEG Lossless" in msg and "pip install pylibjpeg pylibjpeg-libjpeg" in msg


def test_unreadable_files(tmp_path, capsys):
    """A truncated stray file and a text file are skipped with a count; a slice whose pixels are cut short is refused."""
    vol = phantom()
    write_series(tmp_path / "s", vol, AFFINE)
    good = (tmp_path / "s" / "img0000.dcm").read_bytes()
    (tmp_path / "s" / "broken.dcm").write_bytes(good[:300])
    (tmp_path / "s" / "notes.txt").write_text("exported by PACS\n")
    np.testing.assert_array_equal(native(tmp_path / "s"), native(nifti(tmp_path, vol)))
    err = capsys.readouterr().err
    assert "skipped 1 unreadable file(s) (e.g." in err and "broken.dcm" in err and "and 1 that are not DICOM" in err
    (tmp_path / "s" / "img0004.dcm").write_bytes((tmp_path / "s" / "img0004.dcm").read_bytes()[:-100])
    with pytest.raises(V.DataError) as e:
        native(tmp_path / "s")
    assert "img0004.dcm" in one_line(e)


def test_enhanced_multiframe_is_refused_in_one_line(tmp_path):
    write_series(tmp_path / "s", phantom(), AFFINE)
    for f in (tmp_path / "s").iterdir():
        d = pydicom.dcmread(f)
        d.SOPClassUID = d.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
        d.NumberOfFrames = 1
        d.save_as(f, enforce_file_format=True)
    with pytest.raises(V.DataError) as e:
        native(tmp_path / "s")
    assert "enhanced multi-frame" in one_line(e) and "not supported" in str(e.value)


def test_other_failures_each_one_line(tmp_path, capsys):
    vol = phantom()
    write_series(tmp_path / "mr", vol, AFFINE, modality="MR")
    V.preprocess_volume(str(tmp_path / "mr"), "demo")  # a CT preset: warned, processed
    assert "modality MR, not CT" in capsys.readouterr().err
    V.preprocess_volume(str(tmp_path / "mr"), "mri")
    assert "modality" not in capsys.readouterr().err  # the MRI preset expects no modality
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    for path, words in ((tmp_path / "empty", "no DICOM image series"), (tmp_path / "nowhere", "file not found")):
        with pytest.raises(V.DataError) as e:
            native(path)
        assert words in one_line(e)
    write_series(tmp_path / "dup", vol, AFFINE)
    d = read_back(tmp_path / "dup" / "img0003.dcm")
    d.SOPInstanceUID = generate_uid()
    d.save_as(tmp_path / "dup" / "again.dcm", enforce_file_format=True)  # two images at one position
    with pytest.raises(V.DataError) as e:
        native(tmp_path / "dup")
    assert "share slice positions" in one_line(e)
    with pytest.raises(V.DataError) as e:  # a manifest's rescale cells would rescale a second time
        V.load_volume(str(tmp_path / "mr"), rescale=(1, -1024))
    assert "leave the manifest's spacing and rescale cells empty" in one_line(e)


def test_exact_resampling_equals_the_reorienting_path_on_an_axis_aligned_grid(tmp_path):
    """resample_exact is used for rotated and sheared grids; on a plain grid it must agree with the usual path, and so
    must the affine of the grid each returns (where maps.py puts a map back)."""
    import torch
    vol = phantom((16, 12, 10)).astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(vol.T))
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    got, grid = dicom.resample_exact(t, affine, np.array([2.0, 2.0, 2.0]), -1000.0)
    got = got.numpy()
    _, grid_usual = V.load_volume(nifti(tmp_path, vol.astype(np.int16), affine), (2.0, 2.0, 2.0), grid=True)
    np.testing.assert_allclose(grid, grid_usual, atol=1e-9)
    np.testing.assert_allclose(grid[:3, 3], [0.5, 0.5, 0.0])  # voxel 0 of the 2 mm grid: the centre of 2 input voxels
    want = torch.nn.functional.interpolate(t[None, None], size=(10, 6, 8), mode="trilinear", align_corners=False)[0, 0]
    assert got.shape == (10, 6, 8)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-3)
