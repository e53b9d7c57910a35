"""
Stage 4b: where is it? Each finding's map (maps.py) scored against a mask of where the finding really is.

Reads:  an aligned checkpoint (--ckpt, as evaluate.py) and a manifest whose `masks` column names, per volume, a folder
        of masks <Label_name>.nii.gz (spaces as underscores) on that volume's own grid: the demo writes them; fill one
        from ReXGroundingCT's 3D masks or your own segmentations. A mask on another grid is refused in one line.
Writes: --out (default out/localise): per_finding.csv and localise.json, and prints, per finding, over the split's
        positive cases that have a mask, with 95% bootstrap intervals over cases:
        - pointing game: the map's peak (maps.peak: the centre of its maximal cell) lies inside the mask dilated by
          --tolerance-mm;
        - mass: the share of the map's positive mass inside the mask;
        - the same pointing game for two baselines on the same cases: the body's centre, and a random body voxel
          (its exact expectation: the share of body voxels within the tolerance of the mask);
        - each method's time per scan.
Maps and masks meet on the model's input grid (the preset's centre crop): a mask goes through the same resampling and
cropping as its scan (trilinear, then > 0.5). Focal findings and the two whose masks are whole organs (cardiomegaly:
the heart; emphysema: the upper lobes) are averaged apart.

    python localise.py --methods exact gradcam occlusion            # the demo's test split, out/align-lite/best.pt
    python localise.py --data data/ctrate --split valid --methods gradcam --tolerance-mm 15
"""
import argparse
import csv
import io
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import checkpoints
import data as D
import maps
import metrics
import model as M
from demo import ensure_demo

DIFFUSE = ("Cardiomegaly", "Emphysema")  # masks that are whole organs: reported apart from the focal findings


def get_args():
    default_ckpt = "out/align/best.pt" if Path("out/align/best.pt").exists() else "out/align-lite/best.pt"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=D.HelpFormatter)
    p.add_argument("--ckpt", default=default_ckpt, help="aligned checkpoint (default: out/align/best.pt, else -lite)")
    p.add_argument("--data", default=D.DEMO_DIR, help="manifest with a masks column (default: %(default)s, built if missing)")
    p.add_argument("--split", default="test", help="split scored (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(maps.METHODS), choices=maps.METHODS, help="map methods compared "
                   "(default: all three)")
    p.add_argument("--tolerance-mm", type=float, default=10.0, help="pointing game: the mask dilated by this (default: %(default)s)")
    p.add_argument("--template", default="there_is", choices=list(M.PROMPT_TEMPLATES), help="prompt pair (default: %(default)s)")
    p.add_argument("--occlusion-blocks", type=int, default=4, help="occlusion: blocks per axis (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the cases (default: %(default)s)")
    p.add_argument("--max-cases", type=int, default=None, help="score at most this many volumes (default: all)")
    p.add_argument("--out", default="out/localise", help="output folder (default: %(default)s)")
    return p.parse_args()


def mask_on_crop(path, image, preset):
    """A mask file -> bool (D, H, W) on the model's input grid, after checking it lies on its scan's grid."""
    (shape, affine), (m_shape, m_affine) = maps.grid_of(image), maps.grid_of(path)
    D.require(tuple(m_shape) == tuple(shape) and np.allclose(m_affine, affine, atol=1e-3), f"{path}: a mask on another "
              f"grid than its scan {image} (shape {tuple(m_shape)} vs {tuple(shape)}, or another affine): resample it first")
    p = D.get_preset(preset)
    m = D.load_volume(path, p["spacing"]) > 0.5  # the scan's own resampling, read as a fraction of mask per voxel
    return D.pad_or_crop(D.pad_or_crop(m, p["size"], False), p["crop"], False)


def score_case(model, ds, i, table, prompts_by_name, preset, args, spacing):
    """One volume: {finding: {method: (hit, mass), "centre": hit, "random": expected hit, "seconds": {method: s}}}."""
    folder = Path(table.source).parent / table.meta[i]["masks"]
    item, p = ds[i], D.get_preset(preset)
    x = item["image"][None]  # (1, K, D, H, W)
    crop = D.pad_or_crop(ds.stored_volume(i), p["crop"])  # (D, H, W) HU
    body = crop > -500 if p["intensity"] != "mri" else crop > np.percentile(crop, 50)
    out = {}
    names = [n for n in table.label_names if table.labels[i, table.label_names.index(n)] == 1
             and (folder / f"{n.replace(' ', '_')}.nii.gz").is_file()]
    if not names:
        return out
    P = torch.stack([prompts_by_name[n] for n in names])  # (F, 2, 768)
    masks = {n: mask_on_crop(folder / f"{n.replace(' ', '_')}.nii.gz", table.images[i], preset) for n in names}
    for n in names:
        out[n] = {"centre": metrics.point_hit(metrics.centre_point(body), masks[n], spacing, args.tolerance_mm),
                  "random": metrics.random_hit_rate(body, masks[n], spacing, args.tolerance_mm), "seconds": {}}
    for method in args.methods:
        t0 = time.perf_counter()
        m = maps.make_maps(model, x, P, method, preset, args.occlusion_blocks)  # (F, D, H, W)
        seconds = time.perf_counter() - t0
        for n, mm in zip(names, m):
            if masks[n].any():  # a map without positive evidence anywhere has none inside the mask either: 0, not nan
                mass = metrics.mass_inside(mm, masks[n])
                out[n][method] = (metrics.point_hit(maps.peak(mm), masks[n], spacing, args.tolerance_mm),
                                  0.0 if np.isnan(mass) else mass)
            out[n]["seconds"][method] = seconds / len(names)
    return {n: o for n, o in out.items() if masks[n].any()}


def main():
    args = get_args()
    if args.data == D.DEMO_DIR:
        ensure_demo(args.data)
    model, ckpt = checkpoints.model_from_checkpoint(args.ckpt, stage="align")
    model.eval()
    preset = ckpt["extra"]["preset"]
    table = D.load_table(args.data)
    D.require("masks" in D.read_csv(table.source)[0], f"{table.source}: no masks column (a folder of masks per volume)")
    masks_col = {r.get("id") or r.get("image"): (r.get("masks") or "").strip() for r in D.read_csv(table.source)[1]}
    t = table.subset(args.split)
    t.meta = [dict(m, masks=masks_col.get(rid, "")) for m, rid in zip(t.meta, t.ids)]
    keep = [i for i, m in enumerate(t.meta) if m["masks"]][:args.max_cases]
    D.require(keep, f"{table.source}: no volume of split '{args.split}' has masks")
    t = t.take(keep)
    cache = Path(table.source).parent / f"cache-{D.preset_name(preset)}"
    ds = D.VolumeReportDataset(t, preset, train=False, cache_dir=cache)
    tok = M.tokenizer_from_cfg(ckpt["model_config"]["text"])
    prompts = M.prompt_latents(model, tok, t.label_names, args.template, ckpt["model_config"]["text"]["max_len"], "cpu")
    by_name = dict(zip(t.label_names, prompts))
    spacing = tuple(D.get_preset(preset)["spacing"][::-1])  # (D, H, W) mm of the input grid
    cases = {}  # finding -> list of per-case dicts
    with torch.no_grad():
        for i in range(len(t)):
            for n, o in score_case(model, ds, i, t, by_name, preset, args, spacing).items():
                cases.setdefault(n, []).append(o)
            print(f"\rscored {i + 1}/{len(t)} volumes", end="", flush=True)
    print()
    report(cases, args, preset)


def report(cases, args, preset):
    """The table, per_finding.csv and localise.json: every rate with its 95% bootstrap interval over cases."""
    cols = [(m, "point") for m in args.methods] + [(m, "mass") for m in args.methods] + [("centre", "point"), ("random", "point")]
    series = {c: {n: np.array([(o[c[0]][0 if c[1] == "point" else 1] if c[0] in args.methods else o[c[0]]) for o in os
                               if c[0] not in args.methods or c[0] in o]) for n, os in cases.items()} for c in cols}
    summary = {f"{m}_{k}": metrics.localisation_summary(series[(m, k)], args.bootstrap) for m, k in cols}
    focal = {c: {n: v for n, v in series[c].items() if n not in DIFFUSE} for c in cols}
    summary_focal = {f"{m}_{k}": metrics.localisation_summary(focal[(m, k)], args.bootstrap) for m, k in cols}
    seconds = {m: float(np.mean([o["seconds"][m] * 1 for os in cases.values() for o in os])) for m in args.methods}
    print(f"localisation on '{args.split}', tolerance {args.tolerance_mm:g} mm, {sum(map(len, cases.values()))} positive "
          f"cases with a mask; pointing game (mass) per method, then the baselines")
    head = "  ".join(f"{m:>21s}" for m in args.methods)
    print(f"{'finding':30s} {'n':>4s}  {head}  {'centre':>8s} {'random':>7s}")
    fmt = lambda r: "  -  " if r is None else f"{r[0]:.2f} [{r[1][0]:.2f}, {r[1][1]:.2f}]"  # noqa: E731
    rows = []
    for n in sorted(cases, key=lambda n: (n in DIFFUSE, n)):
        per = {f"{m}_{k}": summary[f"{m}_{k}"]["per_finding"].get(n) for m, k in cols}
        rows.append({"finding": n, "n": len(cases[n]), **{k: (v[0] if v else None) for k, v in per.items()}})
        print(f"{n[:30]:30s} {len(cases[n]):4d}  " + "  ".join(f"{fmt(per[f'{m}_point'])[:14]:>14s} ({per[f'{m}_mass'][0]:.2f})"
                                                      for m in args.methods)
              + f"  {per['centre_point'][0]:8.2f} {per['random_point'][0]:7.2f}")
    for tag, s in (("focal findings", summary_focal), ("all findings", summary)):
        print(f"{'mean, ' + tag:30s} {'':4s}  " + "  ".join(f"{fmt(s[f'{m}_point']['mean'])[:14]:>14s} "
                                                             f"({s[f'{m}_mass']['mean'][0]:.2f})" for m in args.methods)
              + f"  {s['centre_point']['mean'][0]:8.2f} {s['random_point']['mean'][0]:7.2f}")
    print("seconds per scan and finding: " + ", ".join(f"{m} {s:.3f}" for m, s in seconds.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    D.write_atomic(out / "per_finding.csv", buf.getvalue())
    D.write_atomic(out / "localise.json", json.dumps({"checkpoint": args.ckpt, "split": args.split, "preset": preset,
                                                      "tolerance_mm": args.tolerance_mm, "seconds_per_scan_finding": seconds,
                                                      "focal": summary_focal, "all": summary}, indent=1, default=float))
    print(f"wrote {out / 'per_finding.csv'} and {out / 'localise.json'}")


if __name__ == "__main__":
    D.run_main(main)
