"""scan.py: single NIfTI files and DICOM series through the checkpoint's own preset. The printed probabilities
equal the manifest evaluation's for the same demo volume; findings outside the label set; the real chest CT; bad input
(one line, exit 2) and suspect input (one warning line, then processed), here and in `data.py preprocess`.
Checkpoints have random weights at toy width: the comparison needs the same model on both paths, not a trained one."""
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib

import numpy as np
import pytest
import torch

import checkpoints
import data as D
import evaluate as E
import scan as S
import model as M
import volumes as V
from conftest import ROOT, SAMPLE, run_script

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ROW = re.compile(r"^  (.{34}) +(\d\.\d{4})  +(n/a|\d\.\d{4})  (positive|negative|-) +(positive|negative|-) +(.*)$")  # a finding


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A small demo set (cache filled) and two random-weights aligned checkpoints: preset demo (4 windows) and chest."""
    from demo import make_demo
    d = tmp_path_factory.mktemp("scan")
    make_demo(d / "demo", n_train=2, n_valid=2, n_test=3, seed=0)
    table = D.load_table(d / "demo")
    _, _, text_cfg = M.build_text("scratch", table.reports, max_len=64)
    for preset in ("demo", "chest"):
        torch.manual_seed(0)
        cfg = {"kind": "align", "num_labels": len(table.label_names), "embed_dim": 768, "text": text_cfg,
               "vision": {"in_channels": V.input_channels(preset), "stem": 4, "widths": [8, 16, 16, 16]}}
        checkpoints.save_checkpoint(d / f"{preset}.pt", stage="align", model=M.build_model(cfg), model_config=cfg, args={},
                          label_names=table.label_names, extra={"preset": preset})  # where align.py records it
    return d, table


def cli(monkeypatch, capsys, *argv):
    """scan.py's command line in this process (as its __main__ runs it) -> (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["scan.py", *map(str, argv)])
    try:
        D.run_main(S.main)
        rc = 0
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def tables(stdout):
    """Printed output -> {scan: {finding: (zero-shot, classifier or None)}}."""
    got, scan = {}, None
    for line in stdout.splitlines():
        if line.startswith("scan "):
            scan = got.setdefault(line[5:], {})
        elif (m := ROW.match(line)) and scan is not None:
            scan[m[1].strip()] = (float(m[2]), None if m[3] == "n/a" else float(m[3]))
    return got


def suspect_volumes(d):
    """A uint8 0-255 export and an oblique (10 degrees about z) volume in HU, both at the demo spacing."""
    rng = np.random.default_rng(0)
    u8 = d / "uint8.nii.gz"
    nib.save(nib.Nifti1Image(rng.integers(0, 256, (16, 16, 8)).astype(np.uint8), np.diag([4.0, 4, 8, 1])), str(u8))
    a = np.radians(10)
    rot = np.array([[np.cos(a), -np.sin(a), 0, 0], [np.sin(a), np.cos(a), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    obl = d / "oblique.nii.gz"
    hu = rng.integers(-1000, 200, (16, 16, 8)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, rot @ np.diag([4.0, 4, 8, 1])), str(obl))
    return u8, obl


def test_scan_probabilities_equal_the_manifest_evaluation(ck):
    d, table = ck
    test = table.subset("test").take([0, 2])
    r = subprocess.run([sys.executable, str(ROOT / "scan.py"), *test.images, "--ckpt", str(d / "demo.pt"),
                        "--save-latents", str(d / "lat.npz")], capture_output=True, text=True, env=ENV, cwd=d)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-2000:]
    got = tables(r.stdout)
    # The manifest path: the cached volumes of the split through VolumeReportDataset (center crop) and encode_split.
    model, ckpt = checkpoints.model_from_checkpoint(d / "demo.pt", stage="align")
    model.eval()
    tok, max_len = M.tokenizer_from_cfg(ckpt["model_config"]["text"]), ckpt["model_config"]["text"]["max_len"]
    ds = D.VolumeReportDataset(test, "demo", train=False, cache_dir=d / "demo" / "cache-demo")
    assert ds.cache_dir is not None  # the scans are read from NIfTI, the manifest from the cache
    _, img, _, _ = E.encode_split(model, tok, torch.utils.data.DataLoader(ds, batch_size=2), max_len, "cpu")
    zs = M.zero_shot_scores(img, M.prompt_latents(model, tok, table.label_names, "there_is", max_len, "cpu")).numpy()
    with torch.no_grad():
        clf = torch.sigmoid(model.classifier(img)).numpy()
    assert list(got) == test.images
    for i, image in enumerate(test.images):
        assert list(got[image]) == table.label_names
        printed = np.array(list(got[image].values()))  # (C, 2)
        assert np.abs(printed[:, 0] - zs[i]).max() < 1e-4 and np.abs(printed[:, 1] - clf[i]).max() < 1e-4
    assert 0.01 < np.abs(zs - 0.5).max() and 0.01 < np.abs(clf - 0.5).max()  # not all 0.5: the match means something
    saved = np.load(d / "lat.npz")
    assert saved["latent"].shape == (2, 768) and saved["feature"].shape == (2, model.vision.out_dim)  # 512 at full width
    assert np.allclose(saved["latent"], img.numpy(), atol=1e-5) and list(saved["scans"]) == test.images
    assert np.allclose(saved["feature"] @ model.img_proj.weight.detach().numpy().T, saved["latent"], atol=1e-5)
    assert np.allclose(saved["zero_shot"], zs, atol=1e-6) and np.allclose(saved["classifier"], clf, atol=1e-6)


def test_findings_outside_the_label_set(ck, monkeypatch, capsys):
    d, table = ck
    scan = table.images[0]
    rc, out, err = cli(monkeypatch, capsys, scan, "--ckpt", d / "demo.pt",
                       "--findings", "pneumothorax, rib fracture, pleural effusion", "--save-latents", d / "f.npz")
    assert rc == 0, err
    rows = tables(out)[scan]
    assert list(rows) == ["pneumothorax", "rib fracture", "pleural effusion"]
    assert rows["pneumothorax"][1] is None and rows["rib fracture"][1] is None and rows["pleural effusion"][1] is not None
    assert "2 of 3 findings are not among the checkpoint's trained labels" in out and "prompt pair only" in out
    both = tables(cli(monkeypatch, capsys, scan, "--ckpt", d / "demo.pt")[1])[scan]
    assert rows["pleural effusion"] == both["Pleural effusion"]  # the same prompt pair and classifier output
    assert np.isnan(np.load(d / "f.npz")["classifier"][0, :2]).all()
    (d / "findings.txt").write_text("# asked of the model\npneumothorax: air in the pleural space\nCardiomegaly\n")
    rc, out, _ = cli(monkeypatch, capsys, scan, "--ckpt", d / "demo.pt", "--findings", d / "findings.txt")
    assert rc == 0 and list(tables(out)[scan]) == ["pneumothorax", "Cardiomegaly"]


def test_real_chest_ct(ck, monkeypatch, capsys):
    path = SAMPLE / "ct" / "totalseg_chest_ct_cropped_120x126x164_1.5mm.nii.gz"
    if not path.exists():
        pytest.skip(f"sample data absent: {path}")
    d, table = ck
    rc, out, err = cli(monkeypatch, capsys, path, "--ckpt", d / "chest.pt", "--save-latents", d / "ct.npz")
    assert rc == 0 and not err.strip(), err  # real HU, axis-aligned (LPS): no warning
    assert "preset chest (1.5x1.5x3 mm, center crop 96x192x192)" in out
    rows = tables(out)[str(path)]
    assert list(rows) == table.label_names and all(0 < z < 1 and 0 < c < 1 for z, c in rows.values())
    saved = np.load(d / "ct.npz")
    assert saved["latent"].shape == (1, 768) and np.isfinite(saved["feature"]).all()


def test_real_chest_ct_as_a_dicom_series(ck, tmp_path):
    """The real chest CT written as a DICOM series (files shuffled, InstanceNumber reversed, a localiser beside it):
    `data.py preprocess` caches the NIfTI path's tensor and `scan.py FOLDER` prints its probabilities. The
    headers carry a patient's name, ID and birth date: none of them reaches an output, a log line or the cache."""
    from dicomfake import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, write_localiser, write_series
    path = SAMPLE / "ct" / "totalseg_chest_ct_cropped_120x126x164_1.5mm.nii.gz"
    if not path.exists():
        pytest.skip(f"sample data absent: {path}")
    d, _ = ck
    img = nib.load(path)
    z = img.shape[2]
    study, _ = write_series(tmp_path / "series", np.asanyarray(img.dataobj), img.affine, instance_numbers=np.arange(z, 0, -1),
                            order=np.random.default_rng(0).permutation(z))
    write_localiser(tmp_path / "series", study)
    (tmp_path / "manifest.csv").write_text(f"id,image,report,split\nnifti,{path},,train\ndicom,series,,train\n")
    here = lambda *a: SimpleNamespace(**dict(zip(("returncode", "stdout", "stderr"), run_script(*a, cwd=tmp_path))))  # noqa: E731
    r = here("data.py", "preprocess", "--data", tmp_path, "--preset", "chest")  # in this process (conftest.run_script)
    assert r.returncode == 0, r.stderr[-2000:]
    cache = tmp_path / "cache-chest"
    np.testing.assert_array_equal(np.load(cache / "dicom.npy"), np.load(cache / "nifti.npy"))
    e = here("scan.py", path, tmp_path / "series", "--ckpt", d / "chest.pt", "--save-latents", tmp_path / "lat.npz")
    assert e.returncode == 0, e.stderr[-2000:]
    got = tables(e.stdout)
    assert got[str(tmp_path / "series")] == got[str(path)] and len(got[str(path)]) == 18
    assert "dropped 1 localiser image(s), kept 164 slices" in e.stderr
    secrets = [PATIENT_NAME, *[p for p in PATIENT_NAME.split("^") if len(p) > 2], PATIENT_ID, BIRTH_DATE]
    outputs = [r.stdout, r.stderr, e.stdout, e.stderr] + [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*")
                                                          if p.is_file() and p.parent.name != "series"]
    assert not [s for s in secrets for o in outputs if s in o]


def test_a_folder_of_two_series_is_refused_with_one_line_each(ck, tmp_path):
    """scan.py and data.py preprocess on a study folder: the refusal names each series and how to pick one,
    with no traceback; FOLDER::SeriesInstanceUID then reads."""
    from dicomfake import write_series
    d, _ = ck
    vol = np.random.default_rng(0).integers(-1000, 400, (16, 16, 10)).astype(np.int16)
    uids = [write_series(tmp_path / "study", vol, np.diag([-4.0, -4, 8, 1]), name=n, description=n.upper())[1] for n in "ab"]
    here = lambda *a: SimpleNamespace(**dict(zip(("returncode", "stdout", "stderr"), run_script(*a, cwd=tmp_path))))  # noqa: E731
    r = here("scan.py", tmp_path / "study", "--ckpt", d / "demo.pt")  # in this process (conftest.run_script)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 3 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: ") and "2 series in one folder" in lines[0] and "::SeriesInstanceUID" in lines[0]
    assert uids[0] in lines[1] + lines[2] and uids[1] in lines[1] + lines[2] and "'A', 10 images" in r.stderr
    (tmp_path / "manifest.csv").write_text("id,image,report,split\nboth,study,,train\n")
    p = here("data.py", "preprocess", "--data", tmp_path, "--preset", "demo")
    assert p.returncode == 1 and "1 of 1 volumes failed" in p.stderr and all(u in p.stderr for u in uids), p.stderr
    ok = here("scan.py", f"{tmp_path / 'study'}::{uids[1]}", "--ckpt", d / "demo.pt")
    assert ok.returncode == 0 and len(tables(ok.stdout)) == 1, ok.stderr[-2000:]


def test_bad_input_is_one_line(ck, monkeypatch, capsys):
    d, table = ck
    flat = d / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), str(flat))
    for argv, words in (([flat], "expected a 3D volume"), ([d / "nowhere.nii.gz"], "file not found"),
                        ([table.images[0], "--preset", "chest"], "trained on preset demo")):
        rc, out, err = cli(monkeypatch, capsys, *argv, "--ckpt", d / "demo.pt")
        assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err, err


def test_suspect_volumes_warn_once_and_are_processed(ck, monkeypatch, capsys):
    d, _ = ck
    u8, obl = suspect_volumes(d)
    rc, out, err = cli(monkeypatch, capsys, u8, obl, "--ckpt", d / "demo.pt")
    assert rc == 0 and len(tables(out)) == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "uint8" in lines[0] and "not CT Hounsfield units" in lines[0]
    assert "oblique.nii.gz" in lines[1] and "10.0 degrees" in lines[1]
    # The same warnings from `python data.py preprocess`, which writes both volumes to the cache.
    (d / "manifest.csv").write_text(f"id,image,report,split\nu8,{u8.name},,train\nobl,{obl.name},,train\n")
    r = SimpleNamespace(**dict(zip(("returncode", "stdout", "stderr"),
                                   run_script("data.py", "preprocess", "--data", d, "--preset", "demo", cwd=d))))
    assert r.returncode == 0, r.stderr[-2000:]
    warned = [ln for ln in r.stderr.splitlines() if "warning:" in ln]
    assert len(warned) == 2 and "not CT Hounsfield units" in warned[0] + warned[1] and "10.0 degrees" in r.stderr
    assert sorted(p.name for p in (d / "cache-demo").glob("*.npy")) == ["obl.npy", "u8.npy"]


def counted(monkeypatch, owner, name):
    """Replace owner.name by a wrapper that records each call's first argument -> that list (one entry per call)."""
    calls, real = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_maps_read_a_dicom_series_once(ck, tmp_path, monkeypatch):
    """scan.py --maps reads a series' files once: the probabilities, the resampled volume and the scan's own grid (the
    maps go back onto it) all come from that one read, so the localiser beside it is warned about once, not three times.
    dicom.pick_series lists and reads the folder's headers, first thing in every read of a series."""
    import dicom
    from dicomfake import write_localiser, write_series
    d, _ = ck
    vol = np.random.default_rng(0).integers(-1000, 400, (16, 16, 10)).astype(np.int16)
    study, _ = write_series(tmp_path / "series", vol, np.diag([-4.0, -4, 8, 1]))
    write_localiser(tmp_path / "series", study)
    reads = counted(monkeypatch, dicom, "pick_series")
    code, out, err = run_script("scan.py", tmp_path / "series", "--ckpt", d / "demo.pt", "--findings", "pleural effusion",
                                "--maps", tmp_path / "maps", "--map-method", "exact", cwd=tmp_path)  # in this process
    assert code == 0, err[-2000:]
    assert len(reads) == 1, f"the series was read {len(reads)} times"
    assert err.count("dropped 1 localiser image(s), kept 10 slices") == 1, err
    m = nib.load(tmp_path / "maps" / "series" / "pleural_effusion.nii.gz")
    assert m.shape == vol.shape and np.abs(m.get_fdata()).max() > 0  # on the series' own grid


def test_maps_read_a_nifti_file_once(ck, tmp_path, monkeypatch):
    """The same for a NIfTI file: one nibabel load, and its voxels read from the file once."""
    from nibabel.arrayproxy import ArrayProxy
    d, table = ck
    scan = table.images[0]
    loads = counted(monkeypatch, nib, "load")
    voxel_reads = counted(monkeypatch, ArrayProxy, "__array__")  # np.asanyarray(img.dataobj): the file's voxels
    code, out, err = run_script("scan.py", scan, "--ckpt", d / "demo.pt", "--findings", "pleural effusion",
                                "--maps", tmp_path / "maps", "--map-method", "exact", cwd=tmp_path)  # in this process
    assert code == 0, err[-2000:]
    assert [str(p) for p in loads] == [scan], f"nibabel loaded {loads}"
    assert len(voxel_reads) == 1, f"the voxels were read {len(voxel_reads)} times"
    stem = Path(scan).name.removesuffix(".nii.gz")
    assert nib.load(tmp_path / "maps" / stem / "pleural_effusion.nii.gz").shape == nib.load(scan).shape
