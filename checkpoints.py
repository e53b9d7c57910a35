"""Checkpoints: one self-describing file per run, the only thing one stage hands to the next.

A checkpoint is a dict of plain values (so torch.load(weights_only=True) reads it without running any pickled code):

    stage          "vision", "text" or "align": which script wrote it, and what it may be used for
    model          the state dict (of the plain module: never DDP's "module." or torch.compile's "_orig_mod." names)
    model_config   the plain dict model.build_model rebuilds the architecture from (no flags needed to read it)
    args           every flag of the run; label_names, the label order of the head's outputs
    optimizer, step, epoch, best_metric, extra (RNG state, history, metrics, preset)   for --resume and the record

    save_checkpoint         writes one atomically: a crash mid-save leaves the previous file whole
    load_checkpoint         reads one and checks it is the stage and label set the caller expects
    model_from_checkpoint   the model rebuilt from the file alone, its weights loaded strictly; exact_fp32: run it in
                            true fp32 on a GPU (no TF32), as evaluate.py and scan.py do
    save_reference, load_reference   what evaluate.py measured of an aligned checkpoint, beside it, for scan.py:
                            <stem>.operating_points.json (thresholds, temperatures, validation scores: readable) and
                            <stem>.features.npz (the training features' Gaussian); both carry the checkpoint's
                            fingerprint, so a file made for other weights is refused, never used
Anything that does not fit is one line naming the file (data.DataError), never a traceback and never a model left
silently at random weights.
"""
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from data import DataError, write_atomic
from model import STAGES, build_model, load_state_strict, unwrap

KEYS = ("stage", "model", "model_config", "args", "label_names", "optimizer", "step", "epoch", "best_metric")


def plain(x):
    """Convert args / configs / metrics to types weights_only unpickling accepts (Path -> str, ...)."""
    if isinstance(x, torch.Tensor) or x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, os.PathLike):
        return str(x)
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if hasattr(x, "tolist"):  # numpy arrays and scalars
        return x.tolist()
    if hasattr(x, "__dict__"):  # argparse.Namespace
        return plain(vars(x))
    return str(x)


def save_checkpoint(path, *, stage, model, model_config, args, label_names, optimizer=None, step=0, epoch=0,
                    best_metric=None, extra=None):
    """Write a checkpoint atomically: a temporary file in the same folder, fsync, then os.replace. A crash mid-save
    leaves the previous checkpoint intact (os.replace is atomic on one filesystem). Keys: KEYS (+ extra)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    ckpt = {"stage": stage, "model": unwrap(model).state_dict(), "model_config": plain(model_config),
            "args": plain(args), "label_names": [str(n) for n in label_names],
            "optimizer": optimizer.state_dict() if optimizer is not None else None, "step": int(step),
            "epoch": int(epoch), "best_metric": None if best_metric is None else float(best_metric)}
    if extra is not None:
        ckpt["extra"] = plain(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if something failed
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a run killed mid-save
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path, stage=None, label_names=None):
    """Read a checkpoint on the CPU and check it is what the caller expects; DataError (one line) if not."""
    path = Path(path)
    want = f"a {stage!r} checkpoint" if stage else "a checkpoint"
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected {want})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of something else, a text file, ...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path}: not a readable checkpoint (expected {want}; {type(e).__name__}: {first})") from None
    missing = [k for k in KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(KEYS)
    if missing:
        raise DataError(f"{path}: not a GreenRFM checkpoint (expected {want}; missing keys {missing})")
    ckpt["path"] = str(path)  # for messages (not saved back)
    if stage is not None and ckpt["stage"] != stage:
        raise DataError(f"{path}: expected a {stage!r} checkpoint, found a {ckpt['stage']!r} checkpoint")
    if label_names is not None and list(label_names) != ckpt["label_names"]:
        want_l, got = list(label_names), ckpt["label_names"]
        diff = sorted(set(want_l) ^ set(got))[:3] or "same names, other order"
        raise DataError(f"{path}: label set differs (expected {len(want_l)} labels, found {len(got)}; e.g. {diff})")
    return ckpt


def model_from_checkpoint(path, stage=None, label_names=None):
    """Rebuild the model from the file alone (model_config) and load its weights strictly -> (model, ckpt)."""
    ckpt = load_checkpoint(path, stage, label_names)
    try:
        model = build_model(ckpt["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: cannot rebuild the model from its model_config ({type(e).__name__}: {e})") from None
    load_state_strict(model, ckpt["model"], path)
    return model, ckpt


def exact_fp32():
    """evaluate.py and scan.py run a loaded model in true fp32 on a GPU (training allows TF32: devices.cuda_speed_flags)."""
    torch.backends.cudnn.allow_tf32 = False  # cuDNN's convolutions use TF32 by default on Ampere and later GPUs
    torch.set_float32_matmul_precision("highest")  # = torch.backends.cuda.matmul.allow_tf32 = False, the default


def fingerprint(path):
    """The first 16 hex digits of the file's SHA-1: which weights a reference was measured on."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:16]


def reference_paths(ckpt_path):
    p = Path(ckpt_path)
    return p.with_name(f"{p.stem}.operating_points.json"), p.with_name(f"{p.stem}.features.npz")


def save_reference(ckpt_path, points, features=None):
    """points: a JSON-able dict (evaluate.py's operating points); features: {"mean", "precision", ...} arrays or None.
    Written atomically beside the checkpoint, stamped with its fingerprint. -> the paths written."""
    js, npz = reference_paths(ckpt_path)
    fp = fingerprint(ckpt_path)
    write_atomic(js, json.dumps({"checkpoint": Path(ckpt_path).name, "fingerprint": fp, **points}, indent=1))
    if features is not None:
        buf = io.BytesIO()
        np.savez(buf, fingerprint=np.array(fp), **features)
        write_atomic(npz, buf.getvalue())
    return [js] + ([npz] if features is not None else [])


def load_reference(ckpt_path):
    """-> (points dict or None, features dict or None): None where evaluate.py has not written one. A file made for
    other weights (another fingerprint) is a DataError naming the command that remakes it."""
    js, npz = reference_paths(ckpt_path)
    points = json.loads(js.read_text()) if js.is_file() else None
    features = dict(np.load(npz)) if npz.is_file() else None
    fp = fingerprint(ckpt_path) if points or features else None
    for f, stamp in ((js, points and points.get("fingerprint")), (npz, features and str(features.get("fingerprint")))):
        if stamp and stamp != fp:
            raise DataError(f"{f}: made for other weights than {ckpt_path} (fingerprint {stamp}, not {fp}); make it "
                            f"again: python evaluate.py --ckpt {ckpt_path} --data <its data set>")
    return points, features
