"""pacs.py on a generated PACS export: every series listed with its geometry and whether it is usable as a chest CT
volume; unreadable files counted and named; a reports CSV keyed by accession number joined into a manifest that the
stages read; no patient identifier in any output, and a folder named after the patient never written."""
import csv
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

import data as D
import volumes as V
from conftest import ROOT
from dicomfake import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, write_localiser, write_series

ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
# Each study: (folder, description, kernel, slice step mm, slices, orientation, modality) -> expected usable / why not
SERIES = [("s1", "LUNG 1.0", "B70f", 2.5, 48, "axial", "CT", ""),
          ("s2", "MEDIASTINUM 3.0", "B30f", 3.0, 40, "axial", "CT", ""),
          ("s3", "THICK 10", "B30f", 10.0, 12, "axial", "CT", "slice step 10.0 mm > 5 mm"),
          ("s4", "CORONAL MPR", "B30f", 3.0, 10, "coronal", "CT", "not axial"),
          ("s5", "SHORT", "B30f", 3.0, 9, "axial", "CT", "covers 24 mm < 100 mm")]


def affine_of(step, orientation):
    """RAS affine of a small 8 x 8 x n series: axial (slices along z) or coronal (slices along y)."""
    a = np.diag([-1.5, -1.5, step, 1.0])
    if orientation == "coronal":
        a[:3, 1], a[:3, 2] = [0, 0, 1.5], [0, -step, 0]
    a[:3, 3] = [40, 40, -100]
    return a


def dose_report(folder, study_uid):
    """A radiation dose structured report: a series without pixels, as exports hold one per study."""
    d = Dataset()
    d.file_meta = FileMetaDataset()
    d.file_meta.MediaStorageSOPClassUID = d.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID = generate_uid()
    d.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    d.StudyInstanceUID, d.SeriesInstanceUID, d.Modality, d.SeriesDescription = study_uid, generate_uid(), "SR", "Dose Report"
    d.PatientName, d.AccessionNumber = PATIENT_NAME, "x"
    folder.mkdir(parents=True)
    d.save_as(folder / "dose.dcm", enforce_file_format=True)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """10 studies x (5 image series + a localiser + a dose report) = 70 series (1,211 files), in patient/study/series folders;
    study 9's patient folder is named after the patient. -> (root, {series uid: expected why_not}, accessions)."""
    root = tmp_path_factory.mktemp("pacs") / "export"
    rng, expect, accessions = np.random.default_rng(0), {}, []
    for s in range(10):
        study_uid, acc = generate_uid(), f"ACC{s:04d}"
        accessions.append(acc)
        study = root / ("DOE_JANE" if s == 9 else f"P{s}") / f"study{s}"
        for folder, desc, kernel, step, n, orient, modality, why in SERIES:
            _, uid = write_series(study / folder, rng.integers(-1000, 400, (8, 8, n)).astype(np.int16), affine_of(step, orient),
                                  study_uid=study_uid, accession=acc, description=desc, kernel=kernel, modality=modality)
            expect[uid] = why if s != 9 else "patient identifier"
        scout = generate_uid()
        write_localiser(study / "scout", study_uid, series_uid=scout, accession=acc)
        expect[scout] = "a localiser" if s != 9 else "patient identifier"
        dose_report(study / "dose", study_uid)
    (root / "P0" / "study0" / "s1" / "broken.dcm").write_bytes((root / "P0" / "study0" / "s2" / "img0000.dcm").read_bytes()[:300])
    (root / "P1" / "README.txt").write_text("export manifest\n")
    return root, expect, accessions


def run_pacs(*argv, cwd):
    r = subprocess.run([sys.executable, str(ROOT / "pacs.py"), *map(str, argv)], capture_output=True, text=True, env=ENV,
                       cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_index_lists_every_series(export, tmp_path):
    root, expect, _ = export
    r = run_pacs(root, "--out", tmp_path / "idx", cwd=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "idx" / "scans.csv")))
    image_rows = {r["series_uid"]: r for r in rows if r["why_not"] != "not an image series (a dose report or structured report)"}
    assert len(rows) == 70 and set(image_rows) == set(expect) and len(image_rows) == 60  # + 10 dose reports
    for uid, why in expect.items():
        row = image_rows[uid]
        assert (row["usable"] == "yes") == (why == "") and why in row["why_not"], (row, why)
    lung = next(r for r in rows if r["description"] == "LUNG 1.0" and r["accession"] == "ACC0003")
    assert (lung["kernel"], lung["slices"], lung["images"], lung["pixel_spacing"]) == ("B70f", "48", "48", "1.5x1.5")
    assert float(lung["slice_step"]) == 2.5 and float(lung["tilt"]) == 0 and lung["modality"] == "CT"
    assert lung["image"].endswith(f"P3/study3/s1::{lung['series_uid']}")
    assert V.load_volume(str(tmp_path / "idx" / lung["image"]), (1.5, 1.5, 2.5)).shape == (48, 8, 8)  # the path reads
    assert "wrote" in r.stdout and "70 series in 10 studies, 18 usable" in r.stdout and "files/s" in r.stdout
    assert "1 files skipped, unreadable (truncated: a header cut short)" in r.stderr and "broken.dcm" in r.stderr
    assert "1 files skipped, not a DICOM file" in r.stderr and "README.txt" in r.stderr and "dose" not in r.stderr
    for row in rows:  # the patient-named folder is never written
        assert "DOE" not in row["image"] and (row["image"] or row["usable"] == "no")


def test_reports_join_into_a_manifest_the_stages_read(export, tmp_path):
    root, _, accessions = export
    with open(tmp_path / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["AccessionNumber", "report_text"])
        w.writerows([[a, f"Report {a}: no pleural effusion."] for a in accessions[:9] + accessions[9:] + ["ACC9999"]])
    r = run_pacs(root, "--out", tmp_path / "hosp", "--reports", tmp_path / "reports.csv", cwd=tmp_path)
    assert "1 reports skipped, no series in the export: ACC9999" in r.stdout
    assert "1 reports skipped, no usable series (see why_not in scans.csv): ACC0009" in r.stdout
    table = D.load_table(tmp_path / "hosp")
    assert table.ids == accessions[:9] and table.reports[2] == "Report ACC0002: no pleural effusion."
    scans = list(csv.DictReader(open(tmp_path / "hosp" / "scans.csv")))
    chosen = [s for s in scans if s["chosen"] == "yes"]
    assert len(chosen) == 9 and {s["description"] for s in chosen} == {"LUNG 1.0"}  # the thinnest usable step
    p = subprocess.run([sys.executable, str(ROOT / "data.py"), "preprocess", "--data", str(tmp_path / "hosp"), "--preset",
                        "demo"], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(f.stem for f in (tmp_path / "hosp" / "cache-demo").glob("*.npy")) == accessions[:9]
    secrets = [PATIENT_NAME, "JANE", PATIENT_ID, BIRTH_DATE]
    outputs = [r.stdout, r.stderr, p.stdout, p.stderr] + [f.read_bytes().decode("latin-1")
                                                          for f in (tmp_path / "hosp").rglob("*") if f.is_file()]
    assert not [s for s in secrets for o in outputs if s in o]


def test_bad_input_one_line(tmp_path):
    (tmp_path / "r.csv").write_text("id,text\n1,x\n")
    (tmp_path / "e").mkdir()
    for argv, words in (([tmp_path / "nowhere", "--out", tmp_path / "o"], "not a folder"),
                        ([tmp_path / "e", "--out", tmp_path / "o", "--reports", tmp_path / "r.csv"], "needs an accession column")):
        r = subprocess.run([sys.executable, str(ROOT / "pacs.py"), *map(str, argv)], capture_output=True, text=True, env=ENV)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
