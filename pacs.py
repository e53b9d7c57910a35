"""
Stage 0 (data): a hospital's DICOM export -> an index of its series, and with a reports CSV, a manifest.

  python pacs.py EXPORT_DIR --out data/hospital                          # data/hospital/scans.csv: one row per series
  python pacs.py EXPORT_DIR --out data/hospital --reports reports.csv    # + data/hospital/manifest.csv

A PACS export is a tree of files, patient / study / series / image, and a study holds several series: lung and
soft-tissue kernels, thin and thick reconstructions, contrast phases, a localiser, a dose report. scans.csv lists
every series with what a person needs to choose one and to join its report: StudyInstanceUID, AccessionNumber,
SeriesInstanceUID, SeriesDescription, modality, kernel, slice count, pixel spacing, slice step, gantry tilt, and
whether it is usable as a chest CT volume (CHEST_RULES) or why not. Only headers are read, so this goes at the
speed of the disk. Files that are not DICOM or cannot be read are counted and named; none stops the walk.

With --reports (a CSV with an accession column, AccessionNumber or AccessionNo, and the report text, report or
report_text), manifest.csv gets one row per report whose study has a usable series: id = the accession number,
image = FOLDER::SeriesInstanceUID of that study's usable series with the thinnest slice step (then the most
slices), split = train (edit it). Which series was chosen is marked in scans.csv (chosen = yes); to take another,
edit the manifest's image cell. Then: `python distill.py --reports data/hospital` labels the reports, and every stage
reads the manifest as it reads the demo's.

Patient names, IDs and birth dates are never written: a series whose folder path holds one of its patient's
identifiers is listed as unusable (rename the folder) rather than written into a manifest.
A script of its own, beside data.py (which it uses), like ctrate.py; dicom.py reads the series themselves.
"""
import argparse
import csv
import gc
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import dicom
from data import HelpFormatter, read_csv, require, run_main, write_atomic

COLUMNS = ["study_uid", "accession", "series_uid", "description", "modality", "kernel", "images", "slices",
           "pixel_spacing", "slice_step", "tilt", "usable", "why_not", "chosen", "image"]
CHEST_RULES = dict(min_extent=100.0, max_step=5.0, max_axis_degrees=45.0)  # mm, mm, degrees: "usable" means these


def why_not_chest(d, g):
    """Is a series (first header d, geometry g from dicom.series_geometry) usable as a chest CT volume?
    -> "" when it is, else the first reason why not."""
    normal = np.cross(g["affine"][:3, 0], g["affine"][:3, 1])
    off_axis = np.degrees(np.arccos(abs(normal[2]) / np.linalg.norm(normal)))
    extent = g["positions"][-1] - g["positions"][0]
    checks = [(str(d.get("Modality", "")) == "CT", f"modality {d.get('Modality', '?')}, not CT"),
              (off_axis <= CHEST_RULES["max_axis_degrees"], "not axial (a coronal or sagittal reformat)"),
              (g["step"] <= CHEST_RULES["max_step"], f"slice step {g['step']:.1f} mm > {CHEST_RULES['max_step']:g} mm"),
              (extent >= CHEST_RULES["min_extent"], f"covers {extent:.0f} mm < {CHEST_RULES['min_extent']:g} mm")]
    try:
        dicom.decoder_check("", d)  # compressed pixel data this install cannot decode
    except dicom.SeriesError as e:
        checks.append((False, str(e).lstrip(": ")))
    return next((why for ok, why in checks if not ok), "")


def identifiers_in(path, d):
    """Does a path hold this patient's name (a part of 3+ letters), ID or birth date? -> bool; the value is never shown.
    Many exports name folders after the patient; such a path in a manifest would carry the name along."""
    name = str(d.get("PatientName", "") or "").replace("^", " ").split()
    values = [p for p in name if len(p) >= 3] + [str(d.get(k, "") or "") for k in ("PatientID", "PatientBirthDate")]
    return any(v and v.lower() in path.lower() for v in values)


def index_export(root, out_dir):
    """Walk a PACS export -> (rows: one dict per series with COLUMNS, {reason: [files]} not in any row, files walked).
    `image` is FOLDER::SeriesInstanceUID relative to out_dir, the form a manifest's image column takes."""
    enabled = gc.isenabled()
    gc.disable()  # thousands of header datasets stay alive, without cycles: each collection would walk them all again
    try:  # (a third of the time on a large export)
        return _index_export(root, out_dir)
    finally:
        if enabled:
            gc.enable()


def _index_export(root, out_dir):
    files = dicom.files_under(root)
    headers = [(f, *dicom.read_header(f)) for f in tqdm(files, unit="file", desc="reading headers", mininterval=1)]
    groups, skipped = dicom.group_series(headers)
    others = {}  # non-image series (dose reports, structured reports): listed, never usable
    for f, d, _ in headers:
        if d is not None and not dicom.is_image(d) and "SeriesInstanceUID" in d:
            others.setdefault(str(d.SeriesInstanceUID), []).append(d)
            skipped[dicom.NOT_IMAGE].remove(f)  # a row of its own, not a skipped file
    if not skipped.get(dicom.NOT_IMAGE, True):
        del skipped[dicom.NOT_IMAGE]
    rows = [dict(dicom.describe(ds[0]), images=len(ds), slices="", pixel_spacing="", slice_step="", tilt="", chosen="",
                 image="", usable="no", why_not="not an image series (a dose report or structured report)")
            for ds in others.values()]
    for uid, items in groups.items():
        d = items[0][1]
        folder = os.path.commonpath([os.path.dirname(f) for f, _ in items])
        row = dict(dicom.describe(d), images=len(items), slices="", pixel_spacing="", slice_step="", tilt="",
                   chosen="", image=f"{os.path.relpath(folder, out_dir)}::{uid}")
        try:
            if all(dicom.is_localiser(x) for _, x in items):
                raise dicom.SeriesError(": a localiser")
            g = dicom.series_geometry(uid, items)
            row.update(slices=len(g["files"]), pixel_spacing="x".join(f"{s:g}" for s in g["spacing"]),
                       slice_step=f"{g['step']:.3f}", tilt=f"{g['tilt']:.2f}")
            why = why_not_chest(d, g)
        except dicom.SeriesError as e:
            why = str(e).split(": ", 1)[-1].splitlines()[0]
        if identifiers_in(row["image"], d):  # the path as it would be written
            why, row["image"] = "its folder path holds a patient identifier: rename the folder (e.g. to the accession)", ""
        rows.append(dict(row, usable="no" if why else "yes", why_not=why))
    rows.sort(key=lambda r: (r["study_uid"], r["series_uid"]))
    return rows, skipped, len(files)


def read_reports(path):
    """Reports CSV -> [(accession, report text)], checked before the export is walked."""
    header, rows = read_csv(path)
    acc = next((c for c in ("AccessionNumber", "AccessionNo", "accession") if c in header), None)
    text = next((c for c in ("report", "report_text") if c in header), None)
    require(acc and text, f"{path}: needs an accession column (AccessionNumber, AccessionNo or accession) "
                          "and a report column (report or report_text)")
    seen = set()
    for r, row in enumerate(rows, 1):
        a = (row[acc] or "").strip()
        require(a and a not in seen, f"{path} row {r}: empty or repeated accession number {a!r}")
        seen.add(a)
    return [((row[acc] or "").strip(), row[text] or "") for row in rows]


def choose(rows, reports):
    """The index + [(accession, report)] -> manifest rows [id, image, report, split]; marks the index rows chosen."""
    out, missing, unusable = [], [], []
    for a, report in reports:
        series = [s for s in rows if s["accession"] == a]
        usable = sorted((s for s in series if s["usable"] == "yes"), key=lambda s: (float(s["slice_step"]), -s["slices"]))
        if not usable:
            (unusable if series else missing).append(a)
            continue
        usable[0]["chosen"] = "yes"
        out.append([a, usable[0]["image"], report, "train"])
    for what, ids in (("no series in the export", missing), ("no usable series (see why_not in scans.csv)", unusable)):
        if ids:
            print(f"{len(ids)} reports skipped, {what}: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}")
    return out


def write_csv(path, header, rows):
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + rows)
    write_atomic(path, buf.getvalue())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("export", help="the export's top folder (any layout below it: patient/study/series, flat, DICOMDIR)")
    p.add_argument("--out", required=True, help="folder for scans.csv (and manifest.csv with --reports)")
    p.add_argument("--reports", default=None, help="CSV of reports: an accession column (AccessionNumber, AccessionNo or "
                                                   "accession) and report or report_text; writes manifest.csv (default: none)")
    args = p.parse_args()
    require(os.path.isdir(args.export), f"{args.export}: not a folder")
    reports = read_reports(args.reports) if args.reports else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, skipped, n_files = index_export(args.export, out)
    seconds = time.perf_counter() - t0
    manifest = choose(rows, reports) if reports is not None else None
    write_csv(out / "scans.csv", COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
    usable = sum(r["usable"] == "yes" for r in rows)
    print(f"wrote {out / 'scans.csv'}: {len(rows)} series in {len({r['study_uid'] for r in rows})} studies, {usable} usable "
          f"as chest CT; {n_files} files in {seconds:.1f} s ({n_files / max(seconds, 1e-9):.0f} files/s)")
    for why, fs in skipped.items():  # counted and named: a user can look at them
        print(f"  {len(fs)} files skipped, {why}: {', '.join(fs[:3])}{' ...' if len(fs) > 3 else ''}", file=sys.stderr)
    if manifest is not None:
        require(manifest, f"{args.reports}: no report matched a usable series of {args.export}")
        write_csv(out / "manifest.csv", ["id", "image", "report", "split"], manifest)
        print(f"wrote {out / 'manifest.csv'}: {len(manifest)} volume-report pairs (split: all train; edit the split column)")


if __name__ == "__main__":
    run_main(main)
