"""
Stage 0 (data) for a second modality: a synthetic knee MRI set, built the way a fork builds its own data set.

  python knee_demo.py --out data/knee                     # 480 train / 60 valid / 120 test volumes, cache filled
  python knee_demo.py --out tiny --n-train 12 --n-valid 6 --n-test 6

Then the recipe runs on it unchanged, every stage given --data data/knee (distill.py --reports data/knee --labels
data/knee/labels.txt): docs/forking.md. Nothing in the stage scripts knows it is a knee. What they need, this script
writes: volumes and reports (a manifest), a label file (examples/knee_labels.txt, copied; the label set is read from
it), a preset and recommended flags (dataset.json), and a mask per drawn finding for localise.py.

Each volume is a knee phantom in millimetres as a sagittal proton-density fat-saturated series shows it: femur, tibia,
patella and fibular head (cortex dark, fat-saturated marrow grey), articular cartilage (intermediate), menisci,
cruciate ligaments and tendons (dark), a trace of joint fluid (bright), muscle, suppressed fat, popliteal vessels.
Right and left knees, positioned and rotated a little differently each time. Findings, each with a size and place
drawn per case, and a mask: joint effusion, a meniscal tear, an anterior cruciate ligament tear, bone marrow oedema, a
cartilage defect, a Baker cyst. Stored as int16 NIfTI in MR units: no Hounsfield scale, a coil's smooth shading,
Rician noise and an arbitrary scale per volume (as scanners differ); sagittal slices 3-4 mm thick, in-plane 1.0-1.3 mm,
in one of several storage orders. The reports are written as a musculoskeletal radiologist writes them: sections,
negations, doubt, and sentences that name no finding.
"""
import argparse
import csv
import io
import json
import os
import shutil
from multiprocessing import Pool
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from data import (HelpFormatter, cache_file, check_cache, preprocess_dataset, preprocess_one, preset_name, resolve_label_set,
                  run_main, write_atomic)

KNEE_VERSION = 1  # bumped when the generator changes
LABEL_FILE = Path(__file__).resolve().parent / "examples" / "knee_labels.txt"  # the label set: names in this order
# The data set's description (dataset.json). The preset: 3 mm voxels (the thick sagittal slices set the coarsest axis),
# a 48 x 48 x 40 crop (D, H, W = superior, anterior, lateral: 144 x 144 x 120 mm) that holds the joint, the recesses and
# the popliteal fossa, MR intensities (each volume clipped to its 1st-99th percentiles, then z-scored: no fixed scale).
KNEE_PRESET = {"spacing": [3.0, 3.0, 3.0], "size": [52, 52, 44], "crop": [48, 48, 40], "intensity": "mri"}
# Training flags for the lite recipe on 2 CPU cores, as the chest demo's (demo.py DEMO_TRAIN) and for the same reasons,
# but vision at lr 3e-4: on a draft of this set the paper's 1e-4 reached validation macro AUC 0.81 in 4 epochs, 3e-4
# 0.87 (docs/forking.md: the drafts); the knee's findings are smaller against more anatomy than the chest demo's.
KNEE_TRAIN = {"text": {"lr": 3e-3, "epochs": 5, "pooling": "sentence"},
              "vision-lite": {"lr": 3e-4, "epochs": 4, "random_crop": False, "workers": 0},
              "align-lite": {"head_lr": 5e-4, "init_shared": "heads", "epochs": 2, "random_crop": False,
                             "pooling": "sentence", "workers": 0}}
# Proton-density fat-saturated signal, before the coil's shading, the noise and the volume's own scale. Cartilage is the
# brightest tissue with more than 1% of the voxels, so it sets the 99th percentile where the preset's "mri" rule clips
# each volume, far above the muscle that fills most of the leg: fluid-bright findings stand out from the bulk (with
# cartilage at 120, the clip fell just above muscle and an effusion hardly differed from it: docs/forking.md).
SIGNAL = {"fat": 55, "muscle": 105, "cortex": 12, "marrow": 62, "cartilage": 215, "meniscus": 22, "ligament": 28,
          "fluid": 430, "oedema": 280, "vessel": 35, "skin": 90}


# ----------------------------------------------------------------------------- shapes
# A case's grid: each voxel's position in the knee's own frame, in mm from the centre of the joint line: m towards the
# lateral side (the patient's right in a right knee, left in a left one), a anterior, z superior (float32 arrays).

def ell(g, c, s):
    """Voxels of the ellipsoid with centre c and semi-axes s (m, a, z in mm; inf for a cylinder)."""
    return ((g["m"] - c[0]) / s[0]) ** 2 + ((g["a"] - c[1]) / s[1]) ** 2 + ((g["z"] - c[2]) / s[2]) ** 2 <= 1


def tube(g, p, q, rad):
    """Voxels within rad mm of the segment p-q (a ligament, a tendon, a vessel)."""
    p, d = np.asarray(p, np.float32), np.subtract(q, p, dtype=np.float32)
    x = [g["m"] - p[0], g["a"] - p[1], g["z"] - p[2]]
    t = np.clip((x[0] * d[0] + x[1] * d[1] + x[2] * d[2]) / (d @ d), 0, 1)
    return (x[0] - t * d[0]) ** 2 + (x[1] - t * d[1]) ** 2 + (x[2] - t * d[2]) ** 2 <= rad * rad


def shell(g, c, s, t):
    """The layer t mm thick outside the ellipsoid (c, s): cartilage on a condyle, cortex inside it with t < 0."""
    return ell(g, c, np.add(s, max(t, 0))) & ~ell(g, c, np.add(s, min(t, 0)))


# ----------------------------------------------------------------------------- the phantom
# Bones as unions of ellipsoids (centre, semi-axes) in the knee's frame; the joint line is z = 0.
FEMUR = [((-21, -6, 17.5), (15, 26, 14)), ((21, -6, 17.5), (15, 26, 14)), ((0, -3, 38), (37, 23, 26)),
         ((0, 0, 100), (15, 15, 70))]  # medial and lateral condyles (bone down to z = 3.5), metaphysis, shaft
TIBIA = [((0, -3, -8), (38, 27, 30)), ((0, -3, -100), (16, 16, 80))]  # plateau (cut flat at z = 0 below), shaft
PATELLA = ((0, 38, 33), (21, 9, 19))
FIBULA = ((30, -18, -30), (9, 9, 12))  # the fibular head, lateral and posterior: tells a right knee from a left one
ACL = ((8, -13, 20), (2, 9, -1))  # from the inner wall of the lateral condyle, forwards and down to the tibia
PCL = ((-7, 2, 20), (0, -21, -8))
MENISCI = {"medial": (-21, -4), "lateral": (21, -3)}  # compartment centres (m, a) on the tibial plateau


def bone(g, parts, inner=False, top=np.inf):
    """A bone: the union of its ellipsoids, below z = top; inner=True: its marrow, 2.5 mm inside the cortex (5 mm below
    a cut top: the tibia's cartilage lies on it)."""
    out = np.zeros(g["m"].shape, bool)
    for c, s in parts:
        out |= ell(g, c, np.subtract(s, 2.5) if inner else s)
    return out & (g["z"] <= top - (5 if inner else 0))


def meniscus(g, side, stretch=1.0):
    """A C-shaped wedge on the plateau's rim: (voxels, angle around the compartment centre, 0 = anterior, pi = posterior
    horn; the normalised radius, 0 inner edge, 1 outer rim). The posterior horn is the larger, as in patients."""
    cm, ca = MENISCI[side]
    dm, da = g["m"] - cm, g["a"] - ca
    ang = np.arctan2(np.abs(dm), da)  # 0 anterior .. pi posterior, the same on both sides of the compartment
    outer = (17 + 3 * ang / np.pi) * stretch  # mm from the centre to the rim, larger posteriorly
    rho = (np.sqrt(dm ** 2 + (da * 0.8) ** 2) - (outer - 9)) / 9  # 0 at the inner free edge, 1 at the rim
    top = 1 + 8 * np.clip(rho, 0, 1)  # the wedge on the plateau: 1 mm at the free edge, 9 mm tall at the rim
    notch = (g["m"] * np.sign(cm) < 6)  # open towards the intercondylar notch
    return (rho >= 0) & (rho <= 1) & (g["z"] >= 0) & (g["z"] <= top) & ~notch, ang, rho


def knee(g, rng, f):
    """PD fat-saturated signal (X, Y, Z) float32 of one knee; f maps each drawn finding to 1 (present) or 0.5
    (uncertain: drawn smaller and fainter). -> (signal, a detail phrase per drawn finding for the report, a mask per drawn
    finding: the voxels that show it once the knee is complete)."""
    U, det = rng.uniform, {}
    v = np.zeros(g["m"].shape, np.float32)
    who = np.zeros(g["m"].shape, np.int8)  # who painted each voxel last: 0 anatomy, i + 1 the i-th finding
    names = list(f)

    def paint(m, s, name=None):
        v[m] = s
        who[m] = names.index(name) + 1 if name else 0

    # Soft tissue: skin, suppressed subcutaneous fat, muscle; the popliteal fossa's fat and vessels behind the joint.
    w, d = U(54, 62), U(50, 58)  # the leg's half-width and half-depth
    paint(ell(g, (0, -6, 0), (w, d, np.inf)), SIGNAL["skin"])
    paint(ell(g, (0, -6, 0), (w - 1.5, d - 1.5, np.inf)), SIGNAL["fat"])
    paint(ell(g, (0, -6, 0), (w - 9, d - 9, np.inf)), SIGNAL["muscle"])
    paint(ell(g, (-2, -34, 4), (17, 13, 45)), SIGNAL["fat"])
    paint(ell(g, (0, 24, -8), (17, 8, 13)), SIGNAL["fat"])  # Hoffa's fat pad behind the patellar tendon
    paint(ell(g, (0, 17, 30), (16, 2.5, 8)), SIGNAL["fluid"])  # the physiological trace of fluid in the recess
    if "Joint effusion" in f:  # the suprapatellar recess distended, and the medial and lateral gutters
        k = U(0.55, 1.0) * f["Joint effusion"]
        paint(ell(g, (0, 18, 28 + 12 * k), (22 + 10 * k, 4 + 8 * k, 14 + 14 * k)), SIGNAL["fluid"], "Joint effusion")
        for side in (-1, 1):
            paint(ell(g, (side * 36, 2, 14), (4 + 4 * k, 10 + 8 * k, 10 + 12 * k)), SIGNAL["fluid"], "Joint effusion")
        det["Joint effusion"] = ("small", "moderate", "large")[int(np.clip((k - 0.25) / 0.27, 0, 2))]
    if "Baker cyst" in f:  # between the medial head of gastrocnemius and semimembranosus, a neck to the joint
        k, c = f["Baker cyst"], np.array([-U(14, 22), -U(38, 44), U(-6, 10)])
        s = np.array([U(8, 13), U(7, 10), U(14, 26)]) * (0.6 + 0.4 * k)
        paint(ell(g, c, s + 1.5), SIGNAL["ligament"])  # its thin wall
        paint(ell(g, c, s) | tube(g, c, (-14, -26, 8), 2.5 * k), SIGNAL["fluid"], "Baker cyst")
        det["Baker cyst"] = f" measuring {round(2 * s[2])} x {round(2 * s[1])} mm"
    paint(tube(g, (-2, -30, 80), (-2, -30, -80), 4), SIGNAL["vessel"])  # popliteal artery and vein, flow voids
    paint(tube(g, (6, -33, 80), (6, -33, -80), 3.5), SIGNAL["vessel"])
    paint(tube(g, (0, 34, 90), (0, 40, 45), 5), SIGNAL["ligament"])  # quadriceps tendon
    paint(tube(g, (0, 42, 16), (0, 26, -32), 4), SIGNAL["ligament"])  # patellar tendon

    # Bones: cortex, then marrow inside it; articular cartilage on the condyles, the plateau and the patella's back.
    femur, tibia, patella = bone(g, FEMUR), bone(g, TIBIA, top=0), ell(g, *PATELLA)
    cart_f = (shell(g, *FEMUR[0], 3.5) | shell(g, *FEMUR[1], 3.5)) & ~femur & (g["z"] < 24)  # weight-bearing + posterior
    trochlea = shell(g, *FEMUR[2], 3.5) & ~femur & (g["a"] > 8) & (g["z"] > 14)  # where the patella glides
    cart_t = tibia & (g["z"] > -3.5) & (np.abs(g["m"]) > 6)  # the plateau's top 3.5 mm, either side of the spines
    cart_p = shell(g, *PATELLA, 3.5) & (g["a"] < PATELLA[0][1] - 2)
    paint(cart_f | trochlea | cart_p, SIGNAL["cartilage"])
    for b, parts, top in ((femur, FEMUR, np.inf), (tibia, TIBIA, 0), (patella, [PATELLA], np.inf), (ell(g, *FIBULA), [FIBULA], np.inf)):
        paint(b, SIGNAL["cortex"])
        paint(bone(g, parts, True, top), SIGNAL["marrow"])
    paint(cart_t, SIGNAL["cartilage"])
    marrow = {"medial femoral condyle": bone(g, FEMUR[:1], True), "lateral femoral condyle": bone(g, FEMUR[1:2], True),
              "medial tibial plateau": bone(g, TIBIA[:1], True, 0) & (g["m"] < 0),
              "lateral tibial plateau": bone(g, TIBIA[:1], True, 0) & (g["m"] > 0), "patella": bone(g, [PATELLA], True)}
    if "Bone marrow oedema" in f:  # one or two bruises, brightest at their centre, under the joint surface
        k = f["Bone marrow oedema"]
        pattern = [["lateral femoral condyle", "lateral tibial plateau"], ["medial femoral condyle"], ["medial tibial plateau"],
                   ["lateral tibial plateau"], ["patella"], ["lateral femoral condyle"]][rng.integers(6)]
        for site in pattern:
            vox = np.argwhere(marrow[site] & (np.abs(g["z"]) < 14 if site != "patella" else marrow[site]))
            c = np.array([g[x][tuple(vox[rng.integers(len(vox))])] for x in "maz"])
            r = np.sqrt(((g["m"] - c[0]) ** 2 + (g["a"] - c[1]) ** 2 + ((g["z"] - c[2]) / 0.8) ** 2)) / (U(18, 26) * (0.6 + 0.4 * k))
            w = np.clip(1 - r ** 2, 0, None) * marrow[site]
            paint(w > 0.15, (SIGNAL["marrow"] + (SIGNAL["oedema"] - SIGNAL["marrow"]) * np.sqrt(w) * (0.7 + 0.3 * k))[w > 0.15],
                  "Bone marrow oedema")
        det["Bone marrow oedema"] = " in the " + " and ".join(pattern)

    # Menisci and cruciate ligaments; their tears.
    for side in MENISCI:
        paint(meniscus(g, side)[0] & ~femur, SIGNAL["meniscus"])
    if "Meniscal tear" in f:  # a fluid-bright cleft through one horn, horizontal or radial; a horizontal one's cyst
        k, side = f["Meniscal tear"], ("medial", "lateral")[int(rng.random() < 0.3)]
        where = ["posterior horn", "body", "anterior horn"][rng.choice(3, p=[0.7, 0.2, 0.1])]
        men, ang, rho = meniscus(g, side)
        a0, half = {"posterior horn": 2.6, "body": 1.6, "anterior horn": 0.6}[where] + U(-0.2, 0.2), U(0.6, 1.0) * k
        if rng.random() < 0.6:
            kind, cleft = "horizontal", np.abs(g["z"] - (2.5 + U(0, 1.5) + 4 * rho)) < 2.5
        else:
            kind, cleft = "radial", np.abs(ang - a0) < 0.16 + 0.08 * k
        torn = men & ~femur & (np.abs(ang - a0) < half)  # the torn segment: the cleft, and its frayed free edge
        paint(torn & ((cleft & (rho < 0.95)) | (rho < 0.4)), SIGNAL["fluid"] * (0.55 + 0.45 * k), "Meniscal tear")
        if kind == "horizontal":  # its fluid escapes through the rim into a parameniscal cyst (part of what the tear shows)
            cm, ca = MENISCI[side]
            rim = 22 * np.array([np.sin(a0) * np.sign(cm), np.cos(a0)]) / np.array([1, 0.8])
            r = U(8, 11) * k
            paint(ell(g, (cm + rim[0], ca + rim[1], 4), (r, r, r * 0.8)) & ~femur & ~tibia, SIGNAL["fluid"], "Meniscal tear")
        det["Meniscal tear"] = f" in the {where} of the {side} meniscus ({kind})"
    paint(tube(g, *ACL, 4) & ~femur & ~tibia, SIGNAL["ligament"])
    paint(tube(g, *PCL, 4.5) & ~femur & ~tibia, SIGNAL["ligament"])
    if "Anterior cruciate ligament tear" in f:  # the fibres interrupted: most of the ligament swollen and oedematous
        k, t0 = f["Anterior cruciate ligament tear"], U(0.35, 0.65)
        p, q = (np.add(ACL[0], t * np.subtract(ACL[1], ACL[0])) for t in (t0 - 0.35 * k, t0 + 0.35 * k))
        paint(tube(g, p, q, U(7, 9) * (0.6 + 0.4 * k)) & ~femur & ~tibia, SIGNAL["oedema"] * (0.7 + 0.3 * k),
              "Anterior cruciate ligament tear")
        det["Anterior cruciate ligament tear"] = (" at its proximal third", " in its mid-substance")[int(t0 > 0.45)]
    if "Cartilage defect" in f:  # full-thickness loss down to dark bare bone, and a fluid-filled crater beneath it
        k = f["Cartilage defect"]
        site = ["medial femoral condyle", "lateral femoral condyle", "patella", "trochlea"][rng.choice(4, p=[.4, .2, .25, .15])]
        layer = {"medial femoral condyle": cart_f & (g["m"] < 0) & (g["z"] < 9), "patella": cart_p, "trochlea": trochlea,
                 "lateral femoral condyle": cart_f & (g["m"] > 0) & (g["z"] < 9)}[site]
        vox = np.argwhere(layer)
        c = np.array([g[x][tuple(vox[rng.integers(len(vox))])] for x in "maz"])
        r = U(12, 16) * (0.6 + 0.4 * k)
        # The gap shows as bare bone's dark line, not filled with bright fluid: the preset clips each volume at its 99th
        # percentile, which a knee without an effusion puts near the cartilage's own signal, and a fluid-filled gap
        # would read as cartilage.
        paint(ell(g, c, (r, r, r)) & layer, SIGNAL["cortex"] * 2, "Cartilage defect")
        paint(ell(g, c, (r * 0.75,) * 3) & (femur | patella), SIGNAL["fluid"] * (0.6 + 0.4 * k), "Cartilage defect")
        det["Cartilage defect"] = f" at the {site}, {round(2 * r)} mm across"
    return v, det, {n: who == names.index(n) + 1 for n in names}


# ----------------------------------------------------------------------------- reports
# How a musculoskeletal radiologist words each finding: the label's own words come first (a rule-based labeler and the
# zero-shot prompts find them), then the ways a report says the same. {d}: the case's detail, given half the time.
SAID = {"Joint effusion": ["joint effusion", "knee joint effusion"],
        "Meniscal tear": ["meniscal tear", "meniscus tear"],
        "Anterior cruciate ligament tear": ["anterior cruciate ligament tear", "ACL tear"],
        "Bone marrow oedema": ["bone marrow oedema", "bone bruise"],
        "Cartilage defect": ["cartilage defect", "chondral defect"],
        "Baker cyst": ["Baker cyst", "popliteal cyst"]}
POSITIVE = ["There is {x}{d}.", "{X}{d}.", "{X} is present{d}.", "{X} is noted{d}.", "Findings are compatible with {x}{d}."]
NEGATIVE = ["No {x}.", "There is no {x}.", "No evidence of {x}.", "{X} is not seen.", "Without evidence of {x}."]
UNCERTAIN = ["Possible {x}{d}.", "Questionable {x}{d}.", "{X} cannot be excluded.", "Findings suspicious for {x}{d}.",
             "Equivocal {x}{d}."]
# And sentences only this finding gets (negations as radiologists write them of an intact structure, ...).
OWN = {"Meniscal tear": {0: ["The menisci are intact without tear.", "Both menisci are intact, without evidence of tear."]},
       "Anterior cruciate ligament tear": {0: ["The ACL is intact, no tear."],
                                           1: ["The ACL fibres are discontinuous, compatible with a complete tear{d}."]},
       "Cartilage defect": {0: ["Articular cartilage is preserved without focal chondral defect."]},
       "Joint effusion": {-1: ["Trace fluid, questionable small joint effusion."]},
       "Baker cyst": {1: ["Fluid collection in the popliteal fossa consistent with a Baker cyst{d}."]}}
# Sentences of the same reports that name none of the six findings, each in the section it belongs to.
OTHER = {"Ligaments": ["The posterior cruciate ligament is intact.", "The medial collateral ligament is intact.",
                       "The lateral collateral ligament complex is intact.", "Mild thickening of the proximal MCL, chronic."],
         "Extensor mechanism": ["The quadriceps and patellar tendons are intact.", "The patella is normally positioned.",
                                "Mild patellar tendinosis at the inferior pole.", "Mild prepatellar subcutaneous oedema."],
         "Other": ["Hoffa's fat pad is unremarkable.", "The popliteal vessels are patent.", "No fracture.",
                   "The iliotibial band is unremarkable.", "The visualised muscles show normal signal.",
                   "A trace of physiological fluid in the suprapatellar recess."]}
SECTIONS = {"Menisci": ["Meniscal tear"], "Ligaments": ["Anterior cruciate ligament tear"],
            "Cartilage": ["Cartilage defect"], "Bone marrow": ["Bone marrow oedema"],
            "Joint and popliteal fossa": ["Joint effusion", "Baker cyst"], "Extensor mechanism": [], "Other": []}


def report(labels, det, side, rng):
    """A report of sections, as musculoskeletal radiologists write them: the technique, one sentence per mentioned
    finding (positive, negated or in doubt) among sentences about other structures, then an impression."""
    lines, impression = [], []
    for section, findings in SECTIONS.items():
        said = []
        for name in (n for n in findings if labels[n] != ""):
            y, x = labels[name], SAID[name][int(rng.integers(2))]
            # Half the sentences of a present or doubtful finding give its detail, and no negation does: a detail must
            # not tell a positive from a negative by itself (the chest demo learned that: docs/demo.md, version 3).
            d = det[name] if y != 0 and rng.random() < 0.5 else ""
            if name == "Joint effusion" and d:  # an effusion's detail is its size, said before it
                x, d = f"{d} {x}", ""
            ways = {1: POSITIVE, 0: NEGATIVE, -1: UNCERTAIN}[y] + OWN.get(name, {}).get(y, [])
            said.append(str(rng.choice(ways)).format(x=x, X=x[0].upper() + x[1:], d=d))
            first = SAID[name][0]
            if y == 1:
                impression.append(f"{det[name].capitalize()} {first}." if name == "Joint effusion" else f"{name}{det[name]}.")
            elif y == -1:
                impression.append(f"Possible {first}.")
        pool = OTHER.get(section, [])
        said += [pool[i] for i in rng.choice(len(pool), int(rng.integers(0, 3)) if pool else 0, replace=False)]
        if said:
            lines.append(f"{section}: " + " ".join(said[i] for i in rng.permutation(len(said))))
    imp = " ".join(f"{i}. {s}" for i, s in enumerate(impression, 1)) or "No internal derangement."
    return (f"Examination: MRI of the {side} knee without contrast. Technique: sagittal proton density fat-saturated "
            f"images. Comparison: none.\nFindings: " + " ".join(lines) + "\nImpression: " + imp)


# ----------------------------------------------------------------------------- one case, the whole set
CACHE = f"cache-{preset_name(KNEE_PRESET)}"  # where every stage looks for the preset's cache (custom-<hash>)
STORAGE = [("P", "I", "R"), ("P", "I", "L"), ("A", "S", "R"), ("P", "S", "L")]  # sagittal series: x is the slice axis


def case(rng, names, storage):
    """One knee: labels, report, a NIfTI series and a uint8 mask per drawn finding in the series' own geometry."""
    labels = {}
    for name in names:  # 35% present, 5% uncertain, 15% not mentioned, 45% absent
        u = rng.random()
        labels[name] = 1 if u < .35 else -1 if u < .40 else "" if u < .55 else 0
    right = rng.random() < 0.5
    # A sagittal acquisition: in-plane 1.0-1.3 mm over a 150-170 mm field, slices 3-4 mm thick across 110-125 mm.
    sp = np.array([rng.uniform(3.0, 4.0)] + [rng.uniform(1.0, 1.3)] * 2).round(3)  # x (slices), y, z mm
    n = np.round(np.array([rng.uniform(110, 125)] + [rng.uniform(150, 170)] * 2) / sp).astype(int)
    axes = [((np.arange(k) - (k - 1) / 2) * s).astype(np.float32) for k, s in zip(n, sp)]  # RAS mm from the centre
    # The knee sits a little off centre, turned out or in by up to 6 degrees and flexed up to 4: its own frame.
    turn, flex = np.radians(rng.uniform(-6, 6)), np.radians(rng.uniform(-4, 4))
    rot = (np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]])
           @ np.array([[1, 0, 0], [0, np.cos(flex), -np.sin(flex)], [0, np.sin(flex), np.cos(flex)]]))
    shift, size = rng.uniform(-5, 5, 3), rng.uniform(0.95, 1.05)
    r, a, z = np.meshgrid(*axes, indexing="ij", copy=False)
    local = [sum(rot[j, i] * (c - shift[j]) for j, c in enumerate((r, a, z))) / size for i in range(3)]
    g = {"m": (local[0] if right else -local[0]).astype(np.float32), "a": local[1].astype(np.float32),
         "z": local[2].astype(np.float32)}  # lateral is the patient's right in a right knee
    f = {k: 1.0 if y == 1 else 0.5 for k, y in labels.items() if y in (1, -1)}
    signal, det, where = knee(g, rng, f)
    # What a scanner adds: a receive coil's smooth shading, Rician noise (the magnitude of complex Gaussian noise) and a
    # scale of its own; stored as integers.
    u = rng.normal(size=3)
    shade = np.exp(0.1 * (u[0] * r + u[1] * a + u[2] * z) / (np.linalg.norm(u) * 80)).astype(np.float32)
    noise = rng.uniform(6, 12)
    v = np.hypot(signal * shade + rng.normal(0, noise, signal.shape).astype(np.float32),
                 rng.normal(0, noise, signal.shape).astype(np.float32))
    data = np.clip(np.rint(v * np.exp(rng.uniform(np.log(0.5), np.log(8)))), 0, 32767).astype(np.int16)
    origin = np.array([(1 if right else -1) * rng.uniform(60, 120), rng.uniform(-30, 30),
                       rng.uniform(-600, -400)]) - (n - 1) / 2 * sp  # where the table put the knee: right or left of centre
    aff = np.diag(np.append(sp, 1.0))
    aff[:3, 3] = origin
    # The series' storage order: rows and columns either way, the slice (x) axis last, as exports of a sagittal series differ.
    t = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(storage))
    aff = aff @ inv_ornt_aff(t, data.shape)
    data = apply_orientation(data, t)
    masks = {k: nib.Nifti1Image(apply_orientation(m, t).astype(np.uint8), aff) for k, m in where.items()}
    img = nib.Nifti1Image(data, aff)
    for x in [img, *masks.values()]:
        x.header.set_xyzt_units("mm")
    return labels, report(labels, det, "right" if right else "left", rng), img, masks


def job(args):
    """Pool worker: one case -> its NIfTI, its masks, its cached preprocessed volume (read back through data.py, so the
    reorientation and resampling are exercised) -> its manifest row."""
    vid, split, child, storage, out, names = args
    labels, text, img, masks = case(np.random.default_rng(child), names, storage)
    nib.save(img, out / "volumes" / f"{vid}.nii.gz")
    if masks:  # masks/<id>/<label with _ for spaces>.nii.gz, as localise.py reads them
        (out / "masks" / vid).mkdir(parents=True, exist_ok=True)
        for name, m in masks.items():
            nib.save(m, out / "masks" / vid / f"{name.replace(' ', '_')}.nii.gz")
    _, err = preprocess_one((str(out / "volumes" / f"{vid}.nii.gz"), {}, KNEE_PRESET, str(cache_file(out / CACHE, vid))))
    if err:
        raise RuntimeError(err)
    return [vid, f"volumes/{vid}.nii.gz", text, split, f"masks/{vid}" if masks else ""] + [str(labels[k]) for k in names]


def make_knee(out_dir, n_train=480, n_valid=60, n_test=120, seed=0, workers=None):
    """Write out_dir/volumes/*.nii.gz, masks/<id>/<label>.nii.gz, manifest.csv (id, image, report, split, masks, then one
    column per label of the label file), labels.txt (the label file) and dataset.json; fill the cache. -> out_dir"""
    out = Path(out_dir)
    names = resolve_label_set(str(LABEL_FILE))[0]
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(LABEL_FILE, out / "labels.txt")
    check_cache(out / CACHE, KNEE_PRESET, create=True)
    cases = [(sp, j) for sp, n in (("train", n_train), ("valid", n_valid), ("test", n_test)) for j in range(1, n + 1)]
    jobs = [(f"knee_{split}_{j:04d}", split, child, STORAGE[i % len(STORAGE)], out, names)  # one generator per case
            for i, ((split, j), child) in enumerate(zip(cases, np.random.SeedSequence(seed).spawn(len(cases))))]
    workers = workers or os.cpu_count() or 1
    if workers > 1:
        with Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            rows = list(pool.imap(job, jobs, chunksize=8))
    else:
        rows = [job(j) for j in jobs]
    buf = io.StringIO()  # written whole, then moved into place: a build killed midway leaves no half manifest
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "image", "report", "split", "masks"] + names)
    w.writerows(rows)
    write_atomic(out / "manifest.csv", buf.getvalue())
    info = {"name": "knee", "preset": KNEE_PRESET, "version": KNEE_VERSION, "text_model": "scratch", "synthetic": True,
            "labels": "labels.txt", "n": len(rows), "seed": seed, "train": KNEE_TRAIN}
    write_atomic(out / "dataset.json", json.dumps(info, indent=1) + "\n")
    preprocess_dataset(out, workers=1)  # finds every volume cached: checks, writes nothing
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="data/knee", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generator")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU core)")
    for split, n in (("train", 480), ("valid", 60), ("test", 120)):
        p.add_argument(f"--n-{split}", type=int, default=n, help=f"{split} volumes")
    args = p.parse_args()
    make_knee(args.out, args.n_train, args.n_valid, args.n_test, seed=args.seed, workers=args.workers)


if __name__ == "__main__":
    run_main(main)
