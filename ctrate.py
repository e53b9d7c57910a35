"""
Stage 0 (data): CT-RATE's CSVs -> a generic manifest (see data.py for the manifest format).

  python ctrate.py --reports train_reports.csv --labels train_labels.csv \\
      --volumes CT-RATE/dataset/train --metadata train_metadata.csv --out ctrate/manifest.csv

A script of its own, beside data.py (which it uses), because it reads one data set's file layout and is not
part of the recipe: a fork for another data set writes its manifest its own way.
"""
import argparse
import csv
import io
import os
from pathlib import Path

import numpy as np

from data import HelpFormatter, parse_floats, read_csv, read_labels, require, run_main, write_atomic
from volumes import is_fixed, volume_key


def ctrate_manifest(reports_csv, labels_csv, volumes_dir, out_csv, metadata_csv=None):
    """CT-RATE reports + labels (+ metadata) -> a generic manifest of the volumes found under
    volumes_dir (CT-RATE's train/train_1/train_1_a/ folders, or flat). v1 volumes get spacing and
    rescale from the metadata; v2 *_fixed volumes never do (they already hold HU)."""
    header, rows = read_csv(reports_csv)
    require({"VolumeName", "Findings_EN", "Impressions_EN"} <= set(header),
            f"{reports_csv}: needs columns VolumeName, Findings_EN, Impressions_EN")
    text = {}  # volume name -> findings + "\n" + impression
    for r, row in enumerate(rows, 1):
        require(volume_key(row["VolumeName"]) not in text,
                f"{reports_csv} row {r}: duplicate VolumeName")
        parts = [(row[c] or "").strip() for c in ("Findings_EN", "Impressions_EN")]
        text[volume_key(row["VolumeName"])] = "\n".join(p for p in parts if p)
    ids, names, values = read_labels(labels_csv)
    labels = {volume_key(i): v for i, v in zip(ids, values)}
    for a, b, f in ((text, labels, labels_csv), (labels, text, reports_csv)):
        lost = [k for k in a if k not in b]
        require(not lost, f"{f}: no row for volume {''.join(lost[:1])} ({len(lost)} ids differ between "
                          f"{reports_csv} and {labels_csv})")
    meta = {volume_key(row.get("VolumeName") or ""): (r, row)
            for r, row in enumerate(read_csv(metadata_csv)[1] if metadata_csv else [], 1)}
    require(Path(volumes_dir).is_dir(), f"{volumes_dir}: not a folder")
    files = {volume_key(f): os.path.join(d, f) for d, _, fs in os.walk(volumes_dir)
             for f in fs if f.endswith((".nii.gz", ".nii"))}  # name -> path, whatever the layout
    out = []
    for key, report in text.items():
        path = files.get(key) or files.get(key + "_fixed")
        if path is None:
            continue
        spacing = slope = intercept = ""
        if not is_fixed(path) and key in meta:  # v1: header spacing and raw values need the metadata
            r, m = meta[key]
            where = f"{metadata_csv} row {r} (id {key}), column"
            xyz = parse_floats(m.get("XYSpacing") or "", 2, f"{where} 'XYSpacing'", True) + \
                parse_floats(m.get("ZSpacing") or "", 1, f"{where} 'ZSpacing'", True)
            spacing = ",".join(str(s) for s in xyz)  # full precision
            slope, intercept = ((m.get(c) or "").strip() for c in ("RescaleSlope", "RescaleIntercept"))
        split = key.split("_")[0] if key.split("_")[0] in ("train", "valid") else "train"
        out.append([key, os.path.relpath(path, Path(out_csv).parent), report, split, spacing, slope,
                    intercept] + ["" if np.isnan(v) else str(int(v)) for v in labels[key]])
    require(out, f"{volumes_dir}: none of the {len(text)} volumes of {reports_csv} is there")
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    csv.writer(buf).writerows([["id", "image", "report", "split", "spacing", "rescale_slope",
                                "rescale_intercept"] + names] + out)
    write_atomic(out_csv, buf.getvalue())
    print(f"wrote {out_csv}: {len(out)} volumes ({sum(is_fixed(r[1]) for r in out)} v2 *_fixed, "
          f"already HU); {len(text) - len(out)} reports without a volume file skipped")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--reports", required=True, help="CT-RATE reports CSV (VolumeName, Findings_EN, Impressions_EN)")
    p.add_argument("--labels", required=True, help="CT-RATE multi-abnormality labels CSV")
    p.add_argument("--volumes", required=True, help="folder holding the downloaded .nii.gz volumes (any layout)")
    p.add_argument("--metadata", help="CT-RATE metadata CSV (spacing and rescale of v1 volumes)")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    args = p.parse_args()
    ctrate_manifest(args.reports, args.labels, args.volumes, args.out, args.metadata)


if __name__ == "__main__":
    run_main(main)
