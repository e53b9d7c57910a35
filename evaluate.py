"""
Stage 4: zero-shot diagnosis with an aligned GreenRFM checkpoint, scored by ROC AUC.

Reads:  an aligned checkpoint (--ckpt, default out/align/best.pt or out/align-lite/best.pt, from
        align.py), a manifest with volumes and reports (--data, default the demo set) and optionally a
        reference label CSV that replaces the manifest's labels (--labels, matched on id).
Writes: --out (default out/eval): per_label.csv, summary.json (checkpoint, protocol, all metrics,
        retrieval, calibration, out-of-distribution rate), roc.png, reliability.png; and beside the checkpoint,
        for scan.py (make_reference): <stem>.operating_points.json and <stem>.features.npz.

Each label gets a positive and a negative prompt ("There is X." / "There is no X."); a volume's score
is the difference of the raw dot products between its image latent and the two prompt latents, the logit whose
sigmoid (the softmax over the pair) is the probability; AUCs and thresholds use the logit, which cannot saturate.
Protocol choices, all stated in the output (the functions are in metrics.py):
- AUC per label with a 95% bootstrap interval (units resampled with replacement, percentile interval).
  A label with one class has no AUC: undefined (never 0.5) and left out of every macro mean.
- F1 / accuracy / precision: sklearn's support-weighted F1 and precision over each label's two classes
  (as CT-CLIP reports them), at the threshold maximising Youden's J (tpr - fpr) on the ROC curve, picked
  (a) on the evaluated set itself, as CT-CLIP does (optimistic), and (b) on --threshold-split.
- Units: CT-RATE `valid_53_a_1` = patient 53, scan a, reconstruction 1. A unit's score is the mean of
  its volumes' scores, its reference the max over its volumes (identical within a CT-RATE scan).
- Retrieval: report -> volume Recall@K over all units of the split (latents averaged per unit, raw dot
  products); a K larger than the number of units is undefined (null), not clipped.
- For scan.py (make_reference), per volume on --threshold-split (else the evaluated split): one temperature for the
  zero-shot logits and one for the classifier's, and beside them Platt scaling per label (a scale and a shift,
  metrics.fit_platt; a label with under 10 positives or negatives keeps the temperature); both are monotone per
  label, so every AUC is unchanged. Youden's J and
  sensitivity-0.90 thresholds of the calibrated zero-shot probability, and its values among positives and
  negatives; the training split's 512-d features as a Gaussian, with the --ood-percentile of the threshold split's
  Mahalanobis distances as the out-of-distribution cut-off. Printed and in summary.json: the evaluated split's
  calibration error raw, after the temperature and after Platt, and its share of volumes beyond the cut-off.

Examples:
    # demo set on the CPU (built if missing), checkpoint from `python align.py`
    python evaluate.py
    # CT-RATE validation on one GPU, per scan, 18 classes, thresholds picked on train
    python evaluate.py --device cuda --data data/ctrate --split valid --unit scan --protocol ctrate18 --threshold-split train
    # external RAD-ChestCT, the 15 classes it can express
    python evaluate.py --device cuda --data data/radchestct --labels rad_chestct_labels.csv --protocol radchestct15

Single scans (no labels): scan.py, which reads the operating points this script writes beside the checkpoint.
"""
import argparse
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
from scipy.special import expit
import torch

import checkpoints
import data as D
from demo import ensure_demo
import metrics
import model as M
import volumes as V

# -----------------------------------------------------------------------------
# protocols and unit names (the metrics, and the pooling per unit, are in metrics.py)

PROTOCOLS = D.PROTOCOLS  # label sets of published protocols (ctrate18, ctrate16, radchestct15): data.py holds them
# split_patient_scan_reconstruction, optionally `_fixed` (CT-RATE v2) and .nii / .nii.gz
CTRATE_NAME = re.compile(r"^([A-Za-z]+_\d+)_([A-Za-z]+)_\d+(?:_fixed)?(?:\.nii(?:\.gz)?)?$")


def unit_keys(ids, unit):
    """Grouping key of each volume: `valid_53_a_1` -> scan `valid_53_a`, patient `valid_53`."""
    if unit == "volume":
        return list(ids)
    matches = [CTRATE_NAME.match(Path(i).name) for i in ids]
    if not all(matches):
        bad = next(i for i, m in zip(ids, matches) if not m)
        print(f"note: id '{bad}' is not a CT-RATE name: --unit {unit} falls back to one unit per volume")
        return list(ids)
    return [f"{m[1]}_{m[2]}" if unit == "scan" else m[1] for m in matches]


@torch.no_grad()
def encode_split(model, tokenizer, loader, max_len, device):
    """Image and report latents of every volume -> ids, img (N, 768), txt (N, 768), feat (N, 512): the vision
    encoder's pooled feature, of which img is the projection. fp32 throughout: evaluation is cheap next to training,
    and exact numbers are worth more here."""
    ids, img, txt, feat = [], [], [], []
    for batch in loader:
        tok = tokenizer(list(batch["report"]), padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")
        f = model.vision(batch["image"].to(device))  # (B, 512)
        feat.append(f.float().cpu())
        img.append(model.image_latent(f).float().cpu())  # (B, 768) = model.encode_image
        txt.append(model.encode_text(tok["input_ids"].to(device),
                                     tok["attention_mask"].to(device)).float().cpu())  # (B, 768)
        ids += list(batch["id"])
    return ids, torch.cat(img), torch.cat(txt), torch.cat(feat)


def _plain(x):
    """JSON-safe copy: numpy scalars to float, nan/inf to null."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x.item() if isinstance(x, np.generic) else x


def _fmt(x, nd=3):
    return "  -  " if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def get_args():
    default_ckpt = "out/align/best.pt"
    if not Path(default_ckpt).exists() and Path("out/align-lite/best.pt").exists():
        default_ckpt = "out/align-lite/best.pt"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=D.HelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--ckpt", default=default_ckpt, help="aligned checkpoint (stage 'align'), loaded strictly")
    g.add_argument("--data", default=D.DEMO_DIR, help="manifest CSV or folder with manifest.csv (demo built if missing)")
    g.add_argument("--split", default=None, help="split to evaluate (default: 'test' if present, else 'valid')")
    g.add_argument("--threshold-split", default="valid", help="split on which the second threshold set is picked ('none' to skip)")
    g.add_argument("--labels", default=None, help="reference label CSV replacing the manifest's labels, matched on id")
    g.add_argument("--preset", default=None, help=f"preprocessing preset: one of {list(V.PRESETS)} or a .json preset file (default: dataset.json's, else chest)")
    g.add_argument("--cache", default=None, help="preprocessed cache folder (default <manifest folder>/cache-<preset>)")
    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", default="all", choices=["all", *PROTOCOLS], help="label set: all labels of the checkpoint or a published one")
    g.add_argument("--unit", default="volume", choices=["volume", "scan", "patient"], help="unit scored and counted (CT-RATE names)")
    g.add_argument("--template", default="there_is", choices=list(M.PROMPT_TEMPLATES), help="prompt pair of the main table")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (0 = none)")
    g.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--batch-size", type=int, default=8, help="volumes per forward pass")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--max-len", type=int, default=None, help="token cap for reports and prompts (default: the checkpoint's)")
    g.add_argument("--out", default="out/eval", help="output folder")
    g = p.add_argument_group("operating points for scan.py (written beside --ckpt)")
    g.add_argument("--no-reference", action="store_true", help="do not write <ckpt stem>.operating_points.json and .features.npz")
    g.add_argument("--ood-percentile", type=float, default=99.0, help="feature-distance cut-off: this percentile of the "
                   "threshold split's scans (default: %(default)s)")
    g.add_argument("--ood-fit-max", type=int, default=2000, help="training volumes (a seeded sample) whose features "
                   "define the reference Gaussian (default: %(default)s)")
    p.add_argument("--scan", nargs="*", help=argparse.SUPPRESS)  # moved to scan.py: said, not a bare argparse error
    args = p.parse_args()
    if args.scan is not None:
        raise D.UsageError("--scan moved to a script of its own: python scan.py SCAN [SCAN ...] (the same flags)")
    return args


def main():
    args = get_args()
    device, out = torch.device(args.device), Path(args.out)  # evaluation runs in one process, in fp32
    checkpoints.exact_fp32()  # truly: no TF32 on a GPU, where cuDNN's convolutions would use it by default
    out.mkdir(parents=True, exist_ok=True)

    # -----------------------------------------------------------------------------
    # data: the evaluated split, its reference labels, the preset and cache
    if args.data == D.DEMO_DIR:
        ensure_demo(args.data)
    table = D.load_table(args.data)
    preset = D.resolve_preset(args.preset, args.data)  # --preset, else dataset.json's, else chest
    cache = Path(args.cache or Path(table.source).parent / f"cache-{V.preset_name(preset)}")  # used where it exists
    split = args.split or ("test" if "test" in table.splits else "valid")
    thr_split = None if args.threshold_split in ("none", "", split) else args.threshold_split
    if thr_split not in table.splits:
        print(f"note: no second threshold split (--threshold-split {args.threshold_split}: "
              f"{'the evaluated split itself' if args.threshold_split == split else 'absent or none'})")
        thr_split = None
    print(f"data {table.source}: split {split}, preset {V.preset_name(preset)}, unit {args.unit}, "
          f"cache {cache if cache.is_dir() else 'none (volumes preprocessed on the fly)'}")

    # -----------------------------------------------------------------------------
    # model: strict load of an aligned checkpoint (anything else is one clear error line), prompts
    model, ckpt = checkpoints.model_from_checkpoint(args.ckpt, stage="align")
    V.require_channels(ckpt["model_config"]["vision"], preset, args.ckpt)
    model.to(device).eval()
    tokenizer = M.tokenizer_from_cfg(ckpt["model_config"]["text"])
    max_len = args.max_len or ckpt["model_config"]["text"]["max_len"]
    names = list(ckpt["label_names"]) if args.protocol == "all" else PROTOCOLS[args.protocol]
    for n in names:
        if n not in ckpt["label_names"]:
            raise D.UsageError(f"{args.ckpt}: label '{n}' of --protocol {args.protocol} is not among the checkpoint's labels")
    print(f"checkpoint {args.ckpt}: stage {ckpt['stage']}, step {ckpt.get('step')}, "
          f"{len(ckpt['label_names'])} labels; protocol {args.protocol}: {len(names)} labels"
          f"{'; no shared classifier (aligned with --no-shared-classifier): no classifier scores' if model.classifier is None else ''}")
    # every template's prompt latents are computed once, (C, 2, 768) each, not once per volume
    prompts = {k: M.prompt_latents(model, tokenizer, names, k, max_len, device).cpu() for k in M.PROMPT_TEMPLATES}
    score = dict(model=model, tokenizer=tokenizer, prompts=prompts, names=names, max_len=max_len, preset=preset,
                 cache=cache, args=args, ck_cols=[ckpt["label_names"].index(n) for n in names])

    # -----------------------------------------------------------------------------
    # evaluation: zero-shot scores per unit, AUC + bootstrap, thresholds, retrieval
    ev = score_split(table, split, labels_required=True, **score)
    y, s = ev["y"], ev["scores"][args.template]  # (U, C) each
    aucs, macro = metrics.per_label_auc(y, s)
    ci, macro_ci = metrics.bootstrap_auc(y, s, args.bootstrap, args.seed) if args.bootstrap else (
        [(np.nan, np.nan)] * len(names), (np.nan, np.nan))
    thr_self = metrics.youden_thresholds(y, s)  # CT-CLIP: picked on the evaluated set itself
    thr_other, tv = np.full(len(names), np.nan), None
    if thr_split:  # the same rule on another split, then applied to the evaluated one
        tv = score_split(table, thr_split, labels_required=False, **score)
        thr_other = metrics.youden_thresholds(tv["y"], tv["scores"][args.template])
    by_score = {k: metrics.per_label_auc(y, v) for k, v in ev["scores"].items()}  # k -> (aucs, macro)
    by_score.setdefault("classifier", ([None] * len(names), None))  # undefined without a shared classifier
    retrieval = metrics.recall_at_k(ev["txt"] @ ev["img"].T)  # (U, U): report latent vs every image latent

    # -----------------------------------------------------------------------------
    # summary: the table, per_label.csv, summary.json, roc.png
    m_self, m_other = metrics.threshold_metrics(y, s, thr_self), metrics.threshold_metrics(y, s, thr_other)
    rows = []  # one dict per label: the table's row, per_label.csv's row and summary.json's entry
    for c, n in enumerate(names):
        keep = metrics.has_ref(y, c)
        r = {"label": n, "n_pos": int((y[keep, c] == 1).sum()), "n_neg": int((y[keep, c] == 0).sum()),
             "auc": aucs[c], "auc_lo": ci[c][0], "auc_hi": ci[c][1]}
        for tag, thr, m in (("self", thr_self, m_self), ("split", thr_other, m_other)):
            r[f"threshold_{tag}"] = thr[c]
            r.update({f"{k}_{tag}": (m[c] or {}).get(k) for k in ("f1", "acc", "precision")})
        r.update({f"auc_{k}": by_score[k][0][c] for k in ("ensemble", "classifier")})
        rows.append(r)
    # macro row: each metric averaged over the labels where it is defined (never a 0.5 stand-in)
    mac = {"auc": macro, "auc_lo": macro_ci[0], "auc_hi": macro_ci[1],
           **{f"{k}_{tag}": metrics.macro_of(m, k) for tag, m in (("self", m_self), ("split", m_other))
              for k in ("f1", "acc", "precision")},
           **{f"auc_{k}": by_score[k][1] for k in ("ensemble", "classifier")}}
    undefined = [n for n, a in zip(names, aucs) if a is None]
    print_table(rows, mac, ev, split, thr_split, args, undefined, by_score, retrieval)
    summary = {
        "checkpoint": {"path": str(args.ckpt), **{k: ckpt.get(k) for k in ("stage", "step", "epoch", "best_metric", "args")}},
        "data": table.source, "split": split, "threshold_split": thr_split, "preset": preset,
        "labels_csv": args.labels, "protocol": args.protocol, "labels": names, "unit": args.unit,
        "template": args.template, "n_volumes": ev["n_volumes"], "n_units": len(ev["units"]),
        "threshold_rule": "max Youden's J (tpr - fpr) on the ROC curve, predict score >= threshold (score: the logit); *_self: "
                          "picked on the evaluated split itself (CT-CLIP protocol, optimistic); *_split: on threshold_split",
        "f1_precision": "sklearn weighted average over each label's two classes",
        "bootstrap": {"n": args.bootstrap, "seed": args.seed, "interval": "95% percentile"},
        "macro": mac, "per_label": rows, "undefined_labels": undefined,
        "macro_auc_by_score": {k: v[1] for k, v in by_score.items()},
        "retrieval": {"direction": "report->volume", "n": len(ev["units"]), "unit": args.unit,
                      "k_larger_than_n": "undefined (null)", **{f"recall@{k}": v for k, v in retrieval.items()}},
    }
    if not args.no_reference:  # what scan.py needs to weigh one scan's answers, beside the checkpoint
        summary["reference"] = make_reference(ev, tv if thr_split else ev, thr_split or split, table, score)
        plot_reliability(out, summary["reference"]["calibration"], split)
    write_outputs(out, rows, mac, summary, y, s, names, aucs, args.template)


def make_reference(ev, rv, ref_split, table, score):
    """Operating points, temperatures, Platt per label and the feature reference for scan.py, measured per volume (a scan is one):
    fitted on rv (the threshold split), checked on ev (the evaluated split); written beside the checkpoint.
    -> what summary.json records of them."""
    args, names, sig = score["args"], score["names"], expit  # sigmoid without overflow on large logits
    v, e = rv["volume"], ev["volume"]
    t_zs = metrics.fit_temperature(v["logits"], v["y"])
    t_clf = None if v["clf_logits"] is None else metrics.fit_temperature(v["clf_logits"], v["y"])  # None: no classifier
    # per label, a scale and a shift (Platt) where the split has enough of both classes, else the temperature
    platt = {k: metrics.fit_platt(v[z], v["y"], t) for k, z, t in (("zero_shot", "logits", t_zs), ("classifier", "clf_logits", t_clf))
             if t is not None}  # {kind: (a (C,), b (C,), fitted (C,))}
    p = metrics.platt_probabilities(v["logits"], *platt["zero_shot"][:2])  # (N, C) calibrated zero-shot probabilities
    youden, screen = metrics.youden_thresholds(v["y"], p), metrics.sensitivity_thresholds(v["y"], p, 0.9)
    labels = {n: {"youden": youden[c], "sensitivity_0.9": screen[c],
                  **{k: sorted(round(float(x), 5) for x in p[metrics.has_ref(v["y"], c) & (v["y"][:, c] == want), c])
                     for k, want in (("positives", 1), ("negatives", 0))}}
              for c, n in enumerate(names) if np.isfinite(youden[c])}  # a label without both classes: no decision
    calibration = {}  # per probability: ECE and its bins on the evaluated split: raw, after the temperature, after Platt
    for k, z, t in [("zero_shot", e["logits"], t_zs)] + ([("classifier", e["clf_logits"], t_clf)] if t_clf else []):
        (ece0, bins0), (ece1, bins1) = (metrics.calibration_error(e["y"], sig(z / tt)) for tt in (1.0, t))
        ece2, bins2 = metrics.calibration_error(e["y"], metrics.platt_probabilities(z, *platt[k][:2]))
        calibration[k] = {"temperature": t, "before": bins0, "after": bins1, "ece_before": ece0, "ece_after": ece1,
                          "platt": bins2, "ece_platt": ece2, "platt_fitted": int(platt[k][2].sum()), "labels": len(names)}
    features, ood = None, {"note": "no training split: no feature reference"}
    if "train" in table.splits:  # the Gaussian of the training features; the cut-off from held-out scans
        train = table.subset("train")
        pick = np.random.default_rng(0).permutation(len(train))[:args.ood_fit_max]
        tr = score_split(train.take(sorted(pick)), "train", labels_required=False, **score)["volume"]["feat"]
        mean, precision = metrics.fit_gaussian(tr)
        cut = float(np.percentile(metrics.mahalanobis(v["feat"], mean, precision), args.ood_percentile))
        beyond = float((metrics.mahalanobis(e["feat"], mean, precision) > cut).mean())
        features = {"mean": mean, "precision": precision, "cutoff": np.array(cut), "percentile": np.array(args.ood_percentile)}
        ood = {"fit_volumes": len(pick), "cutoff": cut, "percentile": args.ood_percentile, "beyond_evaluated": beyond}
    points = {"split": ref_split, "n_volumes": len(v["y"]), "template": args.template, "labels": labels,
              "temperature": {"zero_shot": t_zs, "classifier": t_clf},
              "platt": {k: {n: {"a": float(a[c]), "b": float(b[c]), "fitted": bool(f[c])} for c, n in enumerate(names)}
                        for k, (a, b, f) in platt.items()}}  # per label; fitted False: the temperature (a = 1 / T, b = 0)
    written = checkpoints.save_reference(args.ckpt, _plain(points), features)
    zs, clf = calibration["zero_shot"], calibration.get("classifier")
    cal = lambda c: (f"ECE on the evaluated split {c['ece_before']:.3f} -> {c['ece_after']:.3f} with the temperature, "  # noqa: E731
                     f"{c['ece_platt']:.3f} with Platt per label ({c['platt_fitted']} of {c['labels']} labels fitted, the "
                     f"rest have under {metrics.PLATT_MIN_EACH} positives or negatives and keep the temperature)")
    print(f"\noperating points on '{ref_split}' ({len(v['y'])} volumes), for scan.py: zero-shot temperature {t_zs:.3g} "
          f"({cal(zs)}); " + (f"classifier temperature {t_clf:.3g} ({cal(clf)})" if clf else "no classifier"))
    if features is not None:
        print(f"feature reference: {len(pick)} training volumes; cut-off {cut:.1f} (the {args.ood_percentile:g}th percentile "
              f"of '{ref_split}'); {100 * beyond:.1f}% of the evaluated split lies beyond it")
    print("wrote " + " and ".join(map(str, written)))
    return {"split": ref_split, "calibration": calibration, "ood": ood, "files": [str(w) for w in written]}


def plot_reliability(out, calibration, split):
    """reliability.png: observed frequency against mean probability per bin: raw, after the temperature, after Platt."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    for ax, (kind, c) in zip(axes, calibration.items()):
        for tag, style, what in (("before", "o--", "raw (T = 1)"), ("after", "s-", f"temperature (T = {c['temperature']:.2g})"),
                                 ("platt", "^-", "Platt per label")):
            m, f, n = (np.array([b[i] for b in c[tag] if b[2]], dtype=float) for i in range(3))
            ax.plot(m, f, style, label=f"{what}, ECE {c[f'ece_{tag}']:.3f}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="mean predicted probability (bin)", ylabel="observed frequency", title=f"{kind} ({split})",
               xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    D.write_atomic(out / "reliability.png", png.getvalue())


def score_split(table, name, labels_required, model, tokenizer, prompts, names, max_len, preset, cache, args, ck_cols):
    """Latents, zero-shot and classifier scores and references of one split, averaged per unit (--unit)."""
    t = table.subset(name)
    if len(t) == 0:
        raise D.DataError(f"{table.source}: no volumes in split '{name}' (splits: {sorted(set(table.splits))})")
    if args.labels:
        try:
            t = t.with_labels(args.labels)
        except D.DataError:
            if labels_required:
                raise
            print(f"note: {args.labels} does not cover split '{name}': its manifest labels are used")
    for n in names:
        if n not in t.label_names:
            raise D.DataError(f"{args.labels or table.source}: no reference column '{n}' (try another --protocol)")
    unused = [n for n in t.label_names if n not in names]
    if unused:  # said, not silent: a misspelt column shows here
        print(f"note: {len(unused)} label columns of {args.labels or table.source} not evaluated: {unused[:5]}")
    empty = sum(not r.strip() for r in t.reports)
    if empty:  # zero-shot reads images only; retrieval counts these reports too
        print(f"note: {empty} of the {len(t)} reports of split '{name}' are empty (retrieval includes them)")
    y = t.labels[:, [t.label_names.index(n) for n in names]]  # (N, C) 1/0/-1/nan
    ds = D.VolumeReportDataset(t, preset, train=False, cache_dir=cache)  # eval = center crop
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers)
    device = next(model.parameters()).device
    ids, img, txt, feat = encode_split(model, tokenizer, loader, max_len, device)
    # Every score is a logit, not its sigmoid: raw dot products reach logits of 50 and more, and a float32 sigmoid is
    # exactly 1.0 beyond about 17, so positives and negatives up there would tie and every AUC would drop (by 0.002 on
    # the demo's test split). The sigmoid is monotone: on logits the ranking, and so each AUC, is the model's own.
    scores = {k: M.zero_shot_logits(img, P).numpy() for k, P in prompts.items()}  # (N, C) each
    scores["ensemble"] = np.mean([scores[k] for k in M.PROMPT_TEMPLATES], axis=0)  # the templates' mean logit
    clf_logits = None  # (none without a shared classifier: align.py --no-shared-classifier)
    if model.classifier is not None:
        with torch.no_grad():  # the shared classifier read directly: W img + b, (N, C)
            clf_logits = model.classifier(img.to(device)).cpu()[:, ck_cols].numpy()
        scores["classifier"] = clf_logits
    units, inv = np.unique(unit_keys(ids, args.unit), return_inverse=True)
    return {"n_volumes": len(ids), "units": list(units), "y": metrics.unit_max(inv, y),
            "scores": {k: metrics.unit_mean(inv, s) for k, s in scores.items()},
            "img": metrics.unit_mean(inv, img.numpy()), "txt": metrics.unit_mean(inv, txt.numpy()),
            "volume": {"y": y, "feat": feat.numpy(), "clf_logits": clf_logits,  # per volume, as scan.py sees a scan
                       "logits": M.zero_shot_logits(img, prompts[args.template]).numpy()}}


def print_table(rows, mac, ev, split, thr_split, args, undefined, by_score, retrieval):
    print(f"\n{len(ev['units'])} {args.unit}s ({ev['n_volumes']} volumes) of split '{split}', template "
          f"{args.template}; thresholds: Youden's J on '{split}' itself (CT-CLIP, optimistic) | on '{thr_split}'")
    print(f"{'label':34s} {'n+':>5s} {'n-':>5s}  {'AUC [95% CI]':21s} {'F1/acc/prec (self)':20s} "
          f"{'F1/acc/prec (split)':20s} {'ens':>5s} {'clf':>5s}")
    for r in rows + [{"label": "macro (defined labels)", "n_pos": None, "n_neg": None, **mac}]:
        trip = ["/".join(_fmt(r[f"{k}_{t}"], 2) for k in ("f1", "acc", "precision")) for t in ("self", "split")]
        npos, nneg = ("", "") if r["n_pos"] is None else (r["n_pos"], r["n_neg"])
        print(f"{r['label'][:34]:34s} {npos:>5} {nneg:>5}  {_fmt(r['auc'])} [{_fmt(r['auc_lo'])}, "
              f"{_fmt(r['auc_hi'])}]  {trip[0]:20s} {trip[1]:20s} {_fmt(r['auc_ensemble'])} {_fmt(r['auc_classifier'])}")
    if undefined:
        print(f"undefined (one class in '{split}', left out of every macro): {', '.join(undefined)}")
    print("macro AUC per template: " + ", ".join(f"{k} {_fmt(by_score[k][1])}" for k in by_score))
    print("report->volume recall@K (" + f"{len(ev['units'])} {args.unit}s, K > N undefined): "
          + ", ".join(f"R@{k} {_fmt(v)}" for k, v in retrieval.items()))


def write_outputs(out, rows, mac, summary, y, s, names, aucs, template):
    """per_label.csv, summary.json (enough to quote a number honestly) and roc.png, each written whole, then renamed
    (D.write_atomic): never half a file."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows + [{"label": "macro", **mac}]:
        w.writerow({k: "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else v
                    for k, v in r.items() if k in rows[0]})
    D.write_atomic(out / "per_label.csv", buf.getvalue())
    D.write_atomic(out / "summary.json", json.dumps(_plain(summary), indent=2))
    import matplotlib  # after the numbers, which never depend on it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve
    fig, ax = plt.subplots(figsize=(6, 6))
    for c, n in enumerate(names):
        if aucs[c] is not None:
            keep = metrics.has_ref(y, c)
            fpr, tpr, _ = roc_curve(y[keep, c], s[keep, c])
            ax.plot(fpr, tpr, lw=1, label=f"{n} ({aucs[c]:.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.5)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"zero-shot ROC ({template})")
    ax.legend(fontsize=5)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=150)
    plt.close(fig)
    D.write_atomic(out / "roc.png", png.getvalue())
    print(f"wrote {out / 'per_label.csv'} and {out / 'summary.json'}")


if __name__ == "__main__":
    D.run_main(main)
