"""How far scan.py's out-of-distribution check sees: feature distances of the demo's test volumes and of inputs a model
should not be trusted on, against the cut-off evaluate.py wrote beside the checkpoint.

    python evaluate.py                      # first: writes out/align-lite/best.features.npz (and the operating points)
    python benchmarks/trust.py --ckpt out/align-lite/best.pt --n 50

The inputs, each made from the first --n demo test volumes (or, for the abdomen, built beside them):
  test          the demo test volumes themselves (should almost never be flagged)
  raw units     stored values 0-4095 never rescaled: HU + 1024, as a uint16 export without RescaleIntercept
  head to feet  the voxels flipped along the body's long axis, the affine kept: the patient upside down
  abdomen       an abdominal phantom (no lungs: liver, spleen, kidneys, spine, bowel gas) under the chest-style preset
  noise         uniform noise in [-1000, 1000] HU in the volume's own geometry
  real CT       the shared real chest CT (../shared/greenrfm-sample-data/ct/), if present
  <name>        with --other: another data set's first --n test volumes, read under this model's preset (a second
                modality: knees for a chest model, chest CT for a knee model)
raw units and abdomen are made in HU, so only for a model whose preset is CT; an MRI model gets the others.
Prints the share beyond the cut-off, nearer flipped, and flagged (either), with the distances; figures: docs/trust.md.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402
import data as D  # noqa: E402
import metrics  # noqa: E402

REAL_CT = ROOT.parent / "shared" / "greenrfm-sample-data" / "ct" / "totalseg_chest_ct_cropped_120x126x164_1.5mm.nii.gz"


def abdomen_phantom(shape, affine, rng):
    """An abdomen in HU on the grid (shape, RAS affine): fat-rimmed body, liver (right), spleen (left), kidneys, aorta,
    a vertebra, a few pockets of bowel gas, and no lung: what a chest model has never seen, built from anatomy."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    w = ijk @ affine[:3, :3].T + affine[:3, 3]  # (X, Y, Z, 3) RAS mm
    c = w.reshape(-1, 3).mean(0)  # the field of view's centre
    x, y, z = (w[..., a] - c[a] for a in range(3))
    ell = lambda cx, cy, rx, ry: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1  # noqa: E731  a column along z
    v = np.full(shape, -1000.0)
    v[ell(0, 0, 160, 120)] = -100  # subcutaneous fat
    v[ell(0, 0, 145, 105)] = 40  # muscle and bowel wall
    v[ell(-70, 10, 75, 65) & (z > -40)] = 60  # liver (the patient's right: -x in RAS)
    v[ell(85, -10, 35, 45) & (z > 0)] = 50  # spleen
    for side in (-1, 1):
        v[ell(side * 55, -55, 25, 35) & (np.abs(z + 20) < 55)] = 30  # kidneys
    v[ell(15, -35, 12, 12)] = 45  # aorta
    v[ell(0, -75, 22, 20)] = 700  # vertebral body
    for _ in range(12):  # bowel gas
        gx, gy, gz = rng.uniform(-80, 80), rng.uniform(-40, 70), rng.uniform(-120, 60)
        v[(x - gx) ** 2 + (y - gy) ** 2 + (z - gz) ** 2 <= rng.uniform(8, 18) ** 2] = -950
    return (v + rng.normal(0, 12, shape)).astype(np.int16)


def inputs(table, n, folder, seed=0, ct=True):
    """{name: [NIfTI paths]} of the inputs the docstring lists, written into folder; ct=False (an MRI model): without
    raw units and the abdomen, which are defined in HU."""
    kinds = ["test", "raw units", "head to feet", "abdomen", "noise"] if ct else ["test", "head to feet", "noise"]
    rng, out = np.random.default_rng(seed), {k: [] for k in kinds}
    for i, path in enumerate(table.images[:n]):
        img = nib.load(path)
        hu, a = np.asanyarray(img.dataobj).astype(np.int16), img.affine
        long_axis = int(np.abs(a[:3, :3])[2].argmax())  # the voxel axis that runs along z (superior)
        made = {"raw units": (hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16),
                "head to feet": np.flip(hu, long_axis), "abdomen": abdomen_phantom(hu.shape, a, rng),
                "noise": rng.uniform(-1000, 1000, hu.shape).astype(np.int16)}
        out["test"].append(path)
        for k, v in made.items():
            if k not in out:
                continue
            f = Path(folder) / f"{k.replace(' ', '_')}_{i:03d}.nii.gz"
            nib.save(nib.Nifti1Image(v, a), str(f))
            out[k].append(str(f))
    if REAL_CT.exists():
        out["real CT"] = [str(REAL_CT)]
    return out


@torch.no_grad()
def distances(model, preset, paths, features):
    """Each path through the evaluation preprocessing (centre crop) -> Mahalanobis distances (N,) as given and flipped
    head to feet (N,): scan.py's trust_check, which flags a scan beyond the cut-off or nearer when flipped."""
    n = len(paths)
    t = D.Table(ids=paths, images=paths, reports=[""] * n, splits=["x"] * n, label_names=[], labels=np.zeros((n, 0)),
                meta=[{}] * n)
    ds = D.VolumeReportDataset(t, preset, train=False)
    x = [ds[i]["image"][None] for i in range(n)]  # (1, K, D, H, W) each
    d = [metrics.mahalanobis(np.stack([model.vision(v).float()[0].numpy() for v in vs]), features["mean"], features["precision"])
         for vs in (x, [torch.flip(v, dims=[2]) for v in x])]
    return d[0], d[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=D.HelpFormatter)
    p.add_argument("--ckpt", default="out/align-lite/best.pt", help="aligned checkpoint with its features.npz (default: %(default)s)")
    p.add_argument("--data", default=D.DEMO_DIR, help="the data set whose test split is used (default: %(default)s)")
    p.add_argument("--n", type=int, default=50, help="test volumes to corrupt (default: %(default)s)")
    p.add_argument("--other", nargs="+", default=[], metavar="DATA",
                   help="other data sets (another modality) whose first --n test volumes are read under this model's preset")
    args = p.parse_args()
    model, ckpt = checkpoints.model_from_checkpoint(args.ckpt, stage="align")
    model.eval()
    _, features = checkpoints.load_reference(args.ckpt)
    D.require(features is not None, f"{args.ckpt}: no features.npz beside it; run python evaluate.py --ckpt {args.ckpt} first")
    preset, cut = ckpt["extra"]["preset"], float(features["cutoff"])
    test = D.load_table(args.data).subset("test")
    with tempfile.TemporaryDirectory() as tmp:
        made = inputs(test, args.n, tmp, ct=D.get_preset(preset)["intensity"] != "mri")
        made.update({Path(o).name: D.load_table(o).subset("test").images[:args.n] for o in args.other})
        whole, whole_f = distances(model, preset, test.images, features)  # every test volume: the false-alarm rate
        print(f"cut-off {cut:.1f} (the {float(features['percentile']):g}th percentile of validation); all {len(whole)} test "
              f"volumes: {100 * (whole > cut).mean():.1f}% beyond, {100 * (whole_f < whole).mean():.1f}% nearer flipped, "
              f"{100 * ((whole > cut) | (whole_f < whole)).mean():.1f}% flagged")
        print(f"{'input':14s} {'n':>4s} {'beyond':>7s} {'nearer flipped':>15s} {'flagged':>8s}  distance min / median / max")
        for name, paths in made.items():
            d, f = distances(model, preset, paths, features)
            print(f"{name:14s} {len(d):4d} {100 * (d > cut).mean():6.1f}% {100 * (f < d).mean():14.1f}% "
                  f"{100 * ((d > cut) | (f < d)).mean():7.1f}%  {d.min():8.1f} / {np.median(d):8.1f} / {d.max():8.1f}")


if __name__ == "__main__":
    D.run_main(main)
