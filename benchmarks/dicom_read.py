"""
How fast dicom.py reads a CT series and pacs.py indexes an export, against established readers (docs/dicom.md).
  1. writes with pydicom (tests/dicomfake.py) a 300-slice series of 512 x 512 int16 (0.7 mm pixels, 1.0 mm step, a
     body phantom) and an export of --studies studies x 6 series of --size images in patient/study/series folders;
  2. reads the series to float32 (X, Y, Z), the readers taking turns, once the OS file cache is warm (every file read,
     each reader run once, untimed): dicom.read_series; SimpleITK ImageSeriesReader; dcm2niix to NIfTI + nibabel;
  3. checks they agree: voxels and RAS affine (1e-3 mm) after nibabel's as_closest_canonical;
  4. indexes the export: pacs.index_export; SimpleITK's GDCM scan per folder; dcm2niix -b o (JSON sidecars only).
Prints one table (ratios to the fastest of SimpleITK and dcm2niix), writes --json. The references are for this
benchmark only: pip install SimpleITK dcm2niix

  python benchmarks/dicom_read.py                         # about 2 minutes on 2 CPU cores
  python benchmarks/dicom_read.py --workdir /tmp/dcm --compare /tmp/patched/dicom.py   # keeps the files; times a patch
"""
import argparse, datetime, importlib.util, json, os, platform, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # pacs.py's progress bar: not part of the measurement
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import dcm2niix
import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

import dicom, pacs
from data import HelpFormatter
from dicomfake import write_localiser, write_series

p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
p.add_argument("--workdir", default=None, help="folder for the series and the export, kept (default: a temporary one)")
p.add_argument("--json", default="out/bench/dicom_read.json", help="results file (default %(default)s)")
p.add_argument("--repeat", type=int, default=7, help="timed reads of the series per reader (default %(default)s)")
p.add_argument("--index-repeat", type=int, default=5, help="timed indexes of the export each (default %(default)s)")
p.add_argument("--studies", type=int, default=10, help="studies in the export, 6 series each (default %(default)s)")
p.add_argument("--size", type=int, default=64, help="rows and columns of the export's images (default %(default)s)")
p.add_argument("--compare", default=None, help="another dicom.py (a patched copy) to time as one more reader")
args = p.parse_args()
work = Path(args.workdir or tempfile.mkdtemp(prefix="dicom_read_"))
SERIES, EXPORT = work / "series", work / "export"

# ---------------------------------------------------------------- 1. the data
def phantom(shape, seed):
    """(X, Y, Z) int16 HU: air, an elliptic body (40), two lungs (-850, denser towards the feet), noise of SD 20."""
    x, y = np.meshgrid(*[(np.arange(n) - n / 2) / (shape[0] / 2) for n in shape[:2]], indexing="ij")  # half-widths
    hu = np.where((x / 0.85) ** 2 + (y / 0.6) ** 2 < 1, 40.0, -1000.0)
    hu[((np.abs(x) - 0.35) / 0.28) ** 2 + (y / 0.42) ** 2 < 1] = -850
    lung = (hu == -850)[..., None] * np.linspace(0, 100, shape[2], dtype=np.float32)  # (X, Y, Z)
    noise = np.random.default_rng(seed).normal(0, 20, shape).astype(np.float32)
    return np.rint(hu[..., None] + lung + noise).clip(-1024, 3000).astype(np.int16)

def ras(mm, step, coronal=False):
    """Head-first supine, voxel -> RAS mm; coronal: slices stacked front to back, rows running head to feet."""
    a = np.diag([-mm, -mm, step, 1.0])
    if coronal:
        a[:3, 1:3] = [[0, 0], [0, -step], [-mm, 0]]
    a[:3, 3] = (200, 200, -150)
    return a

t0, written = time.perf_counter(), set()
for d in (SERIES, EXPORT):
    shutil.rmtree(d, ignore_errors=True)
write_series(SERIES, phantom((512, 512, 300), 0), ras(0.7, 1.0), intercept=-1024)
KINDS = [("CHEST 1.0 Br60", "Br60", 1.0, 120, False), ("CHEST 1.0 Br40", "Br40", 1.0, 120, False),
         ("CHEST 3.0 Br40", "Br40", 3.0, 40, False), ("CHEST 5.0 Br40", "Br40", 5.0, 24, False),
         ("COR 3.0 MPR", "Br40", 3.0, 20, True)]  # (description, kernel, step mm, slices, coronal)
for s in range(args.studies):
    study, scout, mm, acc = pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 400 / args.size, f"ACC{s:04d}"
    for i, (desc, kernel, step, z, cor) in enumerate(KINDS):
        written.add(write_series(EXPORT / f"p{s:02d}/study1/series{i + 1}", phantom((args.size, args.size, z), i),
                                 ras(mm, step, cor), study_uid=study, accession=acc, description=desc, kernel=kernel,
                                 intercept=-1024)[1])
    write_localiser(EXPORT / f"p{s:02d}/study1/series0", study, series_uid=scout, accession=acc)
    written.add(scout)
n_files = len(dicom.files_under(EXPORT))
print(f"wrote 300 slices of 512 x 512, and {n_files} files of {args.size} x {args.size} in {len(written)} series of "
      f"{args.studies} studies, in {time.perf_counter() - t0:.0f} s under {work}")

# ---------------------------------------------------------------- 2. reading the series
def simpleitk(folder):
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(folder)))
    img, a = r.Execute(), np.eye(4)
    a[:3, :3], a[:3, 3] = np.reshape(img.GetDirection(), (3, 3)) @ np.diag(img.GetSpacing()), img.GetOrigin()  # LPS
    return sitk.GetArrayViewFromImage(img).T.astype(np.float32), np.diag([-1.0, -1, 1, 1]) @ a  # (Z, Y, X) -> (X, Y, Z)

def dcm2niix_nibabel(folder):
    out = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else work)  # in memory: time reading, not disk
    cmd = [dcm2niix.bin, "-z", "n", "-b", "n", "-f", "vol", "-o", out, folder]  # uncompressed NIfTI, no JSON sidecar
    subprocess.run(cmd, check=True, capture_output=True)
    img = nib.load(Path(out) / "vol.nii")
    vol, affine = img.get_fdata(dtype=np.float32), img.affine
    shutil.rmtree(out)
    return vol, affine

READERS = {"ours (dicom.read_series)": dicom.read_series, "SimpleITK ImageSeriesReader": simpleitk,
           "dcm2niix + nibabel": dcm2niix_nibabel}
if args.compare:
    spec = importlib.util.spec_from_file_location("dicom_compared", args.compare)
    spec.loader.exec_module(compared := importlib.util.module_from_spec(spec))
    READERS[f"{args.compare} read_series"] = compared.read_series

def timed(fns, repeat):
    """{name: fn} -> ({name: [seconds]}, {name: result}): each run once untimed, then `repeat` rounds, taking turns."""
    got, times = {k: f() for k, f in fns.items()}, {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times, got

for f in dicom.files_under(work):
    Path(f).read_bytes()  # the OS file cache, warm for every reader
read_times, vols = timed({k: (lambda f=f: f(SERIES)) for k, f in READERS.items()}, args.repeat)

# ---------------------------------------------------------------- 3. do they agree?
canon = {k: nib.as_closest_canonical(nib.Nifti1Image(np.asarray(v), a)) for k, (v, a) in vols.items()}
ref = canon["ours (dicom.read_series)"]
geometry = {k: {"shape": list(c.shape), "max_affine_diff_mm": float(np.abs(c.affine - ref.affine).max()),
                "max_voxel_diff_HU": float(np.abs(c.dataobj - ref.dataobj).max()) if c.shape == ref.shape else None}
            for k, c in canon.items()}
for g in geometry.values():
    g["agrees"] = g["max_voxel_diff_HU"] == 0 and g["max_affine_diff_mm"] <= 1e-3

# ---------------------------------------------------------------- 4. indexing the export
def index_simpleitk():
    found = set()
    for folder, _, names in os.walk(EXPORT):
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) if names else []:
            found |= {uid} if sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid) else set()
    return found

def index_dcm2niix():
    out = Path(tempfile.mkdtemp(dir=work))  # one JSON sidecar per series it found, named by its UID
    subprocess.run([dcm2niix.bin, "-b", "o", "-f", "%j", "-o", str(out), str(EXPORT)], check=True, capture_output=True)
    return {json.loads(f.read_text()).get("SeriesInstanceUID", f.stem) for f in out.glob("*.json")}

INDEXERS = {"ours (pacs.index_export)": lambda: {r["series_uid"] for r in pacs.index_export(str(EXPORT), str(work))[0]},
            "SimpleITK GDCM series scan": index_simpleitk, "dcm2niix -b o (sidecars only)": index_dcm2niix}
index_times, found = timed(INDEXERS, args.index_repeat)
coverage = {k: {"found": len(s & written), "missed": len(written - s), "not_written": len(s - written)}
            for k, s in found.items()}

# ---------------------------------------------------------------- 5. the table and the JSON
rows = []  # each ratio is to the fastest established reader (SimpleITK, dcm2niix) of the task
for task, times, files in (("read 300 x 512 x 512", read_times, 300), (f"index {n_files} files", index_times, n_files)):
    best = min(statistics.median(t) for k, t in times.items() if k.startswith(("SimpleITK", "dcm2niix")))
    rows += [{"reader": k, "task": task, "median_s": statistics.median(t), "min_s": min(t), "runs_s": t,
              "files_per_s": files / statistics.median(t), "ratio_to_fastest": statistics.median(t) / best}
             for k, t in times.items()]
print("\n| reader | task | median s | min s | files/s | ratio to fastest |\n|---|---|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['reader']} | {r['task']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['files_per_s']:.0f} | "
          f"{r['ratio_to_fastest']:.2f} |")
print("\ngeometry against ours (after as_closest_canonical):")
for k, g in geometry.items():
    print(f"  {k}: shape {g['shape']}, voxels differ by at most {g['max_voxel_diff_HU']} HU, affines by "
          f"{g['max_affine_diff_mm']:.1e} mm: {'agrees' if g['agrees'] else 'DISAGREES'}")
print(f"series found in the export ({len(written)} written):")
for k, c in coverage.items():
    print(f"  {k}: {c['found']} found, {c['missed']} missed, {c['not_written']} not written")

now = datetime.datetime.now().isoformat(timespec="seconds")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
run = lambda *cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout.strip()
result = {"date": now, "commit": run("git", "rev-parse", "--short", "@"),
          "machine": {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()},
          "versions": {"python": platform.python_version(), "numpy": np.__version__, "pydicom": pydicom.__version__,
                       "SimpleITK": sitk.Version_VersionString(), "nibabel": nib.__version__,
                       "dcm2niix": run(dcm2niix.bin, "--version").split()[-1]},
          "data": {"series": "300 slices of 512 x 512 int16, 0.7 mm pixels, 1.0 mm step", "export_files": n_files,
                   "export_series": len(written), "export_studies": args.studies, "export_image_size": [args.size] * 2},
          "cache": "warm: every file read once and each reader run once before timing",
          "results": rows, "geometry": geometry, "export_coverage": coverage}
Path(args.json).parent.mkdir(parents=True, exist_ok=True)
Path(args.json).write_text(json.dumps(result, indent=1))
print(f"wrote {args.json}")
if not args.workdir:
    shutil.rmtree(work)
