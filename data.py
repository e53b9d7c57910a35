"""Shared data code for GreenRFM: labels, manifests, CT/MRI loading, the cache and the dataset.

  manifest.csv: id, image, report, split, [spacing, rescale_slope, rescale_intercept], label columns
    -> load_table()         Table: ids, image paths, reports, splits, labels (N, C), nan = not mentioned
    -> preprocess_volume()  image (a NIfTI file, or a DICOM series: a folder or folder::SeriesInstanceUID, read by
                            dicom.py) -> canonical (D, H, W) HU at the preset spacing, air-padded or
                            center-cropped to the preset's stored size; cached as <cache>/<id>.npy
    -> VolumeReportDataset  random (train) or center (eval) crop + intensity windows -> {"image"
                            (K windows, D, H, W), "report", "targets" (C,), "mask" (C,), "id", "index"}
Orientation: nibabel's closest canonical orientation, RAS+ (array axis x points to the patient's
Right, y Anterior, z Superior), then (x, y, z) -> (z, y, x): D runs inferior -> superior (the body's
long axis), H posterior -> anterior, W left -> right, whatever affine the scanner wrote; a rotated or sheared
grid (oblique, gantry tilt) is resampled exactly instead. Spacing is the header's (after reorientation)
unless the manifest's `spacing` column ("x,y,z" mm) overrides it.
Labels: 1 present, 0 absent, -1 uncertain, empty = not mentioned (uncertain/empty masked by default).

Presets (spacing, stored size, crop, intensity rule) are named (PRESETS) or written as JSON: a data set's
dataset.json {"preset": {...}} or `--preset my_preset.json`, so a new modality needs no code edit.

CLI (bad input stops with one line naming the file and row, never a traceback):
  python data.py preprocess --data data/demo --workers 2               # fill the cache
The data-set builders are scripts of their own: `python demo.py` (the synthetic demo set), `python ctrate.py`
(a CT-RATE manifest), `python pacs.py` (a hospital's DICOM export). Of the project, this module imports dicom.py only.
"""
import argparse, csv, hashlib, json, os, re, sys  # noqa: E401
from dataclasses import dataclass, replace
from multiprocessing import Pool
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dicom import SeriesError, is_series, read_series, resample_exact

class DataError(Exception):
    """Bad input data; the message is one line naming the file and the row, ID or problem."""

class UsageError(Exception):
    """A bad command-line flag or flag combination; the message is one line naming the flag."""

def require(ok, message):
    """Raise DataError(message) unless ok: every check of user input reads as one line."""
    if not ok:
        raise DataError(message)

def run_main(fn):
    """Run a script's main(): DataError or UsageError -> one line on stderr, exit 2 (no traceback); Ctrl-C -> 130."""
    try:
        return fn()
    except (DataError, UsageError) as e:  # raised in a DataLoader worker, it carries the worker's traceback: skip it
        msg = str(e).strip()  # one line, or a first line plus one line per item (the series of a DICOM folder)
        print("error:", msg[m.end():] if (m := re.search(r"^[\w.]*(DataError|UsageError): ", msg, re.M)) else msg, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every script's --help: the docstring as written, and every flag's default after its help, unless the help
    already says it ("default: ..."), so that a reader can tell the paper's values from --help alone."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        d = action.default
        return f"{text} (default: {'on' if d is True else 'off' if d is False else 'none' if d is None else '%(default)s'})"

def write_atomic(path, data):
    """Write text or bytes to a temporary file beside `path`, then os.replace it: a reader, or a run
    killed midway, sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    os.replace(tmp, path)
    return path

# ----------------------------------------------------------------------------- labels
CHEST_CT_LABELS = [  # the 18 CT-RATE abnormalities, spelled and ordered as CT-RATE's CSV columns
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening"]
ABDOMEN_CT_LABELS = [  # the 30 Merlin findings
    "submucosal_edema", "renal_hypodensities", "aortic_valve_calcification", "coronary_calcification",
    "thrombosis", "metastatic_disease", "pancreatic_atrophy", "renal_cyst", "osteopenia",
    "surgically_absent_gallbladder", "atelectasis", "abdominal_aortic_aneurysm", "anasarca",
    "hiatal_hernia", "lymphadenopathy", "prostatomegaly", "biliary_ductal_dilation", "cardiomegaly",
    "splenomegaly", "hepatomegaly", "atherosclerosis", "ascites", "pleural_effusion",
    "hepatic_steatosis", "appendicitis", "gallstones", "hydronephrosis", "bowel_obstruction",
    "free_air", "fracture"]
LABEL_SETS = {"chest_ct": CHEST_CT_LABELS, "abdomen_ct": ABDOMEN_CT_LABELS}
ID_COLUMNS = ("id", "VolumeName", "AccessionNo", "NoteAcc_DEID")
# Never label columns ("report_text" is how the CT-CLIP report files spell "report").
NOT_LABELS = set(ID_COLUMNS) | {"image", "report", "report_text", "split", "spacing", "masks",
                                "rescale_slope", "rescale_intercept"}

def read_csv(path):
    """-> (header, rows as dicts). Missing file, duplicate columns, ragged rows -> DataError."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), list(reader)
    except UnicodeDecodeError as e:  # name the row: read again with the bad bytes kept as U+DC80-U+DCFF
        rows = list(csv.reader(Path(path).read_bytes().decode("utf-8", "surrogateescape").splitlines(keepends=True)))
        r = next((r for r, row in enumerate(rows) if re.search("[\udc80-\udcff]", "".join(row))), 0)
        raise DataError(f"{path} row {r}: bytes that are not UTF-8 ({e.object[e.start:e.end]!r}); save it as UTF-8") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"{path}: cannot read CSV ({e})") from None
    require(header and len(set(header)) == len(header), f"{path}: no header row, or a repeated column name")
    bad = next((r for r, row in enumerate(rows, 1) if None in row), 0)  # None: surplus cells
    if bad:  # row 1 is the first row after the header
        raise DataError(f"{path} row {bad}: more cells than header columns")
    return header, rows

def resolve_label_set(spec):
    """"chest_ct" | "abdomen_ct" | labels.txt (one "name[: one-line definition]" a line, '#'
    comments) | a .csv (its header minus id/meta columns) -> (names, {name: definition})."""
    if spec in LABEL_SETS:
        return list(LABEL_SETS[spec]), {}
    path = Path(spec)
    if path.suffix == ".csv":
        return [c for c in read_csv(path)[0] if c not in NOT_LABELS], {}
    require(path.suffix == ".txt" and path.is_file(),
            f"label set {spec!r}: not one of {list(LABEL_SETS)}, nor a .txt or .csv file")
    pairs = [line.split("#", 1)[0].partition(":")[::2] for line in path.read_text().splitlines()]
    names = [n.strip() for n, _ in pairs if n.strip()]
    require(names and len(set(names)) == len(names), f"{path}: no label names, or a name listed twice")
    return names, {n.strip(): d.strip() for n, d in pairs if n.strip() and d.strip()}

def parse_label(value, where):
    """One label cell -> 1.0, 0.0, -1.0, or nan when empty (not mentioned); anything else: DataError."""
    text = (value or "").strip()
    if not text:
        return float("nan")
    require(text in ("1", "1.0", "0", "0.0", "-1", "-1.0"),
            f"{where}: value {text!r} is not one of 1, 0, -1, empty")
    return float(text)

def targets_and_mask(values, uncertain="mask"):
    """Labels (C,) or (N, C) -> (targets, mask) float32: 1 -> (1, 1); 0 -> (0, 1); nan -> (0, 0);
    -1 -> (0, 0) with "mask" (default), (1, 1) "positive", (0, 1) "negative". (Feeding -1 itself
    into BCE would make the loss unbounded below.)"""
    v = np.asarray(values, dtype=np.float32)
    targets, mask = (v == 1).astype(np.float32), (~np.isnan(v)).astype(np.float32)
    if uncertain not in ("mask", "positive", "negative"):
        raise ValueError(f"uncertain={uncertain!r}: use mask, positive or negative")
    if uncertain == "mask":
        mask[v == -1] = 0
    targets[v == -1] = float(uncertain == "positive")
    return targets, mask

def read_labels(path, names=None):
    """Label CSV -> (ids, names, values (N, C) float32, nan = empty). The id is the first of
    ID_COLUMNS present; with `names` the label columns must be exactly those (returned in order)."""
    header, rows = read_csv(path)
    id_col = next((c for c in ID_COLUMNS if c in header), None)
    columns = [c for c in header if c not in NOT_LABELS]
    require(id_col, f"{path}: no id column (one of {', '.join(ID_COLUMNS)})")
    if names is not None:
        missing, unknown = [n for n in names if n not in header], [c for c in columns if c not in names]
        require(not missing and not unknown, f"{path}: label columns: missing {missing}, unknown {unknown}")
        columns = list(names)
    seen, values = {}, np.full((len(rows), len(columns)), np.nan, np.float32)  # seen: id -> row
    for r, row in enumerate(rows, 1):
        rid = (row[id_col] or "").strip()
        require(rid and rid not in seen, f"{path} row {r}: empty or duplicate id {rid!r}")
        seen[rid] = r
        values[r - 1] = [parse_label(row[c], f"{path} row {r} (id {rid}), column {c!r}") for c in columns]
    return list(seen), columns, values

PROTOCOLS = {  # label sets of published evaluation protocols (evaluate.py --protocol), spelled like CT-RATE's CSV columns
    "ctrate18": list(CHEST_CT_LABELS),
    "ctrate16": [n for n in CHEST_CT_LABELS if n not in ("Medical material", "Lymphadenopathy")],
    "radchestct15": [n for n in CHEST_CT_LABELS if n not in ("Medical material", "Lymphadenopathy", "Mosaic attenuation pattern")],
}

# ----------------------------------------------------------------------------- manifests
def volume_key(name):
    """'train_1_a_1.nii.gz' -> 'train_1_a_1': ids match with or without a file extension."""
    return re.sub(r"\.(nii\.gz|nii|npy)$", "", str(name).strip())

def parse_floats(text, n, where, positive=False):
    """"1.5,1.5,3" or "[0.68, 0.68]" -> a tuple of n finite (positive) floats."""
    try:
        out = tuple(float(x) for x in text.strip().strip("[]()").split(","))
    except ValueError:
        out = ()
    require(len(out) == n and np.isfinite(out).all() and (min(out) > 0 or not positive),
            f"{where}: {text!r} is not {n} {'positive ' if positive else ''}number(s)")
    return out

@dataclass
class Table:
    """A dataset in memory, one row per volume(-report) pair: N rows, C labels."""
    ids: list           # str, unique
    images: list        # str path (relative paths already resolved), or None for text-only rows
    reports: list       # str, "" when absent
    splits: list        # "train" | "valid" | "test" | ...
    label_names: list   # C names
    labels: np.ndarray  # (N, C) float32: 1, 0, -1, nan = not mentioned
    meta: list          # per row {"spacing": (x, y, z) mm, "rescale": (slope, intercept)}, optional
    source: str = ""    # the manifest's path, for messages

    def __len__(self):
        return len(self.ids)

    def subset(self, split):
        """The rows of one split (an empty Table if there are none)."""
        return self.take([i for i, s in enumerate(self.splits) if s == split])

    def take(self, idx):
        """The rows at positions idx, in that order."""
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return replace(self, ids=pick(self.ids), images=pick(self.images), reports=pick(self.reports),
                       splits=pick(self.splits), labels=self.labels[idx], meta=pick(self.meta))

    def with_labels(self, path):
        """The labels replaced by a label CSV's, matched on id (with or without extension)."""
        ids, names, values = read_labels(path)
        row_of = {volume_key(i): r for r, i in enumerate(ids)}
        missing = [i for i in self.ids if volume_key(i) not in row_of]
        require(not missing, f"{path}: no row for {len(missing)} of the {len(self)} ids of {self.source}, "
                             f"e.g. {', '.join(missing[:3])}")
        if len(ids) > len(self):  # ids are unique on both sides and all of ours were found
            print(f"{path}: ignoring {len(ids) - len(self)} rows whose ids are not in {self.source}")
        return replace(self, label_names=names, labels=values[[row_of[volume_key(i)] for i in self.ids]])

def manifest_path(path):
    """A manifest CSV, or a folder holding manifest.csv -> the CSV's Path."""
    return Path(path) / "manifest.csv" if Path(path).is_dir() else Path(path)

def dataset_defaults(path):
    """dataset.json beside the manifest (e.g. {"preset": "demo", "text_model": "scratch"}), or {}."""
    f = manifest_path(path).parent / "dataset.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except ValueError as e:
        raise DataError(f"{f}: not valid JSON ({e})") from None

def load_table(path):
    """Manifest CSV (or a folder with manifest.csv) -> Table; image paths relative to its folder."""
    csv_path = manifest_path(path)
    header, rows = read_csv(csv_path)
    id_col = next((c for c in ID_COLUMNS if c in header), None)
    names = [c for c in header if c not in NOT_LABELS]
    t = Table([], [], [], [], names, np.zeros((len(rows), len(names)), np.float32), [], str(csv_path))
    seen = set()
    for r, row in enumerate(rows, 1):
        cell = {c: (v or "").strip() for c, v in row.items()}
        image = cell.get("image") or None  # default id: the image's file name, else the row number
        rid = cell.get(id_col) or (volume_key(Path(image).name) if image else str(r))
        where, meta = f"{csv_path} row {r} (id {rid})", {}
        require(rid not in seen, f"{where}: duplicate id")
        seen.add(rid)
        if cell.get("spacing"):  # overrides the NIfTI header (CT-RATE v1)
            meta["spacing"] = parse_floats(cell["spacing"], 3, f"{where}, column 'spacing'", positive=True)
        if cell.get("rescale_slope") or cell.get("rescale_intercept"):
            meta["rescale"] = parse_floats(f"{cell.get('rescale_slope', '')},{cell.get('rescale_intercept', '')}",
                                      2, f"{where}, columns 'rescale_slope', 'rescale_intercept'")
        t.labels[r - 1] = [parse_label(cell[c], f"{where}, column {c!r}") for c in names]
        t.ids.append(rid)
        t.images.append(str(csv_path.parent / image) if image else None)  # absolute paths stay
        t.reports.append(row.get("report") or row.get("report_text") or "")
        t.splits.append(cell.get("split") or "train")
        t.meta.append(meta)
    return t

# ----------------------------------------------------------------------------- volumes
# spacing is (x, y, z) mm like the NIfTI header; size (as stored) and crop are (D, H, W) voxels.
PRESETS = {
    "chest": dict(spacing=(1.5, 1.5, 3.0), size=(120, 240, 240), crop=(96, 192, 192), intensity="chest"),
    "abdomen": dict(spacing=(1.5, 1.5, 3.0), size=(180, 280, 280), crop=(144, 224, 224), intensity="abdomen"),
    "mri": dict(spacing=(1.5, 1.5, 3.0), size=(120, 240, 240), crop=(96, 192, 192), intensity="mri"),
    "demo": dict(spacing=(4.0, 4.0, 8.0), size=(28, 64, 64), crop=(24, 48, 48), intensity="chest-multi"),
}
AIR_HU = -1024
# CT intensity rules: HU windows (lo, hi), each clipped and mapped linearly onto [-1, 1], one input channel per
# window. "chest" is the paper's single window, in which lymph nodes (60 HU) in fat (-90), calcium on contrast
# blood (140) and emphysema (-950) in lung (-850) differ by an eighth of the range at most. "chest-multi" adds the
# windows a radiologist pages through: mediastinal, lung and calcium/bone (the demo's: see the README).
WINDOWS = {"chest": ((-1000, 200),), "abdomen": ((-1000, 1000),),
           "chest-multi": ((-1000, 200), (-160, 240), (-1000, -700), (200, 1200))}

def get_preset(preset, where="preset"):
    """A preset name, or a dict like PRESETS' values (e.g. read from JSON) -> that dict, checked. Its "intensity" is
    "mri", a WINDOWS name, or a list of HU windows [[lo, hi], ...]: one network input channel per window."""
    if not isinstance(preset, dict):
        require(preset in PRESETS, f"{where}: unknown preset {preset!r} (one of {list(PRESETS)}, or a JSON preset)")
        return PRESETS[preset]
    p = {k: preset.get(k) for k in ("spacing", "size", "crop", "intensity")}
    for key, kind in (("spacing", float), ("size", int), ("crop", int)):
        ok = isinstance(p[key], (list, tuple)) and len(p[key]) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (kind is float or v == int(v)) for v in p[key])
        require(ok, f"{where}: {key!r} must be 3 positive {'numbers (x, y, z mm)' if kind is float else 'integers (D, H, W)'}, got {p[key]!r}")
        p[key] = tuple(kind(v) for v in p[key])
    w = p["intensity"]
    if isinstance(w, list):  # windows from JSON: [[lo, hi], ...]
        require(w and all(isinstance(x, list) and len(x) == 2 and x[0] < x[1] for x in w),
                f"{where}: 'intensity' windows must be [[lo, hi], ...] with lo < hi (HU), got {w!r}")
        p["intensity"] = [[float(lo), float(hi)] for lo, hi in w]
    else:
        require(w == "mri" or w in WINDOWS, f"{where}: 'intensity' must be 'mri', one of {list(WINDOWS)} or a list of HU windows")
    return p

def windows(intensity):
    """An intensity rule -> its HU windows [(lo, hi), ...], or None for MRI (z-score, one channel)."""
    if intensity == "mri":
        return None
    require(not isinstance(intensity, str) or intensity in WINDOWS, f"unknown intensity rule {intensity!r} ({', '.join(WINDOWS)}, mri)")
    return WINDOWS[intensity] if isinstance(intensity, str) else intensity

def preset_name(preset):
    """For messages and the default cache folder: the name, or "custom-<hash of the parameters>"."""
    if isinstance(preset, str):
        return preset
    return "custom-" + hashlib.sha1(json.dumps(get_preset(preset), sort_keys=True).encode()).hexdigest()[:8]

def resolve_preset(spec, data):
    """The preset a stage uses: --preset (a name, or a .json file holding one preset dict), else the data set's
    dataset.json "preset" (a name or a dict), else chest. Checked here, before any work -> a name or a dict."""
    if spec is None:
        where, spec = f"{manifest_path(data).parent / 'dataset.json'}", dataset_defaults(data).get("preset", "chest")
    elif str(spec).endswith(".json"):
        try:
            where, spec = str(spec), json.loads(Path(spec).read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{spec}: cannot read a preset from it ({e})") from None
    elif spec not in PRESETS:
        raise UsageError(f"--preset {spec}: not one of {list(PRESETS)}, nor a .json file")
    else:
        where = f"--preset {spec}"
    get_preset(spec, where)
    return spec

def is_fixed(path):
    """CT-RATE v2 volumes are named *_fixed(.nii.gz) and already hold HU."""
    return volume_key(Path(path).name).endswith("_fixed")

def oblique_degrees(affine):
    """Largest angle (degrees) between a voxel axis (a column of the affine's 3x3 part) and its nearest world axis:
    0 for any flip or permutation of the axes, > 0 for a rotated grid or a sheared one (CT gantry tilt)."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    cosines = np.abs(axes).max(0) / np.linalg.norm(axes, axis=0)  # (3,) per voxel axis
    return float(np.degrees(np.arccos(np.clip(cosines, 0, 1))).max())

def image_exists(path):  # a NIfTI file or a DICOM folder (a folder's series are checked when it is read)
    return os.path.isfile(path) or is_series(path)

def load_volume(path, spacing_out=(1.5, 1.5, 3.0), spacing_in=None, rescale=None, modality=None, grid=False):
    """NIfTI file or DICOM series -> float32 (D, H, W) in canonical orientation at spacing_out (x, y, z mm), HU for CT;
    grid=True: (it, its affine from the (x, y, z) = (W, H, D) index to RAS mm), how maps.py puts a map back. modality:
    the preset's (another is warned). spacing_in (x, y, z) overrides the header; rescale (slope, intercept) turns raw
    CT-RATE v1 values into HU, never for v2 *_fixed files (rescaling twice is a known peer bug) or a DICOM series."""
    series = is_series(path)  # a folder, or folder::SeriesInstanceUID: dicom.py reads it, into the same hand-off
    require(series or os.path.isfile(path), f"{path}: file not found")
    require(not (series and (spacing_in or rescale)), f"{path}: a DICOM series's own headers give its spacing and "
            "rescale; leave the manifest's spacing and rescale cells empty for it")
    try:
        img = nib.Nifti1Image(*read_series(path, modality)) if series else nib.load(path)  # voxels + affine to RAS mm
        shape = img.shape  # (x, y, z), or (x, y, z, 1): one channel
        require(len(shape) >= 3 and min(shape[:3]) > 1 and all(s == 1 for s in shape[3:]),
                f"{path}: expected a 3D volume with one channel, got shape {shape}")
        affine = img.affine.astype(np.float64)
        if spacing_in:  # each voxel axis gets the spacing of the patient axis it runs nearest to
            axes = np.abs(affine[:3, :3]).argmax(0)  # (3,) x, y or z for voxel axes i, j, k
            affine[:3, :3] *= np.asarray(spacing_in, float)[axes] / np.linalg.norm(affine[:3, :3], axis=0)  # per column
        exact = oblique_degrees(affine) > 0.01  # a rotated or sheared grid: resampled exactly, not just flipped
        if exact and oblique_degrees(affine) > 1 and not series:  # dicom.py has named its gantry tilt
            print(f"warning: {path}: oblique or sheared affine (a voxel axis {oblique_degrees(affine):.1f} degrees off the "
                  "nearest canonical axis); resampled exactly onto the patient's axes", file=sys.stderr, flush=True)
        if not exact:
            img = nib.as_closest_canonical(nib.Nifti1Image(img.dataobj, affine, img.header))  # RAS+ by flips, transposes
        vol = np.asanyarray(img.dataobj).reshape(img.shape[:3])  # (x, y, z), as stored (int16 for most CT)
    except DataError:
        raise
    except SeriesError as e:
        raise DataError(str(e)) from None
    except Exception as e:  # truncated gzip, not a NIfTI, ...: nibabel raises many kinds
        raise DataError(f"{path}: cannot read NIfTI ({type(e).__name__}: {str(e)[:200]!r})") from None
    require(vol.dtype.kind != "f" or np.isfinite(vol).all(), f"{path}: volume contains NaN or infinite voxels")
    # Trilinear resampling in torch, in (z, y, x) = (D, H, W) order: NIfTI stores x fastest, so vol.T needs no copy.
    t = torch.from_numpy(np.ascontiguousarray(vol.T)).to(torch.float32, copy=True)
    if rescale is not None and not is_fixed(path):
        t = t * float(rescale[0]) + float(rescale[1])
    if exact:
        t, out_affine = resample_exact(t, affine, np.asarray(spacing_out, float), float(t.min()))
        return (t.numpy(), out_affine) if grid else t.numpy()
    zooms = np.linalg.norm(img.affine[:3, :3], axis=0)  # (x, y, z) mm after reorientation
    require(min(zooms) > 0, f"{path}: voxel spacing {tuple(zooms)} is not positive")
    size = [max(1, round(n * a / b)) for n, a, b in zip(vol.shape, zooms, spacing_out)][::-1]  # (D, H, W)
    if list(t.shape) != size:
        t = F.interpolate(t[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    scale = np.array(vol.shape) / size[::-1]  # (x, y, z) input voxels per output voxel; output voxel i sits at input
    out_affine = img.affine @ np.vstack([np.c_[np.diag(scale), (scale - 1) / 2], [0, 0, 0, 1]])  # (i + 0.5) s - 0.5
    return (t.numpy(), out_affine) if grid else t.numpy()

def pad_or_crop(vol, size, fill=AIR_HU, start=None):
    """vol (D, H, W) -> exactly `size`: center-pad short axes with `fill`, then crop at `start`
    (offsets into the padded volume; default: the center)."""
    pad = [(max(s - n, 0) // 2, max(s - n, 0) - max(s - n, 0) // 2) for n, s in zip(vol.shape, size)]
    vol = np.pad(vol, pad, constant_values=fill) if any(sum(p) for p in pad) else vol
    start = start or [(n - s) // 2 for n, s in zip(vol.shape, size)]
    return vol[tuple(slice(a, a + s) for a, s in zip(start, size))]

def input_channels(preset):
    """Channels of the network input under a preset: one per CT window; MRI 1."""
    return len(windows(get_preset(preset)["intensity"]) or [None])

def require_channels(vision_cfg, preset, where):
    """An encoder built for another number of input channels than the preset's windows: one clear line."""
    k, have = input_channels(preset), vision_cfg.get("in_channels", 1)
    require(have == k, f"{where}: a vision encoder for {have} input channel(s), but preset "
                       f"{preset_name(preset)} gives {k} ({get_preset(preset)['intensity']}); "
                       f"pass the preset it was trained with (--preset)")

def normalize(vol, intensity):
    """Intensity rule -> float32 (D, H, W), or (K, D, H, W) for K windows. A CT window (lo, hi) clips HU
    to it and maps it linearly onto [-1, 1] (chest: (x + 400) / 600; abdomen: x / 1000); mri: clip to the
    volume's 1st-99th percentiles, then z-score."""
    if windows(intensity):
        out = []
        for lo, hi in windows(intensity):
            w = np.clip(vol, lo, hi).astype(np.float32)  # a new array, then shifted and scaled in place
            out.append(np.divide(np.subtract(w, (lo + hi) / 2, out=w), (hi - lo) / 2, out=w))
        return out[0] if len(out) == 1 else np.stack(out)
    vol = np.clip(vol, *np.percentile(vol, [1, 99]))
    return ((vol - vol.mean()) / max(float(vol.std()), 1e-6)).astype(np.float32)

# What an intensity rule implies for the scripts that draw or score a volume (scan.py, maps.py, localise.py), so that
# none of them holds a number of one modality: CT is in HU with air at -1000; an MRI's scale is its own.
def fill_value(intensity):
    """What a stored volume is padded with: air (-1024 HU) for CT, 0 for MRI."""
    return 0.0 if intensity == "mri" else AIR_HU

def body_mask(vol, intensity):
    """The voxels of a stored volume (D, H, W) inside the body: CT above -500 HU (air and aerated lung lie below); MRI
    above a tenth of its 99th percentile (noise and padding lie below, fat-suppressed tissue above)."""
    return vol > (0.1 * np.percentile(vol, 99) if intensity == "mri" else -500)

def display_window(vol, intensity):
    """(lo, hi) to show a stored volume in: the first CT window; an MRI's own 1st-99th percentiles."""
    w = windows(intensity)
    return tuple(w[0]) if w else tuple(np.percentile(vol, [1, 99]).tolist())

def empty_input(intensity):
    """Empty space as the network input reads it, (K,) one value per channel: each CT window's value at -1000 HU (air);
    None for MRI, whose z-scored input has no fixed value for it (a scan's own darkest value stands in)."""
    return None if windows(intensity) is None else normalize(np.full((1, 1, 1), -1000.0), intensity).reshape(-1)

def preprocess_volume(path, preset, meta=None):
    """NIfTI -> the stored (D, H, W) volume at the preset's spacing and size: int16 HU padded with
    air (-1024) for CT; float32 padded with 0 for MRI (its intensities have no fixed scale)."""
    p, meta = get_preset(preset), meta or {}
    vol = load_volume(path, p["spacing"], meta.get("spacing"), meta.get("rescale"), None if p["intensity"] == "mri" else "CT")
    require(vol.max() > vol.min(), f"{path}: every voxel is {vol.flat[0]:g}: an empty or failed export, not an image")
    # A chest or abdomen CT holds air (outside the body, lungs, bowel gas: -1000 HU); one without a voxel below -500 is
    # not HU (a 0-255 export, raw 0..4095 never rescaled, a normalised volume): warned, processed as HU. MRI: exempt.
    if p["intensity"] != "mri" and vol.min() > -500:
        print(f"warning: {path}: values {vol.min():.0f}..{vol.max():.0f}, none below -500: not CT Hounsfield units "
              "(a 0-255 image export? rescale slope/intercept not applied?); processed as HU anyway", file=sys.stderr, flush=True)
    if p["intensity"] == "mri":
        return pad_or_crop(vol, p["size"], 0).astype(np.float32)
    return np.clip(np.rint(pad_or_crop(vol, p["size"], AIR_HU)), -32768, 32767).astype(np.int16)

# ----------------------------------------------------------------------------- cache
def cache_file(cache_dir, rid):
    return Path(cache_dir) / (rid.replace("/", "_").replace("\\", "_") + ".npy")

def check_cache(cache_dir, preset, create=False):
    """The cache's preprocess.json must hold the preset's parameters (written first when create)."""
    p, f = get_preset(preset), Path(cache_dir) / "preprocess.json"
    want = {"spacing": list(p["spacing"]), "size": list(p["size"]), "intensity": p["intensity"]}
    if create and not f.is_file():
        f.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(f, json.dumps(dict(want, preset=preset_name(preset))))
    try:
        have = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{f}: unreadable ({e}); make the cache with `python data.py preprocess`") from None
    require({k: have.get(k) for k in want} == want, f"{f}: made with {have}, not {want}; use another cache")

def preprocess_one(job):
    """Pool worker: one volume -> .npy, atomically (temp file + rename) -> (image, error or None)."""
    image, meta, preset, out = job
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, preprocess_volume(image, preset, meta))
        os.replace(tmp, out)  # a killed run leaves a stray .tmp file, never a half-written .npy
        return image, None
    except Exception as e:  # report every failure and go on with the other volumes
        Path(tmp).unlink(missing_ok=True)
        return image, (str(e) if isinstance(e, DataError) else f"{image}: {type(e).__name__}: {e}")

def preprocess_dataset(data, cache_dir=None, preset=None, workers=1):
    """Cache every image of a manifest, skipping those already cached -> [(image, reason)] failed."""
    preset = resolve_preset(preset, data)
    table = load_table(data)
    cache_dir = Path(cache_dir or Path(table.source).parent / f"cache-{preset_name(preset)}")
    check_cache(cache_dir, preset, create=True)
    for stray in cache_dir.glob("*.npy.tmp*"):  # left behind by a killed run
        stray.unlink()
    jobs = [(img, m, preset, str(cache_file(cache_dir, i)))
            for i, img, m in zip(table.ids, table.images, table.meta) if img]
    todo = [j for j in jobs if not os.path.exists(j[3])]
    print(f"{table.source} -> {cache_dir} (preset {preset_name(preset)}): {len(jobs)} volumes, "
          f"{len(jobs) - len(todo)} already cached, {len(table) - len(jobs)} rows without image")
    if workers > 1 and len(todo) > 1:  # one torch thread per process: the processes share the cores
        with Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            results = list(tqdm(pool.imap_unordered(preprocess_one, todo), total=len(todo)))
    else:
        results = [preprocess_one(j) for j in tqdm(todo)]
    failed = [(img, "\n    ".join(err.strip().splitlines())) for img, err in results if err]  # one line each (+ its list)
    if failed:
        print(f"{len(failed)} of {len(todo)} volumes failed:", *(f"  {e}" for _, e in failed), sep="\n",
              file=sys.stderr)
    return failed

# ----------------------------------------------------------------------------- dataset
class VolumeReportDataset(torch.utils.data.Dataset):
    """Table rows -> {"image" (K, D, H, W) float32 (K = input_channels(preset)) at the crop size (if images), "report",
    "targets" (C,), "mask" (C,), "id", "index"}. Reads <cache_dir>/<id>.npy where it exists."""

    def __init__(self, table, preset, train, cache_dir=None, images=True, seed=0, uncertain="mask"):
        self.table, self.preset, self.train = table, get_preset(preset) if images else None, train
        self.images, self.seed, self.epoch = images, seed, 0
        self.cache_dir = Path(cache_dir) if cache_dir and Path(cache_dir).is_dir() else None
        if self.cache_dir:
            check_cache(self.cache_dir, preset)
        require(not images or None not in table.images, f"{table.source}: a row has no image")
        lost = [i for i, f in enumerate(table.images) if images and not image_exists(f)
                and not (self.cache_dir and cache_file(self.cache_dir, table.ids[i]).is_file())]
        if lost:  # found now, not hours into training
            raise DataError(f"{table.images[lost[0]]}: file not found (id {table.ids[lost[0]]}; {len(lost)} of {len(table)} images missing)")
        self.targets, self.mask = targets_and_mask(table.labels, uncertain)  # (N, C) each

    def set_epoch(self, epoch):
        """New random crops each epoch; a crop depends on (seed, epoch, index) only."""
        self.epoch = epoch

    def __len__(self):
        return len(self.table)

    def stored_volume(self, i):
        """(D, H, W) at the preset's stored size: the cached .npy (memory-mapped) or a fresh preprocess."""
        f = cache_file(self.cache_dir, self.table.ids[i]) if self.cache_dir else None
        if f is not None and f.is_file():
            vol = np.load(f, mmap_mode="r")  # int16 for CT; a float cache could hold NaN if damaged
            require(vol.dtype.kind in "iu" or np.isfinite(vol).all(), f"{f}: cached volume has NaN or infinite voxels")
            return vol
        return preprocess_volume(self.table.images[i], self.preset, self.table.meta[i])

    def __getitem__(self, i):
        item = {"report": self.table.reports[i], "targets": torch.tensor(self.targets[i]),
                "mask": torch.tensor(self.mask[i]), "id": self.table.ids[i], "index": i}
        if self.images:
            window, crop, start = self.preset["intensity"], self.preset["crop"], None  # start None = center crop (eval)
            vol = normalize(self.stored_volume(i), window) if window == "mri" else self.stored_volume(i)  # (D, H, W)
            if self.train:  # seeded by (seed, epoch, index): the same with any number of loader workers
                rng = np.random.default_rng([self.seed, self.epoch, i])
                start = [int(rng.integers(0, max(n, s) - s + 1)) for n, s in zip(vol.shape, crop)]
            # Exactly the crop size (air-padded) so batches stack; CT is windowed after cropping (fewer voxels).
            vol = pad_or_crop(vol, crop, 0.0 if window == "mri" else AIR_HU, start)
            x = np.ascontiguousarray(vol) if window == "mri" else normalize(vol, window)  # (D, H, W) or (K, D, H, W)
            item["image"] = torch.from_numpy(x if x.ndim == 4 else x[None])  # (K, D, H, W)
        return item

# ----------------------------------------------------------------------------- CLI
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preprocess", help="resample and pad every volume of a manifest into a .npy cache",
                       formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="manifest CSV, or a folder holding manifest.csv")
    p.add_argument("--cache", help="cache folder (default: <manifest folder>/cache-<preset>)")
    p.add_argument("--preset", help=f"one of {list(PRESETS)} or a .json preset file; default: dataset.json's preset, else chest")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    args = ap.parse_args(argv)
    sys.exit(1 if preprocess_dataset(args.data, args.cache, args.preset, args.workers) else 0)  # failures listed above

DEMO_DIR = "data/demo"  # where every stage looks for (and builds, demo.ensure_demo) the demo set by default

if __name__ == "__main__":
    run_main(main)
