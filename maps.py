"""Where is it? Maps of the evidence for a finding in a scan: scan.py --maps draws them, localise.py scores them.

The exact map. A finding's zero-shot logit is the image latent's dot product with the prompt pair's difference,
and the image latent is a bias-free projection of the global average of the last ResNet stage's cells f_v (512-d):

    logit = W_proj (1/N sum_v f_v) . (t_pos - t_neg) = 1/N sum_v  f_v . u,    u = W_proj^T (t_pos - t_neg)  (512,)

so the logit taken apart cell by cell, f_v . u, is a map whose mean is the logit itself (exact_map). CAM, Grad-CAM at
the last stage and patch-text similarity all coincide with it here. Its catch is resolution: the last stage has
6 x 12 x 12 cells on the standard chest model, 3 x 6 x 6 on the lite one, 1 x 2 x 2 on the lite demo model.
Three ways to look finer, at a cost:
- gradcam: the logit's gradient, averaged over an earlier stage's cells, weights that stage's channels; the positive
  part of the weighted sum is the map (Selvaraju et al. 2017). At the last stage it is exact_map's positive part.
- occlusion: the logit's drop when a block of the input is replaced by air, block by block, at input resolution;
  one forward pass per block position gives every finding's map at once.
- coarse_to_fine (scan.py's default): occlusion, then blocks half the size only where each finding's coarse map
  peaks; there it equals the finer occlusion map, at about 1.5x the coarse cost instead of 15x.
Which is best is measured, not assumed: docs/maps.md (LayerCAM at an early stage and gradient x input were tried
there and lost to the location prior by 0.4 or more; they are not kept). Maps live on the model's input grid, the preset's centre crop;
to_input takes one back to the scan's own voxels (the inverse of the preprocessing), picture draws one.
"""
import io

import numpy as np
import torch
import torch.nn.functional as F

import data as D
import volumes as V

METHODS = ("exact", "gradcam", "occlusion", "coarse_to_fine")


def directions(model, prompts):
    """prompts (C, 2, 768) -> u (C, 512): each finding's direction in the encoder's feature space, W_proj^T (t+ - t-)."""
    return (prompts[:, 0] - prompts[:, 1]).float() @ model.img_proj.weight.float()


def stage_outputs(vision, x):
    """The stem's and each stage's output for x (1, K, D, H, W): [(1, C, d, h, w)] x 5, last = the pooled stage."""
    outs = [vision.stem(x)]
    for stage in vision.stages:
        outs.append(stage(outs[-1]))
    return outs


@torch.no_grad()
def exact_map(model, x, u):
    """(C, d, h, w): cell v's share f_v . u of each finding's logit; map.mean((1, 2, 3)) is the zero-shot logit."""
    f = stage_outputs(model.vision, x)[-1][0].float()  # (512, d, h, w)
    return torch.einsum("cdhw,kc->kdhw", f, u.float())


def gradcam(model, x, u, stage=3):
    """(C, d, h, w) on stage `stage` (1-4; the stem is 0): ReLU(sum_c w_c A_c) with w_c the logit's gradient w.r.t.
    channel c of that stage's output, averaged over its cells. One backward pass per finding."""
    with torch.enable_grad():
        outs = stage_outputs(model.vision, x)
        acts = outs[stage]  # (1, C_s, d, h, w): later stages are recomputed from it so the gradient reaches it
        logits = outs[-1].mean(dim=(2, 3, 4)) @ u.T.float()  # (1, C): the zero-shot logits
        maps = []
        for k in range(u.shape[0]):
            (g,) = torch.autograd.grad(logits[0, k], acts, retain_graph=k < u.shape[0] - 1)
            maps.append(F.relu((g.mean(dim=(2, 3, 4), keepdim=True) * acts).sum(1))[0].detach())
    return torch.stack(maps)


@torch.no_grad()
def occlusion(model, x, u, air, blocks=4, batch=16, region=None):
    """(C, D, H, W) at input resolution: the mean drop of each finding's logit over the blocks covering a voxel, each
    block (1/blocks of every axis) replaced by `air` (K,) in turn, sliding by half a block. region (D, H, W) bool:
    only the blocks that overlap it, so every voxel inside it gets exactly the value the full pass would give."""
    size = np.array(x.shape[2:])
    blk = np.maximum(1, size // blocks)
    starts = [range(0, max(n - b, 0) + 1, max(1, b // 2)) for n, b in zip(size, blk)]
    score = lambda batch_x: model.vision(batch_x).float() @ u.T.float()  # noqa: E731  (B, C) logits
    base = score(x)[0]
    drop, count = torch.zeros((u.shape[0], *size)), torch.zeros(tuple(size))
    jobs = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    if region is not None:
        jobs = [j for j in jobs if region[tuple(slice(s, s + n) for s, n in zip(j, blk))].any()]
    from tqdm import tqdm  # a chest-preset scan takes a minute or more on a CPU: show it
    for i in tqdm(range(0, len(jobs), batch), desc="occlusion", unit="batch", leave=False, disable=None):
        xs = x.repeat(len(jobs[i:i + batch]), 1, 1, 1, 1)
        sl = [tuple(slice(s, s + n) for s, n in zip(j, blk)) for j in jobs[i:i + batch]]
        for b, s in enumerate(sl):
            xs[(b, slice(None)) + s] = air.view(-1, 1, 1, 1)
        for s, lo in zip(sl, score(xs)):
            drop[(slice(None),) + s] += (base - lo)[:, None, None, None]
            count[s] += 1
    return drop / count.clamp(min=1)


def coarse_to_fine(model, x, u, air, blocks=4):
    """(C, D, H, W): occlusion with `blocks` per axis, then with twice as many, but only over the fine blocks that
    overlap the coarse peak of some finding (the cells where its coarse map is maximal; their union R). Inside R the
    map is the fine occlusion map exactly; outside it the coarse map, clipped to below R's weakest fine value, so the
    peak falls where the fine pass looked (hierarchical perturbation: the fine pass costs about what the coarse one
    does, not the 15x of a full fine pass)."""
    coarse = occlusion(model, x, u, air, blocks)  # (C, D, H, W)
    region = peak_cells(coarse).any(0)  # (D, H, W) R
    fine = occlusion(model, x, u, air, 2 * blocks, region=region.numpy())
    floor = fine[:, region].min(1).values  # (C,)
    return torch.where(region, fine, torch.minimum(coarse, floor[:, None, None, None]))


def peak_cells(m):
    """(C, D, H, W) -> bool (C, D, H, W): each map's maximal voxels (a coarse map is flat over each cell)."""
    top = m.flatten(1).max(1).values[:, None, None, None]
    return m >= top - 1e-6 * top.abs().clamp(min=1e-12)


def make_maps(model, x, prompts, method, preset, blocks=4):
    """The maps of every finding for one scan x (1, K, D, H, W) -> (C, D, H, W) float32 on the input grid (the crop)."""
    u = directions(model, prompts.to(x.device))
    if method == "exact":
        m = exact_map(model, x, u)
    elif method == "gradcam":
        m = gradcam(model, x, u)
    elif method in ("occlusion", "coarse_to_fine"):
        air = V.empty_input(V.get_preset(preset)["intensity"])  # (K,): air in each CT window; None for MRI
        air = x.flatten(2).amin(2)[0] if air is None else torch.tensor(air).float()  # MRI: the scan's darkest value
        m = (occlusion if method == "occlusion" else coarse_to_fine)(model, x, u, air.to(x.device), blocks)
    else:
        raise D.UsageError(f"map method {method!r}: one of {', '.join(METHODS)}")
    if m.shape[1:] != x.shape[2:]:  # cells -> voxels: each cell's value spread over the voxels it pools
        m = F.interpolate(m[None].float(), size=tuple(x.shape[2:]), mode="nearest")[0]
    return m.float().cpu().numpy()


def peak(m):
    """Where a map points: the centroid of its maximal voxels (D, H, W), rounded. A coarse map is flat over each cell
    (and occlusion's over each half block), so the first maximal voxel would be a cell's corner; its centre is meant."""
    top = np.argwhere(m >= m.max() - 1e-6 * max(abs(float(m.max())), 1e-12))
    return tuple(np.rint(top.mean(0)).astype(int))


def crop_affine(grid_affine, resampled_shape, preset):
    """The affine of the model's input grid: grid_affine maps the resampled volume's (x, y, z) = (W, H, D) voxel index
    to RAS mm (volumes.preprocess_volume(grid=True) gives both); the stored volume is its centre pad-or-crop to the
    preset's size, the input its centre crop. -> (4, 4) affine of the crop's (W, H, D) index."""
    p = V.get_preset(preset)
    offset = np.zeros(3)  # (D, H, W): index in the resampled volume of the crop's voxel 0 (negative where padded)
    for shape, size in ((resampled_shape, p["size"]), (p["size"], p["crop"])):
        offset += [(max(n, s) - s) // 2 - max(s - n, 0) // 2 for n, s in zip(shape, size)]
    shift = np.eye(4)
    shift[:3, 3] = offset[::-1]
    return grid_affine @ shift


def to_input(m, affine_crop, in_shape, in_affine):
    """A map m (D, H, W) on the crop grid -> (X, Y, Z) float32 on the scan's own grid: each scan voxel's centre taken to
    the crop grid and the map read there trilinearly (0 outside the crop). One slice at a time: a 512 x 512 x 300 scan's
    coordinates at once would take gigabytes."""
    from scipy.ndimage import map_coordinates
    to_crop = np.linalg.inv(affine_crop) @ in_affine  # scan voxel (i, j, k) -> crop (w, h, d)
    ii, jj = np.meshgrid(np.arange(in_shape[0]), np.arange(in_shape[1]), indexing="ij")
    out = np.zeros(in_shape, np.float32)
    for k in range(in_shape[2]):
        pts = to_crop[:3, :3] @ np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)]) + to_crop[:3, 3:]  # (3, X*Y)
        out[:, :, k] = map_coordinates(m, pts[::-1], order=1, cval=0.0).reshape(in_shape[:2])  # (w, h, d) -> (d, h, w)
    return out


def picture(path, vol, m, spacing, title, window):
    """Axial, coronal and sagittal slices through the map's peak: vol (D, H, W) HU on the crop grid at spacing
    (x, y, z mm), shown in the preset's first window; m (D, H, W) over it. Radiological convention: the patient's
    right on the viewer's left, anterior and superior up."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d, h, w = peak(m)
    lo, hi = window
    top = max(float(m.max()), 1e-6)
    views = [("axial", vol[d][:, ::-1], m[d][:, ::-1], spacing[1] / spacing[0]),  # rows H (anterior up), cols W flipped
             ("coronal", vol[:, h, ::-1], m[:, h, ::-1], spacing[2] / spacing[0]),  # rows D (superior up)
             ("sagittal", vol[:, :, w], m[:, :, w], spacing[2] / spacing[1])]  # rows D, cols H (anterior right)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, img, mm, aspect) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect)
        shown = ax.imshow(np.ma.masked_less_equal(mm, 0.05 * top), cmap="inferno", vmin=0, vmax=top, alpha=0.55,
                          origin="lower", aspect=aspect)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.colorbar(shown, ax=axes, fraction=0.015, label="evidence (logit units)")
    fig.suptitle(title, fontsize=10)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    D.write_atomic(path, png.getvalue())
