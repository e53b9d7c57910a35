"""One scan becomes an array: a NIfTI file or a DICOM series -> the (K, D, H, W) input the vision encoder reads.

  Scan(path)           the file(s), read once (a DICOM series, a folder or folder::SeriesInstanceUID, by dicom.py): its
                       own grid at once (shape (X, Y, Z), affine voxel index -> RAS mm), its voxels when first asked for
    -> load_volume()        canonical (D, H, W) float32 (HU for CT) at a spacing, and where its voxels lie (grid=True)
    -> preprocess_volume()  at the preset's spacing, air-padded or center-cropped to its stored size: int16 HU, what a
                            data set's cache holds (<cache>/<id>.npy)
    -> model_input()        the preset's crop (a start, or the center), then its intensity windows: (K, D, H, W)
Everything above takes a Scan or a path: a tool that needs more than the array (scan.py's maps go back onto the scan's
own grid) reads the Scan once and hands it on. Presets (spacing, stored size, crop, intensity rule) describe these
steps: named (PRESETS) or the same keys as a dict (read from JSON), checked by get_preset.
Orientation: nibabel's closest canonical orientation, RAS+ (array axis x points to the patient's Right, y Anterior,
z Superior), then (x, y, z) -> (z, y, x): D runs inferior -> superior (the body's long axis), H posterior -> anterior,
W left -> right, whatever affine the scanner wrote; a rotated or sheared grid (oblique, gantry tilt) is resampled
exactly instead. Spacing is the header's (after reorientation) unless the caller's (a manifest's `spacing` column)
overrides it.

The seam with data.py: this module knows one scan and a preset, nothing of manifests, labels, dataset.json, the cache
or the Dataset class, which are data.py's (it imports this module). DataError, the one-line error every script reports
for bad input, is defined here because bad input enters here; data.py raises the same class, and the layers above
reach it there. Of the project, this module imports dicom.py only.
"""
import hashlib, json, os, re, sys  # noqa: E401
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from dicom import SeriesError, is_series, read_series, resample_exact


class DataError(Exception):
    """Bad input data; the message is one line naming the file and the row, ID or problem."""


def require(ok, message):
    """Raise DataError(message) unless ok: every check of user input reads as one line."""
    if not ok:
        raise DataError(message)


# ----------------------------------------------------------------------------- presets
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

def modality(preset):
    """The DICOM Modality a preset's intensity rule assumes: CT for HU windows; None for MRI (no check)."""
    return None if get_preset(preset)["intensity"] == "mri" else "CT"

def input_channels(preset):
    """Channels of the network input under a preset: one per CT window; MRI 1."""
    return len(windows(get_preset(preset)["intensity"]) or [None])

def require_channels(vision_cfg, preset, where):
    """An encoder built for another number of input channels than the preset's windows: one clear line."""
    k, have = input_channels(preset), vision_cfg.get("in_channels", 1)
    require(have == k, f"{where}: a vision encoder for {have} input channel(s), but preset "
                       f"{preset_name(preset)} gives {k} ({get_preset(preset)['intensity']}); "
                       f"pass the preset it was trained with (--preset)")

# ----------------------------------------------------------------------------- reading a scan
def volume_key(name):
    """'train_1_a_1.nii.gz' -> 'train_1_a_1': ids match with or without a file extension."""
    return re.sub(r"\.(nii\.gz|nii|npy)$", "", str(name).strip())

def is_fixed(path):
    """CT-RATE v2 volumes are named *_fixed(.nii.gz) and already hold HU."""
    return volume_key(Path(path).name).endswith("_fixed")

def image_exists(path):  # a NIfTI file or a DICOM folder (a folder's series are checked when it is read)
    return os.path.isfile(path) or is_series(path)

@contextmanager
def reading(path):
    """Whatever reading `path` raises -> DataError, one line naming it: a DICOM series' own line (dicom.SeriesError),
    else what nibabel said (a truncated gzip, not a NIfTI, ...: it raises many kinds)."""
    try:
        yield
    except DataError:
        raise
    except SeriesError as e:
        raise DataError(str(e)) from None
    except Exception as e:
        raise DataError(f"{path}: cannot read NIfTI ({type(e).__name__}: {str(e)[:200]!r})") from None

class Scan:
    """A scan, read once: a NIfTI file or a DICOM series (a folder, or folder::SeriesInstanceUID: dicom.py reads it into
    the hand-off nibabel gives for a NIfTI file). Its own grid comes with the read: shape (X, Y, Z) and affine (4, 4,
    voxel index -> RAS mm), from a NIfTI file's header alone; voxels (X, Y, Z), as stored (int16 for most CT files,
    float32 HU from a series), are read the first time they are asked for, and kept. modality: the preset's (a series of
    another is warned about, once, as it is read)."""

    def __init__(self, path, modality=None):
        self.path, self.series = str(path), is_series(path)
        require(self.series or os.path.isfile(path), f"{path}: file not found")
        with reading(path):
            self.image = nib.Nifti1Image(*read_series(path, modality)) if self.series else nib.load(path)
        shape = self.image.shape  # (x, y, z), or (x, y, z, 1): one channel
        require(len(shape) >= 3 and min(shape[:3]) > 1 and all(s == 1 for s in shape[3:]),
                f"{path}: expected a 3D volume with one channel, got shape {shape}")
        self.shape, self.affine, self._voxels = tuple(shape[:3]), self.image.affine.astype(np.float64), None

    @property
    def voxels(self):
        if self._voxels is None:
            with reading(self.path):
                self._voxels = np.asanyarray(self.image.dataobj).reshape(self.shape)  # a NIfTI file's header scaling applied
        return self._voxels

def oblique_degrees(affine):
    """Largest angle (degrees) between a voxel axis (a column of the affine's 3x3 part) and its nearest world axis:
    0 for any flip or permutation of the axes, > 0 for a rotated grid or a sheared one (CT gantry tilt)."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    cosines = np.abs(axes).max(0) / np.linalg.norm(axes, axis=0)  # (3,) per voxel axis
    return float(np.degrees(np.arccos(np.clip(cosines, 0, 1))).max())

# ----------------------------------------------------------------------------- resampling, cropping, windows
def load_volume(scan, spacing_out=(1.5, 1.5, 3.0), spacing_in=None, rescale=None, modality=None, grid=False):
    """A Scan, or a path read here (modality: the preset's; another is warned) -> float32 (D, H, W) in canonical
    orientation at spacing_out (x, y, z mm), HU for CT; grid=True: (it, its affine from the (x, y, z) = (W, H, D) index to
    RAS mm), how maps.py puts a map back. spacing_in (x, y, z) overrides the header; rescale (slope, intercept) turns raw
    CT-RATE v1 values into HU, never for v2 *_fixed files (rescaling twice is a known peer bug) or a DICOM series."""
    path = scan.path if isinstance(scan, Scan) else str(scan)
    series = scan.series if isinstance(scan, Scan) else is_series(path)
    require(not (series and (spacing_in or rescale)), f"{path}: a DICOM series's own headers give its spacing and "
            "rescale; leave the manifest's spacing and rescale cells empty for it")
    scan = scan if isinstance(scan, Scan) else Scan(path, modality)
    affine = scan.affine.copy()  # voxel index -> RAS mm
    if spacing_in:  # each voxel axis gets the spacing of the patient axis it runs nearest to
        axes = np.abs(affine[:3, :3]).argmax(0)  # (3,) x, y or z for voxel axes i, j, k
        affine[:3, :3] *= np.asarray(spacing_in, float)[axes] / np.linalg.norm(affine[:3, :3], axis=0)  # per column
    exact = oblique_degrees(affine) > 0.01  # a rotated or sheared grid: resampled exactly, not just flipped
    if exact and oblique_degrees(affine) > 1 and not series:  # dicom.py has named its gantry tilt
        print(f"warning: {path}: oblique or sheared affine (a voxel axis {oblique_degrees(affine):.1f} degrees off the "
              "nearest canonical axis); resampled exactly onto the patient's axes", file=sys.stderr, flush=True)
    vol = scan.voxels  # (x, y, z), as stored (int16 for most CT)
    if not exact:  # RAS+ by flips and transposes (nibabel's as_closest_canonical), the affine with them
        with reading(path):
            ornt = nib.orientations.io_orientation(affine)  # (3, 2): per voxel axis, the RAS axis it becomes and its flip
            affine = affine @ nib.orientations.inv_ornt_aff(ornt, vol.shape)
            vol = nib.orientations.apply_orientation(vol, ornt)  # a view: flipped and transposed, not copied
    require(vol.dtype.kind != "f" or np.isfinite(vol).all(), f"{path}: volume contains NaN or infinite voxels")
    # Trilinear resampling in torch, in (z, y, x) = (D, H, W) order: NIfTI stores x fastest, so vol.T needs no copy.
    t = torch.from_numpy(np.ascontiguousarray(vol.T)).to(torch.float32, copy=True)
    if rescale is not None and not is_fixed(path):
        t = t * float(rescale[0]) + float(rescale[1])
    if exact:
        t, out_affine = resample_exact(t, affine, np.asarray(spacing_out, float), float(t.min()))
        return (t.numpy(), out_affine) if grid else t.numpy()
    zooms = np.linalg.norm(affine[:3, :3], axis=0)  # (x, y, z) mm after reorientation
    require(min(zooms) > 0, f"{path}: voxel spacing {tuple(zooms)} is not positive")
    size = [max(1, round(n * a / b)) for n, a, b in zip(vol.shape, zooms, spacing_out)][::-1]  # (D, H, W)
    if list(t.shape) != size:
        t = F.interpolate(t[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    scale = np.array(vol.shape) / size[::-1]  # (x, y, z) input voxels per output voxel; output voxel i sits at input
    out_affine = affine @ np.vstack([np.c_[np.diag(scale), (scale - 1) / 2], [0, 0, 0, 1]])  # (i + 0.5) s - 0.5
    return (t.numpy(), out_affine) if grid else t.numpy()

def pad_or_crop(vol, size, fill=AIR_HU, start=None):
    """vol (D, H, W) -> exactly `size`: center-pad short axes with `fill`, then crop at `start`
    (offsets into the padded volume; default: the center)."""
    pad = [(max(s - n, 0) // 2, max(s - n, 0) - max(s - n, 0) // 2) for n, s in zip(vol.shape, size)]
    vol = np.pad(vol, pad, constant_values=fill) if any(sum(p) for p in pad) else vol
    start = start or [(n - s) // 2 for n, s in zip(vol.shape, size)]
    return vol[tuple(slice(a, a + s) for a, s in zip(start, size))]

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

def preprocess_volume(scan, preset, meta=None, grid=False):
    """A Scan or a path -> the stored (D, H, W) volume at the preset's spacing and size: int16 HU padded with air (-1024)
    for CT; float32 padded with 0 for MRI (its intensities have no fixed scale). meta: a manifest row's {"spacing",
    "rescale"}. grid=True: (it, the affine and shape (D, H, W) of the resampled volume it was padded or cropped from),
    from which maps.crop_affine places the model's input on the patient."""
    p, meta = get_preset(preset), meta or {}
    path = scan.path if isinstance(scan, Scan) else scan
    vol = load_volume(scan, p["spacing"], meta.get("spacing"), meta.get("rescale"), modality(p), grid=grid)
    vol, affine = vol if grid else (vol, None)
    require(vol.max() > vol.min(), f"{path}: every voxel is {vol.flat[0]:g}: an empty or failed export, not an image")
    # A chest or abdomen CT holds air (outside the body, lungs, bowel gas: -1000 HU); one without a voxel below -500 is
    # not HU (a 0-255 export, raw 0..4095 never rescaled, a normalised volume): warned, processed as HU. MRI: exempt.
    if p["intensity"] != "mri" and vol.min() > -500:
        print(f"warning: {path}: values {vol.min():.0f}..{vol.max():.0f}, none below -500: not CT Hounsfield units "
              "(a 0-255 image export? rescale slope/intercept not applied?); processed as HU anyway", file=sys.stderr, flush=True)
    if p["intensity"] == "mri":
        stored = pad_or_crop(vol, p["size"], fill_value(p["intensity"])).astype(np.float32)
    else:
        stored = np.clip(np.rint(pad_or_crop(vol, p["size"], fill_value(p["intensity"]))), -32768, 32767).astype(np.int16)
    return (stored, affine, vol.shape) if grid else stored

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

def model_input(stored, preset, start=None):
    """A stored volume (D, H, W) -> the network's input (K, D, H, W) float32 at the preset's crop size, K its windows:
    cropped at `start` (offsets; None: the center), air-padded so that any volume's input stacks into a batch. CT is
    windowed after cropping (fewer voxels); MRI is z-scored before, over the whole volume."""
    p = get_preset(preset)
    window, crop = p["intensity"], p["crop"]
    vol = normalize(stored, window) if window == "mri" else stored  # (D, H, W)
    vol = pad_or_crop(vol, crop, fill_value(window), start)
    x = np.ascontiguousarray(vol) if window == "mri" else normalize(vol, window)  # (D, H, W) or (K, D, H, W)
    return x if x.ndim == 4 else x[None]
