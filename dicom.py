"""DICOM in: a CT series -> (voxels, affine), the hand-off nibabel gives volumes.py for a NIfTI file.

  read_series("export/p1/study/series3")      a folder holding one image series (files anywhere below it)
  read_series("export/p1/study::1.2.840.9")   a folder holding several, one chosen by its SeriesInstanceUID
    -> voxels (X, Y, Z) float32 (HU for CT), affine (4, 4) voxel index -> RAS mm. volumes.Scan takes it from
       there exactly as it takes a NIfTI file: reorientation, resampling and every check after them are shared.
An index of a whole PACS export (one row per series) is pacs.py's: a data-set builder, like ctrate.py.

Geometry comes from two headers alone, as the standard defines it: ImageOrientationPatient (the row and column
directions, LPS) and ImagePositionPatient (each image's first voxel, LPS mm). Slices are sorted by their position
projected on the slice normal (row x column); the step between them is measured from those positions. InstanceNumber,
SliceLocation and SliceThickness are never used for geometry: exports renumber, overlapping reconstructions have a
thickness larger than their step, and SliceLocation's sign and origin are the vendor's. The classic ways to get this
wrong are each refused or handled here, with one line saying which:
  - several series in one folder             refused, one line per series; pick one with FOLDER::SeriesInstanceUID
  - localisers, other orientations           dropped, and counted (a scout stacked into a volume is a known bug)
  - irregular steps (< 1.5x the median)      resampled onto the median step, with a warning
  - a gap (a missing slice, >= 1.5x)          refused, naming the gap's positions
  - gantry tilt (positions off the normal)   kept in the affine as a shear, then resampled exactly (resample_exact)
  - compressed pixel data without a decoder  refused, naming the plugin to install
  - enhanced multi-frame images              refused: one file holds the whole series, another reader's job
Identifiers stay where they are: nothing here prints or returns a patient's name, ID or birth date.
"""
import os
import re
import sys

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError

ENHANCED = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}  # Enhanced CT, Legacy Converted Enhanced CT
NOT_IMAGE = "not an image (a report, dose sheet or DICOMDIR)"
MAX_STEP = 1.5  # a step up to 1.5x the median is jitter, resampled; more is a gap (one missing slice doubles it)


class SeriesError(Exception):
    """A series that cannot become a volume: one line naming the folder or file and why."""


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def split_choice(path):
    """"folder::1.2.3" -> (folder, "1.2.3"); "folder" -> (folder, None)."""
    folder, _, uid = str(path).partition("::")
    return folder, uid.strip() or None


def is_series(path):
    """Is this image path a DICOM folder (with or without ::UID)? A NIfTI path is a file."""
    return os.path.isdir(split_choice(path)[0])


def files_under(folder):
    """Every file below a folder, in a stable order; hidden files (.DS_Store, ...) skipped."""
    return sorted(os.path.join(root, f) for root, dirs, names in os.walk(folder) for f in names if not f.startswith("."))


def read_header(path):
    """-> (dataset without pixel data, None) or (None, reason). DICOMDIR and other non-image objects come back too;
    a file without the DICM preamble or a truncated one gives a reason."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True), None
    except InvalidDicomError:
        return None, "not a DICOM file"
    except Exception as e:  # truncated, a bad element length, ...: pydicom raises many kinds
        return None, f"unreadable ({type(e).__name__})"


def floats(d, keyword, n):
    """A multi-valued numeric header as a float array of length n, or None where missing or malformed."""
    try:
        v = np.array([float(x) for x in d.get(keyword) or []], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return v if v.size == n and np.isfinite(v).all() else None


def is_image(d):
    """A slice of an image series: pixel geometry present (dose reports, SRs, DICOMDIR have none)."""
    return all(k in d for k in ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"))


def is_localiser(d):
    return any(str(t).upper() in ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW") for t in (d.get("ImageType") or []))


def describe(d):
    """What a series is, for listings: never a patient identifier."""
    kernel = d.get("ConvolutionKernel", "")
    kernel = "\\".join(map(str, kernel)) if isinstance(kernel, pydicom.multival.MultiValue) else str(kernel)
    return {"series_uid": str(d.get("SeriesInstanceUID", "")), "description": str(d.get("SeriesDescription", "")),
            "modality": str(d.get("Modality", "")), "kernel": kernel, "study_uid": str(d.get("StudyInstanceUID", "")),
            "accession": str(d.get("AccessionNumber", ""))}


def series_slices(where, items):
    """One series' images [(file, header)] -> ([(file, header)] of its own slices, {reason: count} dropped): localisers
    out, then every image whose orientation is not the series' own (its most images'), e.g. a reformat slipped in."""
    d0 = items[0][1]
    if str(d0.get("SOPClassUID", "")) in ENHANCED or int(d0.get("NumberOfFrames", 1) or 1) > 1:
        raise SeriesError(f"{where}: an enhanced multi-frame image ({d0.get('NumberOfFrames', '?')} frames in one file): "
                          "not supported; export the series as classic single-frame CT images, or convert it with dcm2niix")
    keep = [(f, d) for f, d in items if not is_localiser(d)]
    keys = [tuple(np.round(o, 3)) if (o := floats(d, "ImageOrientationPatient", 6)) is not None else None for _, d in keep]
    common = max(set(keys) - {None}, key=keys.count, default=None)
    if common is None:
        raise SeriesError(f"{where}: no image has a valid ImageOrientationPatient")
    kept = [x for x, k in zip(keep, keys) if k == common]
    if len(kept) < 2:
        raise SeriesError(f"{where}: {len(kept)} image(s) in the series' orientation: not a volume")
    return kept, {"localiser": len(items) - len(keep), "another orientation": len(keep) - len(kept)}


def series_geometry(where, items):
    """One series' images [(file, header)] -> its geometry, or SeriesError naming the problem.
    -> {"files" sorted along the normal, "affine" (4, 4) voxel -> LPS mm, "positions" (Z,) mm along the normal,
        "regular": bool, "step" mm, "tilt" degrees, "spacing" (row, column) mm, "dropped" {reason: count}}."""
    kept, dropped = series_slices(where, items)
    o = floats(kept[0][1], "ImageOrientationPatient", 6)
    row, col = o[:3] / np.linalg.norm(o[:3]), o[3:] / np.linalg.norm(o[3:])
    normal = np.cross(row, col)  # (3,) LPS: the direction slices are stacked along
    missing = lambda v, n: v if v is not None else np.full(n, np.nan)  # noqa: E731
    ipp = np.stack([missing(floats(d, "ImagePositionPatient", 3), 3) for _, d in kept])  # (Z, 3) LPS mm
    bad = [f for (f, _), p in zip(kept, ipp) if not np.isfinite(p).all()]
    if bad:
        raise SeriesError(f"{bad[0]}: no valid ImagePositionPatient ({len(bad)} of {len(kept)} images)")
    spacing = {tuple(missing(floats(d, "PixelSpacing", 2), 2)) for _, d in kept}
    shapes = {(int(d.Rows), int(d.Columns)) for _, d in kept}
    if len(spacing) > 1 or len(shapes) > 1 or not min(next(iter(spacing))) > 0:
        raise SeriesError(f"{where}: images of different sizes or pixel spacings in one series ({sorted(shapes)}, "
                          f"{sorted(spacing)}): a merged export? pick one reconstruction")
    order = np.argsort(ipp @ normal, kind="stable")
    ipp, files = ipp[order], [kept[i][0] for i in order]
    pos = ipp @ normal  # (Z,) mm along the normal, increasing
    steps = np.diff(pos)
    step = float(np.median(steps))
    if steps.min() < 0.01:  # two images at one position: several phases, echoes or reconstructions under one UID
        k = int(np.argmin(steps))
        raise SeriesError(f"{where}: {int((steps < 0.01).sum()) + 1} images share slice positions (e.g. {pos[k]:.2f} mm "
                          "along the normal): several phases or reconstructions in one series; export them apart")
    if steps.max() >= MAX_STEP * step:
        k = int(np.argmax(steps))
        raise SeriesError(f"{where}: a gap of {steps[k]:.2f} mm between the slices at {pos[k]:.2f} and {pos[k + 1]:.2f} mm "
                          f"along the normal (median step {step:.2f} mm): a missing slice? export the whole series again")
    regular = bool(np.abs(steps - step).max() <= 0.01 * step + 1e-3)
    # The third voxel axis is the mean step between positions: along the normal, unless the gantry was tilted (CT), where
    # each slice also moves within its plane and the grid is sheared. Positions off that line are no grid at all.
    axis = (ipp[-1] - ipp[0]) / (pos[-1] - pos[0])  # (3,) LPS mm per mm along the normal
    off = np.abs(ipp - ipp[0] - np.outer(pos - pos[0], axis)).max()
    sp = next(iter(spacing))  # (row spacing, column spacing): DICOM lists the distance between rows first
    if off > 0.1 * min(sp):
        raise SeriesError(f"{where}: slice positions stray up to {off:.2f} mm from a straight line: not one stack of slices")
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = row * sp[1], col * sp[0]  # voxel axis 0 runs along a row (column index)
    affine[:3, 2], affine[:3, 3] = axis * (step if not regular else (pos[-1] - pos[0]) / (len(pos) - 1)), ipp[0]
    tilt = float(np.degrees(np.arccos(min(1.0, 1 / np.linalg.norm(axis)))))  # axis . normal = 1 by construction
    return {"files": files, "affine": affine, "positions": pos, "regular": regular, "step": step, "tilt": tilt,
            "spacing": sp, "dropped": dropped}


def group_series(headers):
    """[(file, header or None, reason)] -> ({series UID: [(file, header)]}, {reason: [files]} skipped). Objects without
    pixel geometry (dose reports, SRs, DICOMDIR) are skipped, and counted."""
    groups, skipped = {}, {}
    for f, d, why in headers:
        sop = pydicom.uid.UID(str(d.get("SOPClassUID", ""))) if d is not None else None
        if d is not None and (not sop or (sop.name.endswith(" Image Storage") and "Secondary" not in sop.name
                                          and not is_image(d))):
            d, why = None, "unreadable (truncated: a header cut short)"  # pydicom returns what it read before the end
        if d is None:
            skipped.setdefault(why, []).append(f)
        elif not is_image(d):
            skipped.setdefault(NOT_IMAGE, []).append(f)
        else:
            groups.setdefault(str(d.get("SeriesInstanceUID", "")), []).append((f, d))
    return groups, skipped


def listing(uid, items):
    """One line about a series for a refusal: UID, description, slice count, spacing, kernel."""
    d, info = items[0][1], describe(items[0][1])
    sp = floats(d, "PixelSpacing", 2)
    return (f"  {uid}  {info['description'] or '(no description)'!r}, {len(items)} images, pixel spacing "
            f"{'x'.join(f'{s:g}' for s in sp) if sp is not None else '?'} mm, kernel {info['kernel'] or '?'}")


def pick_series(path):
    """A folder (or folder::UID) -> (where, [(file, header)] of the one series meant). Refuses a folder of several."""
    folder, uid = split_choice(path)
    if not os.path.isdir(folder):
        raise SeriesError(f"{folder}: folder not found")
    groups, skipped = group_series([(f, *read_header(f)) for f in files_under(folder)])
    for scout in [u for u, items in groups.items() if u != uid and all(is_localiser(d) for _, d in items)]:
        skipped.setdefault("localiser", []).extend(f for f, _ in groups.pop(scout))  # a scout series of its own
    unreadable = [f for why, fs in skipped.items() if why.startswith("unreadable") for f in fs]
    if unreadable or skipped.get("not a DICOM file"):
        warn(f"{folder}: skipped {len(unreadable)} unreadable file(s){f' (e.g. {unreadable[0]})' if unreadable else ''} "
             f"and {len(skipped.get('not a DICOM file', []))} that are not DICOM")
    if uid is not None:
        if uid not in groups:
            raise SeriesError(f"{folder}: no image series {uid} (there are {len(groups)}: {', '.join(groups) or 'none'})")
        return f"{folder} series {uid}", groups[uid], skipped
    if not groups:
        raise SeriesError(f"{folder}: no DICOM image series ({sum(map(len, skipped.values()))} files skipped: "
                          f"{', '.join(f'{len(v)} {k}' for k, v in skipped.items()) or 'the folder is empty'})")
    if len(groups) > 1:  # never guess: a lung and a soft-tissue kernel, or two phases, look alike to a reader
        raise SeriesError(f"{folder}: {len(groups)} series in one folder; pick one as {folder}::SeriesInstanceUID "
                          "(a manifest's image column, or scan.py):\n" + "\n".join(listing(u, g) for u, g in groups.items()))
    return folder, next(iter(groups.values())), skipped


def decoder_check(where, d):
    """Compressed pixel data that pydicom cannot decode here -> one line naming the plugin to install."""
    syntax = getattr(d, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError:
        raise SeriesError(f"{where}: pixel data compressed as {syntax.name} ({syntax}), which pydicom cannot decode") from None
    if not decoder.is_available:  # e.g. "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
        needs = sorted(decoder.missing_dependencies, key=lambda s: not s.startswith("pylibjpeg"))
        pkgs = re.sub(r"[<>=!~][^ ]*", "", needs[0].split("requires", 1)[-1]).replace(" and ", " ").split() if needs else []
        raise SeriesError(f"{where}: pixel data compressed as {syntax.name} ({syntax}); pydicom needs a plugin to decode "
                          f"it: pip install {' '.join(pkgs) or 'pylibjpeg pylibjpeg-libjpeg'} (or python-gdcm)")


def raw_pixels(d):
    """Uncompressed 16-bit little-endian pixels, one sample, all 16 bits stored -> a (Rows, Columns) view of the bytes,
    4x faster than pixel_array over a series; anything else (compressed, 12 of 16 bits, ...) -> None: pixel_array's."""
    syntax = d.file_meta.get("TransferSyntaxUID")
    if (syntax not in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian) or d.get("BitsAllocated") != 16
            or d.get("BitsStored") != 16 or d.get("SamplesPerPixel", 1) != 1 or "PixelData" not in d):
        return None
    rows, cols = int(d.Rows), int(d.Columns)
    if len(d.PixelData) < rows * cols * 2:  # cut short: pixel_array says so
        return None
    return np.frombuffer(d.PixelData, "<i2" if d.get("PixelRepresentation") == 1 else "<u2", rows * cols).reshape(rows, cols)


def read_series(path, expect_modality=None):
    """A DICOM folder (or folder::SeriesInstanceUID) -> (voxels (X, Y, Z) float32, affine (4, 4) RAS mm).
    Voxel [i, j, k] is column i, row j of the k-th slice along the normal; values are rescaled per slice
    (RescaleSlope, RescaleIntercept may differ between images). Warnings go to stderr, one line each."""
    where, items, skipped = pick_series(path)
    g = series_geometry(where, items)
    n = dict(g["dropped"], localiser=g["dropped"]["localiser"] + len(skipped.get("localiser", [])))  # + scout series
    if any(n.values()):
        warn(f"{where}: dropped {', '.join(f'{v} {k}' for k, v in n.items() if v)} image(s), kept {len(g['files'])} slices")
    first = items[0][1]
    if expect_modality and str(first.get("Modality", "")) != expect_modality:
        warn(f"{where}: modality {first.get('Modality', '?')}, not {expect_modality}: the preset's windows assume "
             f"{expect_modality} values; processed anyway")
    vol = None
    for k, f in enumerate(g["files"]):
        try:
            d = pydicom.dcmread(f)
        except Exception as e:
            raise SeriesError(f"{f}: unreadable on the second pass ({type(e).__name__})") from None
        decoder_check(f, d)
        try:
            pix = raw_pixels(d)
            pix = d.pixel_array if pix is None else pix  # (Rows, Columns), as stored
        except Exception as e:
            raise SeriesError(f"{f}: cannot decode pixel data ({type(e).__name__}: {str(e)[:120]})") from None
        if vol is None:
            vol = np.empty((len(g["files"]), *pix.shape), np.float32).T  # (X, Y, Z) view of (Z, Y, X): slices contiguous
        slope, intercept = float(d.get("RescaleSlope", 1) or 1), float(d.get("RescaleIntercept", 0) or 0)
        vol[:, :, k] = pix.T * np.float32(slope) + np.float32(intercept)
    if not g["regular"]:  # linear interpolation along the normal onto the median step, from the first slice to the last
        pos = g["positions"]
        n = int(round((pos[-1] - pos[0]) / g["step"])) + 1
        target = np.linspace(pos[0], pos[-1], n)
        i = np.clip(np.searchsorted(pos, target, side="right") - 1, 0, len(pos) - 2)
        w = ((target - pos[i]) / (pos[i + 1] - pos[i])).astype(np.float32)
        vol = vol[:, :, i] * (1 - w) + vol[:, :, i + 1] * w
        g["affine"][:3, 2] *= (pos[-1] - pos[0]) / (n - 1) / g["step"]
        steps = np.diff(pos)
        warn(f"{where}: irregular slice steps ({steps.min():.2f} to {steps.max():.2f} mm): resampled onto "
             f"{(pos[-1] - pos[0]) / (n - 1):.3f} mm, {n} slices")
    if g["tilt"] > 0.01:
        warn(f"{where}: gantry tilt of {g['tilt']:.1f} degrees (the slices are sheared along the body's axis): "
             "resampled exactly onto the patient's axes")
    return vol, np.diag([-1.0, -1.0, 1.0, 1.0]) @ g["affine"]  # LPS -> RAS: flip the first two world axes


# ----------------------------------------------------------------------------- a rotated or sheared grid
def resample_exact(t, affine, spacing_out, fill):
    """t (Z, Y, X): the stored voxels transposed; affine: voxel (i, j, k) -> RAS mm, rotated or sheared -> (D, H, W) on the
    patient's axes at spacing_out (x, y, z mm). Each output voxel's centre is mapped back into the stored grid and sampled
    trilinearly (`fill` outside it). For an axis-aligned affine this gives what reorienting and F.interpolate give.
    -> (the volume, its affine)."""
    n = np.array(t.shape[::-1], dtype=np.float64)  # (X, Y, Z) voxels
    corners = np.stack(np.meshgrid(*[[-0.5, m - 0.5] for m in n], indexing="ij")).reshape(3, -1)  # (3, 8) voxel edges
    world = affine[:3, :3] @ corners + affine[:3, 3:]  # (3, 8) RAS mm: the volume's box on the patient's axes
    lo, size = world.min(1), np.maximum(1, np.round(np.ptp(world, 1) / spacing_out)).astype(int)  # size (x, y, z)
    centres = [torch.tensor(lo[a] + (np.arange(size[a]) + 0.5) * spacing_out[a]) for a in range(3)]  # mm per axis
    to_voxel = torch.tensor(np.linalg.inv(affine)[:3])  # (3, 4): RAS mm -> stored voxel (i, j, k)
    src, out = (t - fill)[None, None], torch.empty(tuple(size[::-1]))  # fill outside: zero-padding of (t - fill)
    for z in range(0, size[2], 8):  # 8 output slices at a time: one grid for a whole volume would take gigabytes
        zz, yy, xx = torch.meshgrid(centres[2][z:z + 8], centres[1], centres[0], indexing="ij")  # (d, H, W) each
        v = torch.stack([xx, yy, zz, torch.ones_like(xx)], -1) @ to_voxel.T  # (d, H, W, 3) voxel (i, j, k)
        grid = (2 * v + 1) / torch.tensor(n) - 1  # grid_sample's [-1, 1] (align_corners=False); i indexes W, k D
        out[z:z + 8] = F.grid_sample(src, grid[None].float(), mode="bilinear", align_corners=False)[0, 0] + fill
    affine_out = np.diag([*spacing_out, 1.0])
    affine_out[:3, 3] = lo + 0.5 * np.asarray(spacing_out)  # the output's voxel (x, y, z) = (W, H, D) -> RAS mm
    return out, affine_out
