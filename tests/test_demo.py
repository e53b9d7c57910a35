"""Synthetic demo set: files and manifest, determinism (and volumes pinned across generator changes), labels that
agree with the reports, findings visible in the voxels, per-finding masks where they are drawn, and ensure_demo()
(demo.py)."""
import csv
import hashlib
import io
import json
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]


from demo import make_demo  # noqa: E402  (what `python data.py demo` and ensure_demo() call)
LABELS = ["Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
          "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
          "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
          "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening"]


def read_manifest(root):
    with open(Path(root) / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def canonical(path):
    """Volume in RAS+ voxel order (HU float32), open grids r (patient's right +), a (anterior +), z (superior +)
    in mm from the volume centre, voxel spacing, voxel volume in mL."""
    img = nib.as_closest_canonical(nib.load(path))
    v = np.asarray(img.dataobj).astype(np.float32)
    sp = np.abs(np.diag(img.affine)[:3])
    r, a, z = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(v.shape, sp)]
    return v, r[:, None, None], a[None, :, None], z[None, None, :], sp, float(np.prod(sp)) / 1000


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo_small"), n_train=12, n_valid=4, n_test=4, seed=0)


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_default")
    t = time.time()
    make_demo(out, n_train=200, n_valid=50, n_test=50)  # the default generator, 300 of its 1,200 volumes
    print(f"\ndefault demo set (300 volumes) built in {time.time() - t:.1f} s")
    return out


# ---- structure ----

def test_ensure_demo_replaces_an_older_version(tmp_path, monkeypatch):
    """A demo set from an older demo.py is rebuilt, its cache dropped (the ids repeat: stale volumes would be
    read for new labels); a current one is left alone."""
    import demo
    from demo import DEMO_VERSION
    d = tmp_path / "demo"
    (d / "cache-demo").mkdir(parents=True)
    (d / "cache-demo" / "demo_train_0001.npy").write_bytes(b"stale")
    (d / "dataset.json").write_text(json.dumps({"preset": "demo", "version": DEMO_VERSION - 1}))
    built = []
    monkeypatch.setattr(demo, "make_demo", built.append)
    demo.ensure_demo(d)
    assert built == [d] and not (d / "cache-demo").exists()
    (d / "dataset.json").write_text(json.dumps({"preset": "demo", "version": DEMO_VERSION}))
    demo.ensure_demo(d)
    assert built == [d]


def test_files_manifest_and_headers(small):
    rows = read_manifest(small)
    with open(small / "manifest.csv", newline="") as fh:
        assert next(csv.reader(fh)) == ["id", "image", "report", "split", "masks"] + LABELS
    assert [r["split"] for r in rows] == ["train"] * 12 + ["valid"] * 4 + ["test"] * 4
    assert len({r["id"] for r in rows}) == 20 and all(re.fullmatch(r"demo_(train|valid|test)_\d{4}", r["id"]) for r in rows)
    info = json.loads((small / "dataset.json").read_text())
    assert {k: info[k] for k in ("preset", "text_model", "n", "seed")} == {"preset": "demo", "text_model": "scratch", "n": 20, "seed": 0}
    assert set(info) <= {"preset", "version", "text_model", "n", "seed", "train", "diffuse"}  # "train": flags the stage scripts may apply
    assert info["diffuse"] == ["Cardiomegaly", "Emphysema"]  # masks that are whole organs: localise.py averages them apart
    assert isinstance(info["version"], int)  # ensure_demo() rebuilds a set whose version is not demo.py's
    codes, affines = set(), set()
    for r in rows:
        assert r["image"] == f"volumes/{r['id']}.nii.gz" and all(r[k] in ("1", "0", "-1", "") for k in LABELS)
        img = nib.load(small / r["image"])
        assert img.ndim == 3 and img.get_data_dtype() == np.int16 and np.asanyarray(img.dataobj).dtype == np.int16
        sp = np.abs(np.diag(img.affine)[:3])
        assert 2.5 <= sp[0] == sp[1] <= 3.5 and 5 <= sp[2] <= 7
        assert np.abs(img.affine[:3, 3]).max() > 50  # a scanner position, not the identity
        codes.add(nib.aff2axcodes(img.affine))
        affines.add(img.affine.tobytes())
    assert codes == {("R", "A", "S"), ("L", "P", "S")} and len(affines) == 20


def test_orientation_is_physical(small):
    """Whichever way a file is stored, in world coordinates the heart is left of and in front of the spine."""
    for r in read_manifest(small):
        img = nib.load(small / r["image"])
        v = np.asanyarray(img.dataobj)
        ijk = np.indices(v.shape).reshape(3, -1)
        world = (img.affine[:3, :3] @ ijk + img.affine[:3, 3:]).reshape(3, *v.shape)
        spine = (v > 500) & (v < 1100)
        blood = (v > 120) & (v < 400)  # contrast-filled heart and aorta
        spine_x, spine_y = (world[i][spine].mean() for i in (0, 1))
        heart = blood & (world[2] < np.median(world[2]))  # lower half: mostly the heart
        assert world[0][heart].mean() < spine_x - 5, r["id"]  # RAS: x grows to the patient's right
        assert world[1][heart].mean() > spine_y + 40, r["id"]


def test_deterministic(tmp_path):
    a = make_demo(tmp_path / "a", n_train=3, n_valid=1, n_test=1, seed=7)
    b = make_demo(tmp_path / "b", n_train=3, n_valid=1, n_test=1, seed=7)
    c = make_demo(tmp_path / "c", n_train=3, n_valid=1, n_test=1, seed=8)
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    assert (a / "manifest.csv").read_bytes() != (c / "manifest.csv").read_bytes()
    for r in read_manifest(a):
        x, y = nib.load(a / r["image"]), nib.load(b / r["image"])
        assert np.array_equal(np.asanyarray(x.dataobj), np.asanyarray(y.dataobj)) and np.array_equal(x.affine, y.affine)


# Written by demo.py v5 (commit 994abd6), before the generator recorded masks: sha1 of each volume's int16 voxels as
# stored, and of manifest.csv in its v5 columns (without "masks").
PINNED = {"demo_train_0001": "ec48b42e01373462febe54cd139b1a9d20181d84",
          "demo_train_0002": "838f8d34f733b974e191cc9a6f494659aea69ab4",
          "demo_train_0003": "0d1cb11fb802a88b7ea6a67e6617a4deeeca5376",
          "demo_train_0004": "5c35bf8c3a37f33d7611d682aa872a729323b17a",
          "demo_valid_0001": "30a63a5e11c9380eb81187f7c3f7809eb4b8deee",
          "demo_test_0001": "f06ea88d006fcf66352528213a45c2e43bce45a1"}
PINNED_MANIFEST = "ce37cc79dc726c74dac5adc53c75ed89def4fc71"


def test_volumes_reports_and_labels_pinned(tmp_path):
    """A regression pin: the digests above were recorded from demo.py v5 (seed 3, 4/1/1 volumes) before v6 began
    writing finding masks, which must draw no extra random numbers and leave the order of the draws alone. So the
    volumes, reports and labels stay bit-identical to v5's, and a trained demo keeps describing the same data. A
    deliberate change to the phantom or the reports updates these digests (and DEMO_VERSION)."""
    out = make_demo(tmp_path / "pin", n_train=4, n_valid=1, n_test=1, seed=3)
    rows = read_manifest(out)
    assert {r["id"]: hashlib.sha1(np.asanyarray(nib.load(out / r["image"]).dataobj).tobytes()).hexdigest()
            for r in rows} == PINNED
    v5 = io.StringIO()  # the manifest as v5 wrote it: every column but "masks", same writer
    w = csv.writer(v5, lineterminator="\n")
    with open(out / "manifest.csv", newline="") as fh:
        for row in csv.reader(fh):
            w.writerow(row[:4] + row[5:])
    assert hashlib.sha1(v5.getvalue().encode()).hexdigest() == PINNED_MANIFEST


# ---- labels agree with the reports ----
# Written here, independently of the generator: the words a rule-based labeler would look for.
TERMS = {"Medical material": ["medical material"], "Arterial wall calcification": ["arterial wall calcification"],
         "Cardiomegaly": ["cardiomegaly", "enlargement of the heart"],
         "Pericardial effusion": ["pericardial effusion", "pericardial fluid"],
         "Coronary artery wall calcification": ["coronary artery wall calcification", "coronary artery calcification"],
         "Hiatal hernia": ["hiatal hernia", "hiatus hernia"], "Lymphadenopathy": ["lymphadenopathy"],
         "Emphysema": ["emphysema"], "Atelectasis": ["atelectasis"], "Lung nodule": ["lung nodule", "pulmonary nodule"],
         "Lung opacity": ["lung opacity", "ground-glass opacity"], "Pulmonary fibrotic sequela": ["fibrotic sequela"],
         "Pleural effusion": ["pleural effusion", "pleural fluid"], "Mosaic attenuation pattern": ["mosaic attenuation"],
         "Peribronchial thickening": ["peribronchial thickening", "peribronchial wall thickening"],
         "Consolidation": ["consolidation"], "Bronchiectasis": ["bronchiectasis"],
         "Interlobular septal thickening": ["septal thickening"]}
UNCERTAIN = ["cannot be excluded", "cannot exclude", "possible", "questionable", "suspicious for", "may represent"]
NEGATION = [r"\bno\b", r"\bnot\b", r"\bwithout\b", r"\babsent\b", r"\bnegative for\b"]


def sentence_label(s):
    s = s.lower()
    if any(c in s for c in UNCERTAIN):  # before negation: "is not excluded" is uncertain, not negative
        return "-1"
    return "0" if any(re.search(c, s) for c in NEGATION) else "1"


def test_labels_agree_with_reports(default):
    rows, forms = read_manifest(default), {"1": set(), "0": set(), "-1": set()}
    for r in rows:
        assert r["report"].startswith("Findings: ") and "\nImpression: " in r["report"]
        sentences = [s for s in re.split(r"(?<=\.)\s+|\n", r["report"]) if s]
        for name in LABELS:
            hits = [s for s in sentences if any(t in s.lower() for t in TERMS[name])]
            found = {sentence_label(s) for s in hits}
            assert found == ({r[name]} if r[name] else set()), (r["id"], name, r[name], hits)
            for s in hits:  # the phrasing with the finding's words blanked out
                t = next(t for t in TERMS[name] if t in s.lower())
                forms[sentence_label(s)].add(s.lower().split(t)[0])
        assert len([s for s in sentences if not any(t in s.lower() for ts in TERMS.values() for t in ts)]) >= 3
    assert all(len(f) >= 3 for f in forms.values()), forms  # varied phrasing for each kind of statement
    text = " ".join(r["report"] for r in rows)
    for prompt in ("There is pleural effusion", "There is no pleural effusion", "No pleural effusion.", "cannot be excluded"):
        assert prompt in text  # the evaluation's prompt pairs occur as such


def test_label_distribution(default):
    train = [r for r in read_manifest(default) if r["split"] == "train"]
    for name in LABELS:
        n = {v: sum(r[name] == v for r in train) for v in ("1", "0", "-1", "")}
        print(name, n)
        if name in VISIBLE:
            assert 0.25 * len(train) <= n["1"] <= 0.45 * len(train) and n["0"] > n[""] > 0 and n["-1"] > 0, (name, n)
        else:  # not drawn: never stated as present
            assert n["1"] == 0 and n[""] > 0, (name, n)


def test_the_models_crop_keeps_the_anatomy(default):
    """The demo preset's centre crop (what the vision encoder sees) holds the lungs and every metal port: at most 5 %
    of the lung-density voxels and no metal voxel of the stored volumes fall outside it (demo v5 cut 56 -> 48 in-plane)."""
    from volumes import PRESETS
    size, crop = PRESETS["demo"]["size"], PRESETS["demo"]["crop"]
    inside = np.zeros(size, bool)
    inside[tuple(slice((n - c) // 2, (n - c) // 2 + c) for n, c in zip(size, crop))] = True
    lung = metal = lung_out = metal_out = 0
    for f in sorted((default / "cache-demo").glob("*.npy")):
        v = np.load(f).astype(np.float32)  # (D, H, W) HU as stored
        lu, me = (v > -920) & (v < -780), v > 1500
        lung, lung_out = lung + lu.sum(), lung_out + (lu & ~inside).sum()
        metal, metal_out = metal + me.sum(), metal_out + (me & ~inside).sum()
    assert metal > 0 and metal_out == 0
    assert lung > 0 and lung_out / lung < 0.05, lung_out / lung


# ---- findings are visible in the voxels ----
LUNGS = (((48, -5, 0), (38, 58, 85)), ((-50, -5, -5), (35, 56, 80)))  # nominal phantom lungs (centre, semi-axes)


def _ml(v, region, lo, hi, vox):  # volume (mL) of voxels with lo < HU < hi inside region
    return float(((v > lo) & (v < hi) & region).sum() * vox)


def _nodules(v, lung, sp):  # compact solid blobs of nodule size (up to 28 mm, 11.5 mL) and density inside the lungs
    lab, _ = ndimage.label((v > -300) & (v < 300) & lung)
    count = 0
    for i, sl in enumerate(ndimage.find_objects(lab), 1):
        m = lab[sl] == i
        extent = max((x.stop - x.start) * s for x, s in zip(sl, sp))
        count += 0.2 < m.sum() * np.prod(sp) / 1000 < 12.5 and 15 < v[sl][m].mean() < 45 and extent <= 36
    return count


def finding_stats(path):
    v, r, a, z, sp, vox = canonical(path)
    nominal = np.zeros(v.shape, bool)
    for c, s in LUNGS:  # a little inside the nominal lungs, and away (> 10 mm) from the contrast-filled blood
        nominal |= ((r - c[0]) / (.95 * s[0])) ** 2 + ((a - c[1]) / (.95 * s[1])) ** 2 + ((z - c[2]) / (.95 * s[2])) ** 2 <= 1
    blood = (v > 120) & (v < 400) & (np.abs(r) < 90) & (a > -50)
    lung = nominal & (ndimage.distance_transform_edt(~blood, sampling=sp) > 10)
    box = lambda x, lo, hi: (x >= lo) & (x <= hi)  # noqa: E731
    return {
        "Medical material": _ml(v, True, 1500, 1e9, vox),  # metal
        "Arterial wall calcification": _ml(v, (a > -46) & ((a < -12) | (z > 20)), 450, 1500, vox),  # aortic wall
        "Coronary artery wall calcification": _ml(v, (a > -5) & (z < 20), 450, 1500, vox),  # front of the heart
        "Cardiomegaly": _ml(v, (a > -12) & (z < 10), 120, 350, vox),  # contrast-filled cardiac chambers
        "Pericardial effusion": _ml(v, box(r, -30, 5) & box(a, 0, 90) & box(z, -80, 10), -30, 30, vox),  # fluid in front
        "Hiatal hernia": _ml(v, box(r, -20, 20) & box(a, -45, 15) & box(z, -120, -55), -2000, -900, vox),  # gas low
        "Lymphadenopathy": _ml(v, box(r, -30, 30) & box(a, -25, 40) & box(z, 25, 85), 10, 100, vox),  # soft tissue in fat
        "Emphysema": _ml(v, lung, -2000, -950, vox),
        "Lung opacity": _ml(v, lung, -650, -350, vox),  # ground glass
        "Consolidation": _ml(v, lung & (z > -25) & (a > -30), 15, 100, vox),
        "Atelectasis": _ml(v, lung & (z < -40), 45, 130, vox),  # enhancing collapsed lung at the bases
        "Pleural effusion": _ml(v, lung & (z < 0) & (a < -25), -30, 30, vox),  # dependent fluid
        "Lung nodule": _nodules(v, lung, sp),
    }


VISIBLE = ["Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
           "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Lung opacity",
           "Consolidation", "Atelectasis", "Pleural effusion", "Lung nodule"]


def auc(pos, neg):
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def test_findings_visible(default):
    rows = read_manifest(default)
    stats = [finding_stats(default / r["image"]) for r in rows]
    for name in VISIBLE:
        keep = [i for i, r in enumerate(rows)  # a nodule inside a consolidation is no longer a separate blob
                if name != "Lung nodule" or r["Consolidation"] not in ("1", "-1")]
        pos = [stats[i][name] for i in keep if rows[i][name] == "1"]
        neg = [stats[i][name] for i in keep if rows[i][name] in ("0", "")]
        score = auc(pos, neg)
        print(f"{name:36s} positives {np.mean(pos):8.2f}  negatives {np.mean(neg):8.2f}  AUC {score:.3f}")
        assert len(pos) >= 30 and len(neg) >= 30
        assert score >= 0.9 and np.mean(pos) - np.mean(neg) > 2 * np.std(neg), name


# ---- where each finding is: masks ----
# HU a mask's voxels must mostly hold (the phantom's values plus noise, sd 12 HU or 25 in the lungs):
# (intervals, least share of the mask's voxels inside them).
MASK_HU = {"Medical material": ([(2000, np.inf)], .95), "Arterial wall calcification": ([(600, 1500)], .95),
           "Coronary artery wall calcification": ([(600, 1500)], .95), "Cardiomegaly": ([(0, 220)], .95),  # 50 and 140
           "Pericardial effusion": ([(-50, 70)], .9), "Pleural effusion": ([(-50, 70)], .9),  # fluid, 10
           "Hiatal hernia": ([(-60, 100), (-np.inf, -900)], .95),  # wall and fluid, or the gas above them
           "Lymphadenopathy": ([(0, 120)], .9), "Lung opacity": ([(-600, -300)], .9),
           "Consolidation": ([(-50, 120)], .9), "Atelectasis": ([(0, 140)], .9), "Lung nodule": ([(-50, 110)], .9),
           # lung lowered from -850 by 80 HU (by 40 when uncertain), with bullae at -1000; healthy lung has 2 % of
           # its voxels below -900 and 21 % below -870
           "Emphysema": ([(-np.inf, -900)], .8), "Emphysema uncertain": ([(-np.inf, -870)], .7)}


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Seed 4567: all 13 drawn findings, 10 of them uncertain somewhere, and one case with none drawn (test split)."""
    return make_demo(tmp_path_factory.mktemp("demo_masks"), n_train=6, n_valid=1, n_test=1, seed=4567)


def test_masks_match_the_drawn_findings(drawn):
    """One uint8 mask per drawn finding stated present or uncertain (none for the 5 findings that are only ever
    written), in the volume's own grid (shape, affine and storage order, RAS or LPS), where the volume shows that
    finding's HU."""
    seen, uncertain = set(), set()
    for r in read_manifest(drawn):
        expect = {name for name in VISIBLE if r[name] in ("1", "-1")}
        if not expect:
            continue
        assert r["masks"] == f"masks/{r['id']}"
        files = sorted(p.name for p in (drawn / r["masks"]).iterdir())
        assert files == sorted(f"{name.replace(' ', '_')}.nii.gz" for name in expect), r["id"]
        img = nib.load(drawn / r["image"])
        v = np.asanyarray(img.dataobj).astype(np.float32)
        for name in expect:
            m = nib.load(drawn / r["masks"] / f"{name.replace(' ', '_')}.nii.gz")
            a = np.asanyarray(m.dataobj)
            assert m.get_data_dtype() == np.uint8 and a.shape == v.shape and np.array_equal(m.affine, img.affine)
            assert set(np.unique(a)) == {0, 1}, (r["id"], name)  # not empty
            x = v[a == 1]
            bands, share = MASK_HU[name + (" uncertain" if name == "Emphysema" and r[name] == "-1" else "")]
            inside = np.any([(x >= lo) & (x <= hi) for lo, hi in bands], axis=0).mean()
            assert inside >= share, (r["id"], name, r[name], inside, np.median(x))
            seen.add(name)
            if r[name] == "-1":
                uncertain.add(name)
    assert seen == set(VISIBLE) and len(uncertain) >= 5, (seen, uncertain)  # the fixture covers every kind


def test_no_drawn_finding_no_masks(drawn):
    """A case with nothing drawn (the 13 drawn findings negated or not mentioned) has an empty masks cell and no
    folder; every other case has its folder."""
    rows = read_manifest(drawn)
    empty = [r for r in rows if not any(r[name] in ("1", "-1") for name in VISIBLE)]
    assert len(empty) == 1 and empty[0]["id"] == "demo_test_0001"
    assert empty[0]["masks"] == "" and not (drawn / "masks" / empty[0]["id"]).exists()
    assert sorted(p.name for p in (drawn / "masks").iterdir()) == sorted(r["id"] for r in rows if r["masks"])
