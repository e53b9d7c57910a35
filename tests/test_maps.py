"""maps.py: the exact last-stage map is the zero-shot logit taken apart (its mean is the logit); Grad-CAM at the last
stage is its positive part; a map goes back onto the scan's own grid
through the inverse of the preprocessing (NIfTI, oblique NIfTI, DICOM); scan.py --maps writes a map with the input's
shape and affine, and a picture; localise.py refuses a mask on another grid in one line. That a map follows a
finding that moves needs a trained encoder: tests/test_trust.py has one."""
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

import checkpoints
import data as D
import maps
import model as M
import volumes as V
from conftest import run_script


def toy_model(k=4, seed=0):
    """A random-weights aligned model at toy width (eval mode), with a scratch text encoder: the identities below hold
    for any weights."""
    torch.manual_seed(seed)
    text, _, text_cfg = M.build_text("scratch", ["there is a finding", "no finding"], max_len=16)
    cfg = {"kind": "align", "num_labels": 3, "embed_dim": 32, "text": text_cfg,
           "vision": {"in_channels": k, "stem": 4, "widths": [8, 16, 16, 16]}}
    return M.build_model(cfg).eval(), cfg


def test_exact_map_is_the_logit_taken_apart():
    model, _ = toy_model()
    x = torch.randn(1, 4, 24, 48, 48)
    prompts = torch.randn(3, 2, 32)
    u = maps.directions(model, prompts)
    m = maps.exact_map(model, x, u)  # (3, 1, 2, 2): the lite demo's last stage
    assert m.shape == (3, 1, 2, 2)
    with torch.no_grad():
        logits = M.zero_shot_logits(model.encode_image(x), prompts)[0]
    torch.testing.assert_close(m.mean(dim=(1, 2, 3)), logits, rtol=1e-4, atol=1e-4)
    # Grad-CAM at the last stage: the gradient of a mean is 1/N per cell, so its map is exact_map's positive part / N.
    g = maps.gradcam(model, x, u, stage=4)
    torch.testing.assert_close(g, torch.relu(m) / m[0].numel(), rtol=1e-4, atol=1e-5)


def test_coarse_to_fine_equals_full_occlusion_where_it_refines():
    """Inside the refined region R the coarse-to-fine map is the full fine occlusion map (every fine block that covers
    a voxel of R overlaps R, so it was computed); outside R it never exceeds R's weakest value, so the peak lies in R;
    and it costs fewer forward passes than the full fine pass."""
    model, _ = toy_model()
    x, u, air = torch.randn(1, 4, 8, 16, 16), maps.directions(model, torch.randn(3, 2, 32)), torch.full((4,), -1.0)
    calls = []
    forward = model.vision.forward
    model.vision.forward = lambda xs: calls.append(len(xs)) or forward(xs)
    full = maps.occlusion(model, x, u, air, blocks=4)  # (3, 8, 16, 16): 343 block positions
    n_full = sum(calls)
    calls.clear()
    got = maps.coarse_to_fine(model, x, u, air, blocks=2)  # 27 coarse positions, then some of the 343
    n_c2f = sum(calls)
    coarse = maps.occlusion(model, x, u, air, blocks=2)
    region = maps.peak_cells(coarse).any(0)
    assert all(region[maps.peak(c.numpy())] for c in coarse)  # each finding's coarse peak is refined
    assert 0 < region.sum() < region.numel()
    torch.testing.assert_close(got[:, region], full[:, region])
    assert (got[:, ~region].max(1).values <= got[:, region].min(1).values + 1e-6).all()
    for k in range(3):
        assert region[maps.peak(got[k].numpy())]
    assert n_full == 1 + 343 and n_c2f < n_full  # the coarse pass (1 + 27) and part of the fine one, not all of it


@pytest.mark.parametrize("kind", ["lps", "ras", "oblique"])
def test_a_map_goes_back_onto_the_scan_grid(tmp_path, kind):
    """The inverse of the preprocessing: the crop the model saw, taken back onto the scan's own voxels, is the scan
    again (where the crop covers it), for an LPS and a RAS file and an oblique one (resampled exactly)."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(np.arange(30), np.arange(40), np.arange(36), indexing="ij")
    vol = (5 * x + 3 * y - 4 * z).T.astype(np.int16)  # (X, Y, Z) HU linear in the voxel index: trilinear is exact
    a = np.diag([-3.0, -3.0, 5.0, 1.0]) if kind == "lps" else np.diag([3.0, 3.0, 5.0, 1.0])
    if kind == "oblique":
        t = np.radians(8)
        a = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]) @ a
    a[:3, 3] = rng.uniform(-50, 50, 3)
    nib.save(nib.Nifti1Image(vol, a), str(tmp_path / "v.nii.gz"))
    preset = {"spacing": [3.0, 3.0, 5.0], "size": [24, 36, 36], "crop": [20, 30, 30], "intensity": [[-1000, 200]]}
    p = V.get_preset(preset)
    res, grid = V.load_volume(str(tmp_path / "v.nii.gz"), p["spacing"], grid=True)
    crop = V.pad_or_crop(V.pad_or_crop(res, p["size"]), p["crop"]).astype(np.float32)
    back = maps.to_input(crop, maps.crop_affine(grid, res.shape, preset), vol.shape, a)  # (X, Y, Z)
    inside = back != 0
    inside[[0, -1]] = inside[:, [0, -1]] = inside[:, :, [0, -1]] = False  # the crop's edge voxels blend with outside
    assert inside.sum() > 0.3 * vol.size
    np.testing.assert_allclose(back[inside], vol[inside], atol=2.5 if kind == "oblique" else 0.05)


def test_scan_maps_have_the_input_shape_and_affine(tmp_path):
    from demo import make_demo
    make_demo(tmp_path / "demo", n_train=2, n_valid=1, n_test=1, seed=0)
    table = D.load_table(tmp_path / "demo")
    model, cfg = toy_model()
    cfg = dict(cfg, num_labels=len(table.label_names), embed_dim=768)
    torch.manual_seed(0)
    model = M.build_model(cfg)
    checkpoints.save_checkpoint(tmp_path / "a.pt", stage="align", model=model, model_config=cfg, args={},
                                label_names=table.label_names, extra={"preset": "demo"})
    scan = table.images[-1]
    code, out, err = run_script("scan.py", scan, "--ckpt", tmp_path / "a.pt", "--findings", "pleural effusion, pneumothorax",
                                "--maps", tmp_path / "maps", "--map-method", "exact", cwd=tmp_path)  # in this process
    assert code == 0, err[-2000:]
    r = SimpleNamespace(stdout=out)
    src = nib.load(scan)
    for f in ("pleural_effusion", "pneumothorax"):
        m = nib.load(tmp_path / "maps" / "demo_test_0001" / f"{f}.nii.gz")
        assert m.shape == src.shape and np.allclose(m.affine, src.affine)
        assert np.isfinite(m.get_fdata()).all() and np.abs(m.get_fdata()).max() > 0
        assert (tmp_path / "maps" / "demo_test_0001" / f"{f}.png").stat().st_size > 10000
    assert "maps (exact):" in r.stdout


def test_a_mask_on_another_grid_is_refused(tmp_path):
    import localise
    vol = np.zeros((10, 12, 8), np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2, 4, 1])), str(tmp_path / "scan.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((10, 12, 8), np.uint8), np.diag([2.0, 2, 5, 1])), str(tmp_path / "mask.nii.gz"))
    with pytest.raises(D.DataError) as e:
        localise.mask_on_crop(str(tmp_path / "mask.nii.gz"), str(tmp_path / "scan.nii.gz"), "demo")
    assert "another grid than its scan" in str(e.value) and "\n" not in str(e.value)
