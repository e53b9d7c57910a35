"""
Stage 0 (data): the synthetic chest-CT demo set that every stage, test and first-time user runs on.

  python demo.py --out data/demo            # 1,000 train / 100 valid / 100 test volumes, cache filled
  python demo.py --out tiny --n-train 16 --n-valid 8 --n-test 8

Every stage calls ensure_demo() when it runs on the default data/demo, so a user never has to run this by hand.
It is a script of its own, beside data.py (which it uses), because it is a data generator and not part of the
recipe: a fork for a new modality can ignore this file.

Each volume is a phantom built in millimetres (body, two lungs near -850 HU, heart, aorta, spine)
with up to 13 of the 18 CT-RATE findings drawn as 3D structures, stored as int16 HU NIfTI with a real
affine (half RAS, half LPS as DICOM-derived files are) at slightly varying spacings, so the loader's
reorientation and resampling are exercised. Each comes with a radiologist-style report (positive,
negated, uncertain and irrelevant sentences in varied phrasing), ground-truth labels in the manifest, and a
mask per drawn finding (masks/<id>/<label>.nii.gz, in the volume's own grid) that says where it is.
"""
import argparse
import csv
import json
import os
import shutil
from multiprocessing import Pool
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from data import CHEST_CT_LABELS, HelpFormatter, cache_file, check_cache, dataset_defaults, preprocess_dataset, preprocess_one, run_main

# Training flags the demo set recommends (written to its dataset.json; the stage scripts apply them under the
# command line and print them). They are sized for the bare `python align.py --lite` on 2 CPU cores, which trains
# stages 2a and 2b first when their checkpoints are missing. Validation macro AUCs (docs/speed-demo.md):
# - Vision keeps the paper's lr 1e-4 and trains 2 epochs (demo v5: 0.951, 0.973; 1 epoch is too weak for zero-shot
#   >= 0.93). Its phantoms are all centred alike, so centre crops (0.84 against 0.69 on random crops after 200 steps,
#   demo v2). Workers 0: the cache is a memory map, and worker processes compete for the cores.
# - The text encoder is a 0.5 M-parameter BERT from a random start: lr 3e-3 for 5 epochs reaches 0.999 (lr 1e-3
#   needed 15). It encodes each sentence on its own (--pooling sentence): the zero-shot prompts are single
#   sentences, which a report-level [CLS] never learns to read.
# - Alignment keeps the paper's 1e-5 for the two pretrained encoders; the layers it adds (projections, shared
#   classifier) train at 5e-4 (--head-lr) and start from the pre-trained heads (--init-shared heads: 0.939 ->
#   0.965, demo v4). Two epochs: one ends at test 0.929, two at 0.947 (demo v5).
DEMO_VERSION = 7  # bumped when the generator, the demo preset or dataset.json changes: ensure_demo() then rebuilds the set
# (7: dataset.json names the diffuse findings; the volumes, reports, labels and masks are version 6's)
DEMO_TRAIN = {"text": {"lr": 3e-3, "epochs": 5, "pooling": "sentence"},
              "vision-lite": {"epochs": 2, "random_crop": False, "workers": 0},
              "align-lite": {"head_lr": 5e-4, "init_shared": "heads", "epochs": 2, "random_crop": False,
                             "pooling": "sentence", "workers": 0}}

# A phantom is built in mm around the volume centre: r = towards the patient's right (RAS +x), a = anterior,
# z = superior. Everything fits the demo crop (192 mm on every axis: v5 cut 224 -> 192 mm in-plane, which keeps the
# lungs and every finding, tests/test_demo.py) after resampling to 4x4x8 mm.
# Drawn findings are the 13 labels below; the other 5 appear only in text (negated or not mentioned).
# Ground truth: 1 = drawn at full size and stated; -1 = drawn at half size and reported as uncertain (an
# equivocal finding looks equivocal); 0 = not drawn and negated; "" = not drawn and not mentioned.
DEMO_DRAWN = [k for k in CHEST_CT_LABELS if k not in ("Pulmonary fibrotic sequela", "Mosaic attenuation pattern",
              "Peribronchial thickening", "Bronchiectasis", "Interlobular septal thickening")]
# Findings whose masks are whole organs (an enlarged heart is all of the heart; emphysema, the upper lobes): localise.py
# averages them apart from the focal ones, as dataset.json's "diffuse" tells it.
DEMO_DIFFUSE = ["Cardiomegaly", "Emphysema"]
# The label's own words come first so a rule-based labeler (and the evaluation prompts) find them.
DEMO_ALT = dict(zip(CHEST_CT_LABELS, [
    "medical material", "atherosclerotic arterial wall calcification", "enlargement of the heart", "pericardial fluid",
    "coronary artery calcification", "hiatus hernia", "mediastinal lymphadenopathy", "centrilobular emphysema",
    "subsegmental atelectasis", "pulmonary nodule", "ground-glass opacity", "fibrotic sequela", "pleural fluid",
    "mosaic attenuation", "peribronchial wall thickening", "airspace consolidation", "bronchiectasis",
    "septal thickening"]))
DEMO_POS = ["There is {x}{d}.", "{X} is present{d}.", "{X} is noted{d}.", "{X} is seen{d}.",
            "Findings are compatible with {x}{d}."]
DEMO_NEG = ["No {x}.", "There is no {x}.", "{X} is not seen.", "Without evidence of {x}.", "No evidence of {x}.",
            "{X} is not present.", "Findings are not compatible with {x}."]
DEMO_UNC = ["{X} cannot be excluded.", "Possible {x}{d}.", "Questionable {x}{d}.", "Findings suspicious for {x}{d}.",
            "Cannot exclude {x}{d}."]
DEMO_OTHER = ["Trachea and both main bronchi are patent.", "Thyroid gland is unremarkable.",
              "The study was performed with intravenous contrast.", "Mediastinal structures are midline.",
              "Mild degenerative changes of the thoracic spine.", "Visualized upper abdominal organs are unremarkable.",
              "The esophagus is of normal caliber.", "Pulmonary arteries are of normal caliber.",
              "Both adrenal glands are normal.", "Axillary regions are unremarkable.", "Comparison: none.",
              "Bone structures show no acute fracture."]
# Findings are drawn larger, and several of them more numerous, than typical in patients: a plaque or
# nodule spans a few of the demo's 4x4x8 mm voxels, and every finding changes enough voxels for a CPU run
# of a few hundred steps to learn it.
# Coronary arteries as paths of directions from the heart centre (r, a, z): the left anterior descending
# artery down the front towards the apex, the right coronary artery in the right atrioventricular groove.
DEMO_CORONARY = (((-0.2, 0.9, 0.5), (-0.5, 0.7, -0.5)), ((0.6, 0.6, 0.5), (0.9, 0.3, -0.3)))
# Lung ellipsoids (centre, semi-axes) in mm: right lung first.
DEMO_LUNGS = (((48, -5, 0), (38, 58, 85)), ((-50, -5, -5), (35, 56, 80)))


def _box(g, lo, hi):
    """Index slices of the voxels whose centres lie within [lo, hi] mm, so small shapes cost little."""
    return tuple(slice(*np.searchsorted(x, [l, h])) for x, l, h in zip(g["axes"], lo, hi))


def _ell(g, c, s):
    """Mask of an axis-aligned ellipsoid (centre c, semi-axes s in mm; s may be inf for a cylinder)."""
    m, sl = np.zeros(g["shape"], bool), _box(g, np.subtract(c, s), np.add(c, s))
    r, a, z = g["r"][sl[0]], g["a"][:, sl[1]], g["z"][..., sl[2]]
    m[sl] = ((r - c[0]) / s[0]) ** 2 + ((a - c[1]) / s[1]) ** 2 + ((z - c[2]) / s[2]) ** 2 <= 1
    return m


def _tube(g, pts, rad):
    """Mask of a tube of radius rad (mm) along the polyline pts: a union of capsules, one per segment."""
    m = np.zeros(g["shape"], bool)
    for p, q in zip(pts[:-1], pts[1:]):
        p, d = np.asarray(p, float), np.subtract(q, p, dtype=float)
        sl = _box(g, np.minimum(p, q) - rad, np.maximum(p, q) + rad)
        x = [g["r"][sl[0]] - p[0], g["a"][:, sl[1]] - p[1], g["z"][..., sl[2]] - p[2]]
        t = np.clip((x[0] * d[0] + x[1] * d[1] + x[2] * d[2]) / (d @ d), 0, 1)
        m[sl] |= (x[0] - t * d[0]) ** 2 + (x[1] - t * d[1]) ** 2 + (x[2] - t * d[2]) ** 2 <= rad * rad
    return m


def _phantom(g, rng, f):
    """HU volume (X,Y,Z) float32 in RAS order; f maps drawn labels to size 1 (positive) or 0.5 (uncertain).
    Returns the volume, a location phrase per drawn finding for the report, and a mask (X,Y,Z) bool per drawn
    finding: the voxels that still show it once the phantom is complete."""
    U, det, v = rng.uniform, {}, np.full(g["shape"], -1000.0, np.float32)
    # Where each finding is: every painting from the first finding on goes through paint(), which also writes who
    # painted each voxel last (0: anatomy, i + 1: DEMO_DRAWN[i]), one int8 write per painting. A mask is then the
    # finding's final visible region, not all it painted: a nodule inside a consolidation, or the catheter where it
    # enters an enlarged heart, belongs to the finding painted last, and a pericardial effusion is the rim the heart
    # leaves. A finding can be left with no voxel (an uncertain atelectasis band where an enlarged heart has carved
    # the lung away: 3 of the 1,200 default volumes); its mask is written, empty. paint() draws no random numbers,
    # so the volumes are the ones demo v5 drew before masks were recorded (tests/test_demo.py pins them).
    who = np.zeros(g["shape"], np.int8)

    def paint(m, hu, name=None):
        v[m] = hu
        who[m] = DEMO_DRAWN.index(name) + 1 if name else 0

    lobe = lambda side, z: f" in the {('right', 'left')[side]} {'upper' if z > 0 else 'lower'} lobe"  # noqa: E731
    bw, bh = U(102, 112), U(80, 88)  # body half-width (r) and half-depth (a)
    v[_ell(g, (0, 0, 0), (bw, bh, np.inf))] = -100  # subcutaneous fat, then muscle and organs inside it
    v[_ell(g, (0, 0, 0), (bw - 12, bh - 10, np.inf))] = 40  # (no finding yet: `who` stays 0, 2 ms saved)
    v[(np.abs(g["r"] + 5) < 45) & (g["a"] > -45) & (g["a"] < bh - 14) & (g["z"] > -95)] = -90  # mediastinal fat
    if "Lymphadenopathy" in f:  # enlarged nodes in the mediastinal fat (paratracheal, subcarinal, AP window)
        sites, rad = [(15, 10, 65), (0, -5, 42), (-15, 8, 52), (10, -10, 30)], U(14, 18, 4) * f["Lymphadenopathy"]
        for c, r in zip(sites, rad):
            paint(_ell(g, c, (r, r, 1.4 * r)), 60, "Lymphadenopathy")
        det["Lymphadenopathy"] = f" with nodes up to {round(2 * rad.max())} mm"
    # Heart (optionally enlarged, optionally with fluid around it) and aorta are carved out of the lungs,
    # so nothing drawn in the lungs is painted over later.
    hc, hs = (-12, 22, -42), np.array([42, 35, 38]) * U(0.95, 1.05) * (1 + 0.35 * f.get("Cardiomegaly", 0))
    t = U(13, 18) * f.get("Pericardial effusion", 0)
    aorta_path = np.array([(10, 25, -15), (10, 25, 45), (0, 8, 68), (-22, -20, 60), (-25, -28, 30), (-25, -28, -110)])
    aorta, k = _tube(g, aorta_path, 13), U(0.95, 1.03)
    free = ~(_ell(g, hc, hs + t) | aorta)
    lungs = [_ell(g, c, np.multiply(s, k)) & free for c, s in DEMO_LUNGS]
    near = _ell(g, hc, hs + t + 15) | _tube(g, aorta_path, 28)
    core = [_ell(g, c, np.multiply(s, 0.75 * k)) & ~near for c, s in DEMO_LUNGS]  # where lesions are centred
    lung = lungs[0] | lungs[1]
    paint(lung, -850)
    if "Lymphadenopathy" in f:  # and hilar nodes, one at each lung root (drawn over the lungs)
        for c, r in zip([(22, -5, 15), (-30, -5, 10)], rad):
            paint(_ell(g, c, (r, r, 1.4 * r)), 60, "Lymphadenopathy")
    paint(_tube(g, [(0, 10, 55), (0, 12, 200)], 9), -1000)  # trachea down to the carina

    def blobs(name, hu, n, rmin, rmax, zone=True):  # n balls centred in one lung's core, clipped to that lung
        for _ in range(n):
            side, rad = int(rng.integers(2)), U(rmin, rmax) * f[name]
            i = np.unravel_index(rng.choice(np.flatnonzero(core[side] & zone)), g["shape"])  # a random core voxel
            p = np.array([ax[j] for ax, j in zip(g["axes"], i)])
            paint(_ell(g, p, (rad,) * 3) & lungs[side], hu, name)
        det[name] = lobe(side, p[2])
        return rad
    if "Emphysema" in f:  # upper-lobe predominant: the upper lobes lose density, with bullae in them
        paint(lung & (g["z"] > 15), -850 - 80 * f["Emphysema"], "Emphysema")
        blobs("Emphysema", -1000, int(rng.integers(6, 10)), 18, 26, g["z"] > 15)
        det["Emphysema"] = " predominantly in the upper lobes"
    if "Lung opacity" in f:  # ground-glass patch
        blobs("Lung opacity", -450, int(rng.integers(2, 4)), 24, 34)
    if "Consolidation" in f:  # dense airspace region in the lateral mid/upper lung
        blobs("Consolidation", 35, 1, 28, 36, (np.abs(g["r"]) > 45) & (g["z"] > 0) & (g["z"] < 45) & (g["a"] > -30))
    if "Lung nodule" in f:
        n = int(rng.integers(4, 8))
        rad = blobs("Lung nodule", 30, n, 10, 14)
        det["Lung nodule"] = (f" measuring {round(2 * rad)} mm" if n == 1 else f" ({n} nodules, up to {round(2 * rad)} mm)"
                              ) + det["Lung nodule"]
    if "Atelectasis" in f:  # plate-like band above the diaphragm; collapsed lung enhances (~70 HU)
        side = int(rng.integers(2))
        (c, s), sign, m = DEMO_LUNGS[side], (1, -1)[side], f["Atelectasis"]
        paint(_ell(g, (c[0] + sign * 0.25 * s[0], c[1], c[2] - 0.62 * s[2]), (0.7 * s[0] * m, 0.6 * s[1] * m, 14))
              & lungs[side], 70, "Atelectasis")
        det["Atelectasis"] = lobe(side, -1)
    if "Pleural effusion" in f:  # dependent (posterior) fluid, thickest at the base, tapering upwards
        sides = [[0], [1], [0, 1]][rng.integers(3)]
        depth = U(25, 40) * f["Pleural effusion"] * np.clip((20 - g["z"]) / 70, 0, 1)
        for side in sides:
            paint(lungs[side] & (g["a"] < -63 + depth), 10, "Pleural effusion")
        det["Pleural effusion"] = " bilaterally" if len(sides) == 2 else (" on the right", " on the left")[sides[0]]
    if t:
        paint(_ell(g, hc, hs + t), 10, "Pericardial effusion")
        det["Pericardial effusion"] = f" measuring up to {round(t)} mm"
    # Myocardium, then the blood pool. The paper's window clips at 200 HU, so the contrast-filled blood (140 HU)
    # is kept below it: calcium (clipped to 200) must still differ from the lumen it lies on.
    heart = "Cardiomegaly" if "Cardiomegaly" in f else None  # an enlarged heart is the finding, all of it
    paint(_ell(g, hc, hs), 50, heart)
    paint(_ell(g, hc, hs - 8), 140, heart)
    paint(aorta, 140)  # ascending aorta, arch, descending aorta left of the spine; contrast-enhanced
    if "Arterial wall calcification" in f:  # plaques bulging out of the wall of the arch and descending aorta
        for _ in range(int(rng.integers(12, 20) * f["Arterial wall calcification"] + 0.5)):
            i = int(rng.integers(2, 5))
            p, d = aorta_path[i] + U() * (aorta_path[i + 1] - aorta_path[i]), aorta_path[i + 1] - aorta_path[i]
            u = rng.normal(size=3); u -= (u @ d) / (d @ d) * d; u /= np.linalg.norm(u)
            hu = U(800, 1200)  # the HU before the radius: the order in which `v[_ell(...)] = U(...)` drew them
            paint(_ell(g, p + 16 * u, (U(5, 7),) * 3), hu, "Arterial wall calcification")
        det["Arterial wall calcification"] = " of the aortic arch and descending aorta"
    if "Coronary artery wall calcification" in f:  # plaques along the coronary arteries on the heart surface
        for _ in range(int(rng.integers(6, 12) * f["Coronary artery wall calcification"] + 0.5)):
            p, q = DEMO_CORONARY[int(rng.integers(2))]
            u = np.add(p, U() * np.subtract(q, p)); u /= np.linalg.norm(u)
            hu = U(800, 1200)
            paint(_ell(g, hc + (hs + 3) * u, (U(5.5, 7),) * 3), hu, "Coronary artery wall calcification")
        det["Coronary artery wall calcification"] = " in the coronary arteries"
    if "Hiatal hernia" in f:  # stomach above the diaphragm behind the heart: wall, fluid, air-fluid level
        c, s = np.array([-5, -15, -78]), np.array([25, 22, 20]) * f["Hiatal hernia"]
        paint(_ell(g, c, s), 40, "Hiatal hernia")
        paint(_ell(g, c, s - 5), 10, "Hiatal hernia")
        paint(_ell(g, c, s - 5) & (g["z"] > c[2] - 2), -1000, "Hiatal hernia")
    paint(_ell(g, (0, -62, 0), (15, 15, np.inf)), 700)  # vertebral column
    if "Medical material" in f:  # right chest port (+ its catheter into the superior vena cava when certain)
        port = (55, bh - 16, 55)
        paint(_ell(g, port, (22, 9, 22)), 2500, "Medical material")
        if f["Medical material"] == 1:
            paint(_tube(g, [port, (35, bh - 22, 75), (28, 15, 75), (28, 15, 5), (22, 15, -15)], 5), 2500,
                  "Medical material")
        det["Medical material"] = " (central venous port and catheter)"
    # Quantum noise everywhere, plus parenchymal texture in the lungs.
    v += rng.standard_normal(v.shape, dtype=np.float32) * np.where(lung, 25, 12).astype(np.float32)
    return v, det, {name: who == DEMO_DRAWN.index(name) + 1 for name in f}


def _report(labels, det, rng):
    """Radiology-style free text: one sentence per mentioned label in varied phrasing, normal filler, shuffled."""
    sents, imp = [], []
    for name, y in labels.items():
        if y == "":
            continue
        x = [name.lower(), DEMO_ALT[name]][rng.integers(2)]
        X, d = x[0].upper() + x[1:], det.get(name, "")
        # Half the findings sentences give no detail ("There is emphysema."), as radiologists often write: a
        # positive must not be told from a negation by its detail phrase alone (a shortcut the prompts lack).
        dd = d if rng.random() < 0.5 else ""
        sents.append(str(rng.choice({1: DEMO_POS, 0: DEMO_NEG, -1: DEMO_UNC}[y])).format(x=x, X=X, d=dd))
        if y == 1:
            imp.append(f"{name}{d}.")
        elif y == -1:
            imp.append(f"{name} cannot be excluded.")
    sents += [DEMO_OTHER[i] for i in rng.choice(len(DEMO_OTHER), int(rng.integers(3, 6)), replace=False)]
    sents = [sents[i] for i in rng.permutation(len(sents))]
    return "Findings: " + " ".join(sents) + "\nImpression: " + (" ".join(imp) or "No acute cardiopulmonary abnormality.")


def _demo_case(rng, lps):
    """One volume: labels, report, a NIfTI image with realistic spacing, orientation and position, and a uint8
    NIfTI mask per drawn finding in the image's own geometry (same shape, affine and storage order)."""
    labels = {}
    for name in CHEST_CT_LABELS:  # drawn: 35% 1, 5% -1, 15% "", 45% 0; text-only: never 1
        u = rng.random()
        labels[name] = ((1 if u < .35 else -1 if u < .40 else "" if u < .55 else 0) if name in DEMO_DRAWN
                        else (-1 if u < .03 else 0 if u < .30 else ""))
    sp = np.array([rng.uniform(2.5, 3.5)] * 2 + [rng.uniform(5, 7)]).round(3)
    n = np.round(np.array([240, 240, 224]) / sp).astype(int)
    # Open grids of voxel centres in mm relative to the volume centre (canonical RAS order).
    r, a, z = axes = [((np.arange(k) - (k - 1) / 2) * s).astype(np.float32) for k, s in zip(n, sp)]
    g = {"shape": tuple(n), "axes": axes, "r": r[:, None, None], "a": a[None, :, None], "z": z[None, None, :]}
    f = {k: 1.0 if y == 1 else 0.5 for k, y in labels.items() if k in DEMO_DRAWN and y in (1, -1)}
    vol, det, where = _phantom(g, rng, f)
    data = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    # Scanner position of the volume centre (table height, couch position); the content never moves.
    origin = np.array([rng.uniform(-20, 20), rng.uniform(-200, -150), rng.uniform(-400, -100)]) - (n - 1) / 2 * sp
    aff = np.diag(np.append(sp, 1.0))
    aff[:3, 3] = origin
    if lps:  # DICOM-derived files store x and y reversed: flip the data and describe it in the affine
        data = np.ascontiguousarray(data[::-1, ::-1])
        where = {k: m[::-1, ::-1] for k, m in where.items()}
        aff[:2, 3] += (n[:2] - 1) * sp[:2]
        aff[0, 0], aff[1, 1] = -sp[0], -sp[1]
    img, masks = nib.Nifti1Image(data, aff), {k: nib.Nifti1Image(m.astype(np.uint8), aff) for k, m in where.items()}
    for x in [img, *masks.values()]:
        x.header.set_xyzt_units("mm")
    return labels, _report(labels, det, rng), img, masks


def _demo_job(job):
    """Pool worker: generate one case, write its NIfTI and finding masks, then cache it through the real loader.
    -> manifest row."""
    vid, split, child, lps, out, cache = job
    labels, report, img, masks = _demo_case(np.random.default_rng(child), lps=lps)
    nib.save(img, out / "volumes" / f"{vid}.nii.gz")
    if masks:  # masks/<id>/<label with _ for spaces>.nii.gz, e.g. masks/demo_train_0001/Pleural_effusion.nii.gz
        (out / "masks" / vid).mkdir(parents=True, exist_ok=True)
        for name, m in masks.items():
            nib.save(m, out / "masks" / vid / f"{name.replace(' ', '_')}.nii.gz")
    if cache is not None:  # read back from the file just written: reorientation and resampling are exercised
        _, err = preprocess_one((str(out / "volumes" / f"{vid}.nii.gz"), {}, "demo", str(cache_file(cache, vid))))
        if err:
            raise RuntimeError(err)
    return ([vid, f"volumes/{vid}.nii.gz", report, split, f"masks/{vid}" if masks else ""]
            + [str(labels[k]) for k in CHEST_CT_LABELS])


def make_demo(out_dir, n_train=1000, n_valid=100, n_test=100, seed=0, workers=None):
    """Write out_dir/volumes/*.nii.gz, masks/<id>/<label>.nii.gz (one per drawn finding), manifest.csv
    (id,image,report,split,masks + 18 labels; masks is the case's mask folder, empty when nothing is drawn) and
    dataset.json, and fill the preprocessed cache as each volume is written (one pass, `workers` processes).
    -> out_dir"""
    out = Path(out_dir)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    cache = out / "cache-demo"
    check_cache(cache, "demo", create=True)
    cases = [(sp, j) for sp, n in (("train", n_train), ("valid", n_valid), ("test", n_test)) for j in range(1, n + 1)]
    # One child generator per volume: each case is reproducible on its own (and in any worker).
    jobs = [(f"demo_{split}_{j:04d}", split, child, i % 2 == 1, out, cache)
            for i, ((split, j), child) in enumerate(zip(cases, np.random.SeedSequence(seed).spawn(len(cases))))]
    if workers > 1:
        with Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            rows = list(pool.imap(_demo_job, jobs, chunksize=16))
    else:
        rows = [_demo_job(j) for j in jobs]
    with open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["id", "image", "report", "split", "masks"] + CHEST_CT_LABELS)
        w.writerows(rows)
    info = {"preset": "demo", "version": DEMO_VERSION, "text_model": "scratch", "n": len(rows), "seed": seed,
            "train": DEMO_TRAIN, "diffuse": DEMO_DIFFUSE}
    (out / "dataset.json").write_text(json.dumps(info, indent=1) + "\n")
    preprocess_dataset(out, workers=1)  # finds every volume cached: checks, writes nothing
    return out


def ensure_demo(path):
    """Build the demo set at `path` unless it is complete (dataset.json is written last) and made by this
    demo.py (its version); an older one is replaced, cache included (the ids repeat). -> path."""
    info = Path(path) / "dataset.json"
    old = info.is_file() and dataset_defaults(path).get("version") != DEMO_VERSION
    if old or not info.is_file():
        print(f"building the synthetic demo set in {path} ({'replacing an older version' if old else 'once'})")
        shutil.rmtree(Path(path) / "cache-demo", ignore_errors=True)
        make_demo(path)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="data/demo", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generator")
    for split, n in (("train", 1000), ("valid", 100), ("test", 100)):
        p.add_argument(f"--n-{split}", type=int, default=n, help=f"{split} volumes")
    args = p.parse_args()
    make_demo(args.out, args.n_train, args.n_valid, args.n_test, seed=args.seed)


if __name__ == "__main__":
    run_main(main)
