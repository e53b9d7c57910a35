"""
Single scans: an aligned GreenRFM's answers for one scan at a time, and what a reader needs to weigh them.

  python scan.py my_ct.nii.gz                                        # every finding the checkpoint was trained on
  python scan.py export/p1/study2/series3 --findings "pneumothorax, rib fracture"   # a DICOM series; any finding
  python scan.py a.nii.gz b.nii.gz --save-latents out/scans.npz      # + each scan's latent, feature and answers

Each scan's file(s) are read once (volumes.Scan), and go through the preprocessing of the preset the checkpoint was
trained with (the manifest evaluation's own: volumes.preprocess_volume, then model_input's centre crop) and the model
in true fp32 (no TF32 on a GPU), as in evaluate.py, whose validation scores and thresholds it is compared with. Then, per finding:
- the zero-shot probability: sigmoid(a * (image . "There is X." - image . "There is no X.") + b), and the shared
  classifier's sigmoid(a' * logit + b'): Platt scaling per trained finding, fitted by evaluate.py on validation; a
  finding with too few validation positives or negatives to fit two numbers, an open-vocabulary finding, and an
  older reference without Platt use the temperature instead (a = 1 / T, b = 0; T = 1 without a reference);
- for a trained finding, a decision at two operating points picked on validation: Youden's J (the balanced one) and
  sensitivity 0.90 (a screening one), and where the probability falls among validation negatives and positives.
And per scan, how far its image feature (the 512-d pooled encoder output) lies from the training features: the
Mahalanobis distance to their Gaussian (trust_check). Beyond the cut-off (the 99th percentile of validation scans)
the scan is unlike anything the model was trained on; nearer when flipped top to bottom (superior <-> inferior), it is
probably upside down.
Either way one warning line says its answers should not be trusted.
What the model was trained on is printed once; a model that has only seen the synthetic demo says so.

Operating points, temperatures and the feature reference are written beside the checkpoint by `python evaluate.py`
(<stem>.operating_points.json, <stem>.features.npz). Without them there are no decisions and no distance, and the
output says how to make them. A finding outside the trained labels has a prompt pair, but no classifier output, no
validation scores and so no decision: the output says why.
"""
import argparse
import gzip
import io
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import checkpoints
import data as D
import dicom
import maps
import metrics
import model as M
import volumes as V

SCREENING = "sensitivity_0.9"  # the second operating point's key in evaluate.py's operating_points.json


def get_args():
    default_ckpt = "out/align/best.pt"
    if not Path(default_ckpt).exists() and Path("out/align-lite/best.pt").exists():
        default_ckpt = "out/align-lite/best.pt"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=D.HelpFormatter)
    p.add_argument("scans", nargs="+", help="NIfTI file(s) or DICOM series folder(s) (FOLDER::SeriesInstanceUID picks one "
                                            "of several)")
    p.add_argument("--ckpt", default=default_ckpt, help="aligned checkpoint (default: out/align/best.pt, else "
                                                        "out/align-lite/best.pt); its operating points are read beside it")
    p.add_argument("--findings", default=None, help='"a, b, c" or a label file (default: the checkpoint\'s labels)')
    p.add_argument("--template", default="there_is", choices=list(M.PROMPT_TEMPLATES), help="prompt pair (default: %(default)s)")
    p.add_argument("--preset", default=None, help="only to check: a scan always goes through the checkpoint's own preset")
    p.add_argument("--max-len", type=int, default=None, help="token cap for prompts (default: the checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ... (default: %(default)s)")
    p.add_argument("--maps", default=None, help="folder for each scan's map of each finding: <scan>/<finding>.nii.gz on the "
                                                "scan's own grid (its affine) and <finding>.png (default: none)")
    p.add_argument("--map-method", default="coarse_to_fine", choices=maps.METHODS, help="how a map is made (maps.py; "
                                                                                 "docs/maps.md; default: %(default)s)")
    p.add_argument("--save-latents", default=None, help=".npz of each scan's latent (768), feature (512), probabilities, "
                                                        "decisions and distance (default: none)")
    return p.parse_args()


def load(args):
    """The checkpoint, its preset (checked against --preset), and evaluate.py's reference if there is one."""
    for scan in args.scans:  # found before any work
        D.require(V.image_exists(scan), f"{scan}: file not found")
    model, ckpt = checkpoints.model_from_checkpoint(args.ckpt, stage="align")
    preset = (ckpt.get("extra") or {}).get("preset") or ckpt["args"].get("preset")  # align.py saves it in "extra"
    asked = D.resolve_preset(args.preset, ".") if args.preset else None  # a name, or a .json preset file
    if asked and preset and V.get_preset(asked) != V.get_preset(preset):
        raise D.UsageError(f"--preset {args.preset}: {args.ckpt} was trained on preset {V.preset_name(preset)}, and a scan "
                           f"must go through the same preprocessing (leave --preset out)")
    preset = preset or asked
    D.require(preset, f"{args.ckpt}: the checkpoint does not record its preset; pass the one it was trained with (--preset)")
    V.require_channels(ckpt["model_config"]["vision"], preset, args.ckpt)
    points, features = checkpoints.load_reference(args.ckpt)
    if points and points.get("template") != args.template:
        raise D.UsageError(f"--template {args.template}: {args.ckpt}'s operating points were measured with "
                           f"{points.get('template')} (pass it, or run evaluate.py --template {args.template})")
    return model, ckpt, preset, points, features


def say_what_it_knows(args, ckpt, preset, points, features):
    """Printed once: the checkpoint, the data it learned from, and what is known of its answers."""
    p, data = V.get_preset(preset), (ckpt.get("extra") or {}).get("data")
    print(f"checkpoint {args.ckpt}: {len(ckpt['label_names'])} trained labels; preset {V.preset_name(preset)} "
          f"({'x'.join(f'{s:g}' for s in p['spacing'])} mm, center crop {'x'.join(map(str, p['crop']))}); template {args.template}")
    if data:
        print(f"trained on: {data['name']} ({data['source']}, {data['train_volumes']} training volumes"
              f"{', the synthetic demo' if data['synthetic'] else ''})")
        if data["synthetic"]:
            print("note: this model has only seen synthetic phantoms: on a real scan its answers are not findings")
    else:
        print("trained on: not recorded in this checkpoint (made before align.py recorded its data)")
    make = f"python evaluate.py --ckpt {args.ckpt} --data <its data set>"
    if points:
        t, clf = points["temperature"], points["temperature"]["classifier"]  # clf None: no shared classifier
        fitted = sum(v["fitted"] for v in points.get("platt", {}).get("zero_shot", {}).values())
        print(f"operating points: measured on split '{points['split']}' ({points['n_volumes']} volumes); temperatures "
              f"zero-shot {t['zero_shot']:.3g}, classifier {'none' if clf is None else f'{clf:.3g}'}; Platt per label for "
              f"{fitted} of {len(ckpt['label_names'])} trained findings (the others: the temperature)")
    else:
        print(f"no operating points beside the checkpoint: uncalibrated probabilities, no decisions (make them: {make})")
    if not features:
        print(f"no feature reference beside the checkpoint: no out-of-distribution check (make it: {make})")


def write_maps(args, scan, x, stored, affine_crop, model, prompts, preset, findings, probs):
    """--maps: each finding's map, on the scan's own grid as NIfTI (the inverse of the preprocessing) and as a picture
    through its peak. scan: the Scan read; stored: its stored volume (D, H, W); affine_crop: where x's voxels lie.
    -> the folder written."""
    m = maps.make_maps(model, x, prompts, args.map_method, preset)  # (F, D, H, W) on the crop grid
    p = V.get_preset(preset)
    crop = V.pad_or_crop(stored, p["crop"], V.fill_value(p["intensity"]))  # (D, H, W) as stored: what the model saw
    window = V.display_window(crop, p["intensity"])  # the first CT window; an MRI's own range
    in_shape, in_affine = scan.shape, scan.affine  # the map goes back onto the voxels the scan arrived as
    folder_name, uid = dicom.split_choice(scan.path)
    folder = Path(args.maps) / (Path(folder_name).name.removesuffix(".gz").removesuffix(".nii") + (f"_{uid[-12:]}" if uid else ""))
    folder.mkdir(parents=True, exist_ok=True)
    for f, mm, prob in zip(findings, m, probs):
        stem = "".join(ch if ch.isalnum() else "_" for ch in f)
        img = nib.Nifti1Image(maps.to_input(mm, affine_crop, in_shape, in_affine), in_affine)
        D.write_atomic(folder / f"{stem}.nii.gz", gzip.compress(img.to_bytes()))
        maps.picture(folder / f"{stem}.png", crop, mm, p["spacing"], f"{f}: zero-shot {prob:.3f} ({args.map_method} map)", window)
    return folder


def percentile(sorted_scores, z):
    """Share of a sorted list below z, as "  97.5%" ("    -  " for an empty list: no such validation scans)."""
    return "    -  " if not sorted_scores else f"{100.0 * np.searchsorted(sorted_scores, z) / len(sorted_scores):6.1f}%"


def trust_check(scan, model, x, feat, features):
    """Two measured checks of one scan x (1, K, D, H, W), its feature (1, 512) -> (distance, distance when flipped).
    1. The Mahalanobis distance of the feature to the training features' Gaussian, against the cut-off (a percentile of
       validation scans): beyond it, the scan is unlike anything the model learned from (another body part, wrong
       units, noise, a real scan for a demo model).
    2. The same distance with the scan flipped top to bottom (D reversed: head to feet in a trunk, thigh to foot in a
       limb). Global average pooling keeps little of where things are, so an upside-down scan can still lie within the
       cut-off; but flipped back it lies nearer the training scans than as given, while an upright scan lies nearer as
       given (docs/trust.md: no exception on the demo's test split either way; docs/forking.md: the knee's). It assumes
       only what canonical orientation gives any anatomy with an up and a down: D runs inferior -> superior.
    Either check failing is one warning line."""
    mahal = lambda f: float(metrics.mahalanobis(f.float().cpu().numpy(), features["mean"], features["precision"])[0])  # noqa: E731
    dist, flipped, cut = mahal(feat), mahal(model.vision(torch.flip(x, dims=[2]))), float(features["cutoff"])
    print(f"  distance to the training features {dist:.1f} (cut-off {cut:.1f}: {'BEYOND' if dist > cut else 'within'}); "
          f"flipped top to bottom {flipped:.1f} ({'nearer' if flipped < dist else 'further: upright'})")
    why = [f"unlike the data the model was trained on (feature distance {dist:.1f} > {cut:.1f}, the "
           f"{float(features['percentile']):g}th percentile of validation scans)"] if dist > cut else []
    if flipped < dist and flipped <= cut:  # flipped, it looks like the training scans: a named cause
        why.append(f"upside down? flipped top to bottom it lies nearer the training scans ({flipped:.1f} < {dist:.1f})")
    elif flipped < dist and not why:
        why.append(f"nearer the training scans flipped top to bottom ({flipped:.1f} < {dist:.1f}) than as given")
    if why:
        print(f"warning: {scan}: {'; '.join(why)}: its answers should not be trusted", file=sys.stderr, flush=True)
    return dist, flipped


@torch.no_grad()
def main():
    args = get_args()
    model, ckpt, preset, points, features = load(args)
    device = torch.device(args.device)
    checkpoints.exact_fp32()  # as evaluate.py: cuDNN's convolutions would use TF32 by default on a GPU
    model.to(device).eval()
    text_cfg = ckpt["model_config"]["text"]
    tokenizer = M.tokenizer_from_cfg(text_cfg)
    ck_names = list(ckpt["label_names"])
    findings = ck_names
    if args.findings:  # a label file (.txt: one name a line, as distill.py --labels reads; .csv: its header), or "a, b, c"
        findings = (D.resolve_label_set(args.findings)[0] if Path(args.findings).is_file()
                    else [f.strip() for f in args.findings.split(",") if f.strip()])
        D.require(findings, f"--findings {args.findings!r}: no finding names")
    key = lambda n: n.lower().replace("_", " ").strip()  # noqa: E731  how the prompts spell a name, too
    col = {key(n): c for c, n in enumerate(ck_names)}
    cols = [col.get(key(f)) for f in findings]  # classifier output of each finding, None = not a trained label
    prompts = M.prompt_latents(model, tokenizer, findings, args.template, args.max_len or text_cfg["max_len"], device)
    say_what_it_knows(args, ckpt, preset, points, features)
    if None in cols:
        print(f"note: {cols.count(None)} of {len(findings)} findings are not among the checkpoint's trained labels: they are "
              f"answered through the prompt pair only (no classifier output, no validation scores, so no decision)")
    if model.classifier is None:
        print("note: this model has no shared classifier (aligned with align.py --no-shared-classifier): no classifier output")
    # per finding and kind, the calibration map sigmoid(a * logit + b): Platt where evaluate.py fitted it, else 1 / T
    temp = points["temperature"] if points else {"zero_shot": 1.0, "classifier": 1.0}
    platt = (points or {}).get("platt", {})
    fit = {k: [platt.get(k, {}).get(ck_names[c]) if c is not None else None for c in cols] for k in temp}  # per finding
    calib = {k: np.array([[e["a"] if e else 1 / temp[k] for e in fit[k]], [e["b"] if e else 0.0 for e in fit[k]]])
             for k in temp if temp[k] is not None}  # {kind: (2, F) rows a and b}
    ref = [points["labels"].get(ck_names[c]) if points and c is not None else None for c in cols]  # per finding or None
    out = {k: [] for k in ("feature", "latent", "zero_shot", "classifier", "decision", "screening", "distance", "distance_flipped")}
    for path in args.scans:
        scan = V.Scan(path, V.modality(preset))  # its file(s) read once: the voxels, and the grid they lie on
        stored, grid, shape = V.preprocess_volume(scan, preset, grid=True)  # (D, H, W) as a cache holds it; the grid
        x = torch.from_numpy(V.model_input(stored, preset))[None].to(device)  # (1, K, D, H, W): the evaluation's crop
        feat = model.vision(x)  # (1, 512): the encoder's pooled feature
        lat = model.image_latent(feat)  # (1, 768) = model.encode_image(x)
        z = metrics.platt_probabilities(M.zero_shot_logits(lat.float().cpu(), prompts.cpu())[0].numpy(), *calib["zero_shot"])  # (F,)
        clf = None if model.classifier is None else model.classifier(lat).float().cpu()[0].numpy()  # (C,) logits
        c_out = np.array([np.nan if c is None or clf is None else clf[c] for c in cols])  # (F,) logits, nan = none
        c_out = c_out if clf is None else metrics.platt_probabilities(c_out, *calib["classifier"])  # probabilities
        # decisions: 1 positive, 0 negative, -1 none (no operating point for this finding)
        dec = np.array([-1 if r is None else int(zi >= r["youden"]) for zi, r in zip(z, ref)])
        scr = np.array([-1 if r is None else int(zi >= r[SCREENING]) for zi, r in zip(z, ref)])
        dist = flipped = float(np.nan)
        print(f"\nscan {path}")
        if features:  # how far this scan lies from the scans the model was trained on, as it is and upside down
            dist, flipped = trust_check(path, model, x, feat, features)
        print(f"  {'finding':34s} {'zero-shot':>9s}  {'classifier':>10s}  {'Youden':8s} {'sens 0.90':9s}  among validation neg / pos")
        for f, c, zi, ci, r, a, b in zip(findings, cols, z, c_out, ref, dec, scr):
            word = {1: "positive", 0: "negative", -1: "-"}
            where = (f"{percentile(r['negatives'], zi)} / {percentile(r['positives'], zi)}" if r else
                     "no decision: not a trained label" if c is None else "no decision: no operating points" if not points
                     else f"no decision: '{points['split']}' lacks positives or negatives of it")
            print(f"  {f[:34]:34s} {zi:9.4f}  {'n/a' if np.isnan(ci) else f'{ci:.4f}':>10s}  {word[a]:8s} {word[b]:9s}  {where}")
        if args.maps:  # back onto the scan's own grid, from the same read
            affine_crop = maps.crop_affine(grid, shape, preset)  # (4, 4): x's (W, H, D) voxel index -> RAS mm
            print(f"  maps ({args.map_method}): {write_maps(args, scan, x, stored, affine_crop, model, prompts, preset, findings, z)}/")
        for k, v in zip(out, (feat.float().cpu()[0].numpy(), lat.float().cpu()[0].numpy(), z, c_out, dec, scr, dist, flipped)):
            out[k].append(v)
    if args.save_latents:  # plain arrays, rows in scan order; classifier nan and decisions -1 where there is none
        buf = io.BytesIO()
        np.savez(buf, scans=np.array(args.scans), findings=np.array(findings), **{k: np.stack(v) for k, v in out.items()})
        Path(args.save_latents).parent.mkdir(parents=True, exist_ok=True)
        D.write_atomic(args.save_latents, buf.getvalue())
        print(f"\nwrote {args.save_latents}: scans, findings, latent (N, {out['latent'][0].size}), feature (N, "
              f"{out['feature'][0].size}), zero_shot, classifier, "
              f"decision and screening (N, F; 1/0, -1 none), distance and distance_flipped (N,; nan without a reference)")


if __name__ == "__main__":
    D.run_main(main)
