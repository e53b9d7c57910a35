"""Shared data code for GreenRFM: labels, manifests, the cache and the dataset (one scan's preprocessing: volumes.py).

  manifest.csv: id, image, report, split, [spacing, rescale_slope, rescale_intercept], label columns
    -> load_table()           Table: ids, image paths, reports, splits, labels (N, C), nan = not mentioned
    -> preprocess_dataset()   each image (a NIfTI file, or a DICOM series: a folder or folder::SeriesInstanceUID) through
                              volumes.preprocess_volume: canonical (D, H, W) HU at the preset spacing, air-padded or
                              center-cropped to the preset's stored size; cached as <cache>/<id>.npy
    -> VolumeReportDataset    random (train) or center (eval) crop + intensity windows (volumes.model_input) -> {"image"
                              (K windows, D, H, W), "report", "targets" (C,), "mask" (C,), "id", "index"}
Labels: 1 present, 0 absent, -1 uncertain, empty = not mentioned (uncertain/empty masked by default).

The seam with volumes.py: there, one file becomes an array (reading, orientation, resampling, crop, windows, and the
presets that describe them); here, the rows of a data set (labels, manifests, dataset.json, the cache, the Dataset). A
data set chooses its preset (resolve_preset): a name in volumes.PRESETS, or one written as JSON, its dataset.json's
{"preset": {...}} or `--preset my_preset.json`, so a new modality needs no code edit.

CLI (bad input stops with one line naming the file and row, never a traceback):
  python data.py preprocess --data data/demo --workers 2               # fill the cache
The data-set builders are scripts of their own: `python demo.py` (the synthetic demo set), `python ctrate.py`
(a CT-RATE manifest), `python pacs.py` (a hospital's DICOM export). Of the project, this module imports volumes.py only;
its DataError (bad input, one line) and require are volumes.py's, where bad input enters, raised here too.
"""
import argparse, csv, json, os, re, sys  # noqa: E401
from dataclasses import dataclass, replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from volumes import (PRESETS, DataError, get_preset, image_exists, model_input, preprocess_volume, preset_name, require,
                     volume_key)

class UsageError(Exception):
    """A bad command-line flag or flag combination; the message is one line naming the flag."""

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

# ----------------------------------------------------------------------------- presets
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
            vol, start = self.stored_volume(i), None  # (D, H, W); start None = center crop (eval)
            if self.train:  # seeded by (seed, epoch, index): the same with any number of loader workers
                rng = np.random.default_rng([self.seed, self.epoch, i])
                start = [int(rng.integers(0, max(n, s) - s + 1)) for n, s in zip(vol.shape, self.preset["crop"])]
            item["image"] = torch.from_numpy(model_input(vol, self.preset, start))  # (K, D, H, W)
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
