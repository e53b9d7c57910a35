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
        - the same pointing game for three baselines on the same cases, none of which looks at the scan: the location
          prior (per finding, the mean of the training split's masks on the input grid, whose peak is the pointer for
          every case), the body's centre, and a random body voxel (its exact expectation: the share of body voxels
          within the tolerance of the mask);
        - each method against the prior: the paired difference in pointing game over the same cases;
        - the prior-hard cases apart: those where the prior's peak misses. There only a map that reads this scan
          can hit, so a finding the demo draws at one fixed place has few or none;
        - each method's time per scan.
Maps and masks meet on the model's input grid (the preset's centre crop): a mask goes through the same resampling and
cropping as its scan (trilinear, then > 0.5). Focal findings and those whose masks are whole organs (the data set names
them in its dataset.json, "diffuse": the demo's cardiomegaly, the heart, and emphysema, the upper lobes) are averaged apart.

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
import volumes as V
from demo import ensure_demo


def get_args():
    default_ckpt = "out/align/best.pt" if Path("out/align/best.pt").exists() else "out/align-lite/best.pt"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=D.HelpFormatter)
    p.add_argument("--ckpt", default=default_ckpt, help="aligned checkpoint (default: out/align/best.pt, else -lite)")
    p.add_argument("--data", default=D.DEMO_DIR, help="manifest with a masks column (default: %(default)s, built if missing)")
    p.add_argument("--split", default="test", help="split scored (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(maps.METHODS), choices=maps.METHODS, help="map methods compared "
                   "(default: every one: %(default)s)")
    p.add_argument("--tolerance-mm", type=float, default=10.0, help="pointing game: the mask dilated by this (default: %(default)s)")
    p.add_argument("--template", default="there_is", choices=list(M.PROMPT_TEMPLATES), help="prompt pair (default: %(default)s)")
    p.add_argument("--occlusion-blocks", type=int, default=4, help="occlusion: blocks per axis (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the cases (default: %(default)s)")
    p.add_argument("--max-cases", type=int, default=None, help="score at most this many volumes (default: all)")
    p.add_argument("--prior-cases", type=int, default=None, help="location prior: from at most this many training "
                   "volumes with masks (default: all)")
    p.add_argument("--out", default="out/localise", help="output folder (default: %(default)s)")
    return p.parse_args()


def mask_on_crop(path, image, preset):
    """A mask file -> bool (D, H, W) on the model's input grid, after checking it lies on its scan's grid."""
    scan, mask = V.Scan(image), V.Scan(path)  # each grid from its read (a NIfTI file's: the header; its voxels not yet)
    D.require(mask.shape == scan.shape and np.allclose(mask.affine, scan.affine, atol=1e-3), f"{path}: a mask on another "
              f"grid than its scan {image} (shape {mask.shape} vs {scan.shape}, or another affine): resample it first")
    p = V.get_preset(preset)
    m = V.load_volume(mask, p["spacing"]) > 0.5  # the scan's own resampling, read as a fraction of mask per voxel
    return V.pad_or_crop(V.pad_or_crop(m, p["size"], False), p["crop"], False)


def positives_with_masks(table, i):
    """Volume i's positive findings that have a mask file -> {finding: mask path}."""
    folder = Path(table.source).parent / table.meta[i]["masks"]
    files = {n: folder / f"{n.replace(' ', '_')}.nii.gz" for n in table.label_names}
    return {n: f for n, f in files.items() if table.labels[i, table.label_names.index(n)] == 1 and f.is_file()}


def location_prior(table, preset):
    """The baseline that never looks at the scan: per finding, the mean over the training volumes positive for it of
    their masks on the model's input grid -> {finding: (D, H, W) float in [0, 1]}, each voxel the share of those
    training cases whose finding covers it. Its peak (prior_point) points at where the finding usually is, the same
    point for every test case."""
    total, count = {}, {}
    for i in range(len(table)):
        for n, path in positives_with_masks(table, i).items():
            m = mask_on_crop(path, table.images[i], preset)
            total[n] = total.get(n, 0) + m.astype(np.float32)
            count[n] = count.get(n, 0) + 1
        print(f"\rlocation prior: {i + 1}/{len(table)} training volumes", end="", flush=True)
    print()
    return {n: total[n] / count[n] for n in total}


def prior_point(prior):
    """Where the prior points: of its maximal voxels, the one nearest their centroid. Not the centroid itself (what
    maps.peak gives a coarse map's flat cell): a port and its catheter, each covered in every training case, make a
    maximum in two pieces, and their centroid lies between them, on neither. -> (d, h, w)."""
    top = np.argwhere(prior >= prior.max() - 1e-6)  # (M, 3)
    return tuple(int(i) for i in top[np.argmin(((top - top.mean(0)) ** 2).sum(1))])


def score_case(model, ds, i, table, prompts_by_name, preset, args, spacing, prior_points):
    """One volume: {finding: {method: (hit, mass), "prior", "centre": hit, "random": expected hit, "seconds": {method: s}}};
    "prior" is None for a finding with no training mask."""
    item, p = ds[i], V.get_preset(preset)
    x = item["image"][None]  # (1, K, D, H, W)
    crop = V.pad_or_crop(ds.stored_volume(i), p["crop"], V.fill_value(p["intensity"]))  # (D, H, W) as stored: HU for CT
    body = V.body_mask(crop, p["intensity"])  # what the preset's intensity rule calls the body
    out = {}
    files = positives_with_masks(table, i)
    names = list(files)
    if not names:
        return out
    P = torch.stack([prompts_by_name[n] for n in names])  # (F, 2, 768)
    masks = {n: mask_on_crop(files[n], table.images[i], preset) for n in names}
    for n in names:
        out[n] = {"centre": metrics.point_hit(metrics.centre_point(body), masks[n], spacing, args.tolerance_mm),
                  "random": metrics.random_hit_rate(body, masks[n], spacing, args.tolerance_mm), "seconds": {},
                  "prior": metrics.point_hit(prior_points[n], masks[n], spacing, args.tolerance_mm) if n in prior_points else None}
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
    def with_masks(split, limit=None):
        t = table.subset(split)
        t.meta = [dict(m, masks=masks_col.get(rid, "")) for m, rid in zip(t.meta, t.ids)]
        keep = [i for i, m in enumerate(t.meta) if m["masks"]][:limit]
        D.require(keep, f"{table.source}: no volume of split '{split}' has masks")
        return t.take(keep)
    t = with_masks(args.split, args.max_cases)
    prior = location_prior(with_masks("train", args.prior_cases), preset)  # {finding: (D, H, W) mean training mask}
    prior_points = {n: prior_point(m) for n, m in prior.items()}
    cache = Path(table.source).parent / f"cache-{V.preset_name(preset)}"
    ds = D.VolumeReportDataset(t, preset, train=False, cache_dir=cache)
    tok = M.tokenizer_from_cfg(ckpt["model_config"]["text"])
    prompts = M.prompt_latents(model, tok, t.label_names, args.template, ckpt["model_config"]["text"]["max_len"], "cpu")
    by_name = dict(zip(t.label_names, prompts))
    spacing = tuple(V.get_preset(preset)["spacing"][::-1])  # (D, H, W) mm of the input grid
    cases = {}  # finding -> list of per-case dicts
    with torch.no_grad():
        for i in range(len(t)):
            for n, o in score_case(model, ds, i, t, by_name, preset, args, spacing, prior_points).items():
                cases.setdefault(n, []).append(o)
            print(f"\rscored {i + 1}/{len(t)} volumes", end="", flush=True)
    print()
    report(cases, args, preset, diffuse_findings(args.data))


def diffuse_findings(data):
    """The findings whose masks are whole organs, averaged apart from the focal ones: the data set says which
    (dataset.json "diffuse": the chest demo's heart of cardiomegaly and upper lobes of emphysema); none if it does not."""
    diffuse = D.dataset_defaults(data).get("diffuse", [])
    D.require(isinstance(diffuse, list) and all(isinstance(n, str) for n in diffuse),
              f"{D.manifest_path(data).parent / 'dataset.json'}: 'diffuse' must be a list of label names, got {diffuse!r}")
    return diffuse


def report(cases, args, preset, diffuse=()):
    """The tables, per_finding.csv and localise.json: every rate with its 95% bootstrap interval over cases.
    cases: {finding: [score_case's dict per positive case]}."""
    methods, baselines = list(args.methods), ["prior", "centre", "random"]
    point = lambda o, c: o[c][0] if c in methods else o[c]  # noqa: E731  (a method's entry is (hit, mass))
    with_prior = {n: [o for o in os if o["prior"] is not None] for n, os in cases.items()}  # the prior needs a training mask
    hard = {n: [o for o in os if not o["prior"]] for n, os in with_prior.items()}  # the prior's peak misses
    series = {**{(m, "point"): {n: [o[m][0] for o in os] for n, os in cases.items()} for m in methods},
              **{(m, "mass"): {n: [o[m][1] for o in os] for n, os in cases.items()} for m in methods},
              ("prior", "point"): {n: [o["prior"] for o in os] for n, os in with_prior.items()},
              **{(b, "point"): {n: [o[b] for o in os] for n, os in cases.items()} for b in ("centre", "random")},
              # each method against the prior on the same cases: hit - prior's hit per case, in [-1, 1]
              **{(m, "minus_prior"): {n: [float(o[m][0]) - o["prior"] for o in os] for n, os in with_prior.items()} for m in methods},
              **{(c, "prior_hard"): {n: [point(o, c) for o in os] for n, os in hard.items()} for c in methods + ["centre", "random"]}}
    keys = {f"{c}_{k}": v for (c, k), v in series.items()}
    summary = {k: metrics.localisation_summary(v, args.bootstrap) for k, v in keys.items()}
    summary_focal = {k: metrics.localisation_summary({n: x for n, x in v.items() if n not in diffuse}, args.bootstrap)
                     for k, v in keys.items()}
    seconds = {m: float(np.mean([o["seconds"][m] for os in cases.values() for o in os])) for m in methods}
    fmt = lambda r: "-" if r is None else f"{r[0]:.2f} [{r[1][0]:.2f}, {r[1][1]:.2f}]"  # noqa: E731
    fmt_d = lambda r: "-" if r is None else f"{r[0]:+.2f} [{r[1][0]:+.2f}, {r[1][1]:+.2f}]"  # noqa: E731
    per = lambda k, n: summary[k]["per_finding"].get(n)  # noqa: E731
    order = sorted(cases, key=lambda n: (n in diffuse, n))
    means = (("mean, focal findings", summary_focal), ("mean, all findings", summary))

    print(f"localisation on '{args.split}', tolerance {args.tolerance_mm:g} mm, {sum(map(len, cases.values()))} positive "
          f"cases with a mask; pointing game [95% interval] (mass inside the mask) per method, then the baselines")
    print(f"{'finding':30s} {'n':>4s}  " + "  ".join(f"{m:>28s}" for m in methods) + f"  {'prior':>18s} {'centre':>6s} {'random':>6s}")
    for n in order:
        print(f"{n[:30]:30s} {len(cases[n]):4d}  " + "  ".join(f"{fmt(per(f'{m}_point', n)):>21s} ({per(f'{m}_mass', n)[0]:.2f})"
                                                              for m in methods)
              + f"  {fmt(per('prior_point', n)):>18s} {per('centre_point', n)[0]:6.2f} {per('random_point', n)[0]:6.2f}")
    for tag, s in means:
        print(f"{tag:30s} {'':4s}  " + "  ".join(f"{fmt(s[f'{m}_point']['mean']):>21s} ({s[f'{m}_mass']['mean'][0]:.2f})"
                                                 for m in methods)
              + f"  {fmt(s['prior_point']['mean']):>18s} {s['centre_point']['mean'][0]:6.2f} {s['random_point']['mean'][0]:6.2f}")

    print("\neach method minus the location prior, paired over the same cases; and the prior-hard cases (the prior's peak "
          "misses), where only a map that reads the scan can hit")
    print(f"{'finding':30s} " + "  ".join(f"{m + ' - prior':>21s}" for m in methods) + f"  {'prior-hard':>10s}  "
          + "  ".join(f"{m + ' on them':>21s}" for m in methods) + f"  {'random':>6s}")
    for n in order:
        print(f"{n[:30]:30s} " + "  ".join(f"{fmt_d(per(f'{m}_minus_prior', n)):>21s}" for m in methods)
              + f"  {len(hard.get(n, [])):10d}  " + "  ".join(f"{fmt(per(f'{m}_prior_hard', n)):>21s}" for m in methods)
              + f"  {fmt(per('random_prior_hard', n))[:4]:>6s}")
    for tag, s in means:
        print(f"{tag:30s} " + "  ".join(f"{fmt_d(s[f'{m}_minus_prior']['mean']):>21s}" for m in methods)
              + f"  {sum(len(hard[n]) for n in hard if tag.endswith('all findings') or n not in diffuse):10d}  "
              + "  ".join(f"{fmt(s[f'{m}_prior_hard']['mean']):>21s}" for m in methods)
              + f"  {fmt(s['random_prior_hard']['mean'])[:4]:>6s}")
    print("seconds per scan and finding: " + ", ".join(f"{m} {s:.3f}" for m, s in seconds.items()))

    rows = [{"finding": n, "n": len(cases[n]), "n_prior_hard": len(hard.get(n, [])),
             **{k: (per(k, n)[0] if per(k, n) else None) for k in keys}} for n in order]
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
