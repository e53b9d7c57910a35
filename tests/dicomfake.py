"""Writing DICOM CT series at test time (the repository holds no DICOM files): a volume and its NIfTI-style RAS affine
-> one classic single-frame CT image per slice, with every header a reader needs and a patient name it must never copy.

  write_series(folder, vol (X, Y, Z), affine_ras)                    the plain case, files named in slice order
  write_series(..., order=rng.permutation(Z), instance_numbers=...)  shuffled files, lying InstanceNumbers
  write_series(..., feet_first=True)                                 the same voxels written as a feet-first scanner does
Used by tests/test_dicom.py and benchmarks/dicom_read.py."""
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

PATIENT_NAME, PATIENT_ID, BIRTH_DATE = "DOE^JANE^Q", "PID-0042-SECRET", "19470312"  # must appear in no output
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS: flip the first two world axes (its own inverse)


def ds(x):
    """A float as a DICOM decimal string (at most 16 characters)."""
    return DSfloat(float(x), auto_format=True)


def header(study_uid, series_uid, *, accession="ACC0001", description="CHEST 1.5", kernel="B30f", modality="CT",
           image_type=("ORIGINAL", "PRIMARY", "AXIAL"), sop_class=CTImageStorage, syntax=ExplicitVRLittleEndian):
    """The headers shared by every image of a series (identifiers of a made-up patient included)."""
    d = Dataset()
    d.file_meta = FileMetaDataset()
    d.file_meta.MediaStorageSOPClassUID, d.file_meta.TransferSyntaxUID = sop_class, syntax
    d.SOPClassUID, d.Modality, d.ImageType = sop_class, modality, list(image_type)
    d.PatientName, d.PatientID, d.PatientBirthDate, d.PatientSex = PATIENT_NAME, PATIENT_ID, BIRTH_DATE, "F"
    d.StudyInstanceUID, d.SeriesInstanceUID, d.AccessionNumber = study_uid, series_uid, accession
    d.SeriesDescription, d.ConvolutionKernel, d.StudyDescription = description, kernel, "CT THORAX"
    d.SamplesPerPixel, d.PhotometricInterpretation = 1, "MONOCHROME2"
    return d


def write_image(path, base, pixels, position, orientation, spacing, *, instance, slope=1.0, intercept=0.0, thickness=None):
    """One image: pixels (Rows, Columns) int16 or uint16 as stored; position (3,) LPS mm; orientation (6,) the row then
    the column direction cosines; spacing (row spacing, column spacing) mm, as DICOM orders PixelSpacing."""
    d = base.copy()
    d.file_meta = base.file_meta.copy()
    d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    d.InstanceNumber = instance
    d.ImagePositionPatient = [ds(v) for v in position]
    d.ImageOrientationPatient = [ds(v) for v in orientation]
    d.PixelSpacing = [ds(v) for v in spacing]
    d.SliceThickness = ds(thickness if thickness is not None else 99)  # deliberately wrong: never used for geometry
    d.SliceLocation = ds(-instance * 7.0)  # deliberately wrong too
    d.Rows, d.Columns = pixels.shape
    d.BitsAllocated = d.BitsStored = 16
    d.HighBit, d.PixelRepresentation = 15, int(pixels.dtype == np.int16)
    d.RescaleSlope, d.RescaleIntercept, d.RescaleType = ds(slope), ds(intercept), "HU"
    d.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    d.save_as(path, enforce_file_format=True)


def write_series(folder, vol, affine_ras, *, study_uid=None, series_uid=None, order=None, instance_numbers=None,
                 feet_first=False, slope=1.0, intercept=0.0, stored=None, positions=None, name="img", **base_kw):
    """vol (X, Y, Z) in HU with a RAS affine (axis-aligned or sheared) -> Z files in `folder`, one per slice k:
    its pixels vol[:, :, k].T (rows run along the affine's second axis), stored = (HU - intercept) / slope as `stored`
    (int16 default). feet_first writes the same voxels as a feet-first scanner does: the row direction reversed (so
    each image is mirrored) and the slices listed head to feet. positions (Z, 3) LPS overrides the slice positions
    (irregular spacing). order: the slice written as file 0, 1, ... Returns (study_uid, series_uid)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
    a = LPS @ np.asarray(affine_ras, dtype=np.float64)  # the voxel -> LPS mm map DICOM's headers describe
    vol = np.asarray(vol)
    if feet_first:  # mirror the rows: voxel i -> X-1-i, so the affine's first column and origin change with it
        a = a @ np.array([[-1, 0, 0, vol.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
        vol = vol[::-1]
    cols, rows = np.linalg.norm(a[:3, :2], axis=0)  # column spacing (along a row), row spacing
    orientation = np.concatenate([a[:3, 0] / cols, a[:3, 1] / rows])
    base = header(study_uid, series_uid, **base_kw)
    stored = np.dtype(stored or np.int16)
    Z = vol.shape[2]
    order = np.arange(Z)[::-1] if feet_first and order is None else (np.arange(Z) if order is None else order)
    for n, k in enumerate(order):
        pix = np.rint((vol[:, :, k].T - intercept) / slope)
        info = np.iinfo(stored)
        assert pix.min() >= info.min and pix.max() <= info.max, "values do not fit the stored type"
        pos = positions[k] if positions is not None else (a @ [0, 0, k, 1])[:3]
        num = int(instance_numbers[n]) if instance_numbers is not None else n + 1
        write_image(folder / f"{name}{n:04d}.dcm", base, pix.astype(stored), pos, orientation, (rows, cols),
                    instance=num, slope=slope, intercept=intercept)
    return study_uid, series_uid


def write_localiser(folder, study_uid, *, series_uid=None, name="scout.dcm", **base_kw):
    """A coronal projection image (ImageType ...\\LOCALIZER), as scanners put beside the axial series."""
    base = header(study_uid, series_uid or generate_uid(), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                  description="Topogram 0.6", kernel="T20f", **base_kw)
    Path(folder).mkdir(parents=True, exist_ok=True)
    pix = np.random.default_rng(0).integers(0, 2000, (64, 48)).astype(np.uint16)
    write_image(Path(folder) / name, base, pix, (-200.0, 0.0, 100.0), (1, 0, 0, 0, 0, -1), (2.0, 2.0), instance=1)


def read_back(path):
    """A written file's dataset, for tests that edit one header."""
    return pydicom.dcmread(path)
