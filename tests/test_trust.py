"""Can a single scan's answer be trusted: the operating points, calibration and out-of-distribution measures of
metrics.py against hand counts and scipy/sklearn; the reference file beside a checkpoint (refused when made for other
weights); and scan.py's decisions, percentiles, the demo note and the distance, end to end on toy checkpoints."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

import checkpoints
import data as D
import metrics
import model as M
from conftest import run_script


def test_sensitivity_thresholds_by_hand():
    y = np.array([[1], [1], [1], [1], [1], [1], [1], [1], [1], [1], [0], [0], [np.nan], [-1]], dtype=float)
    s = np.array([[.9], [.8], [.7], [.6], [.5], [.4], [.35], [.3], [.2], [.1], [.95], [.05], [.0], [.0]])
    t = metrics.sensitivity_thresholds(y, s, 0.9)  # 10 positives: keep 9, so the threshold is the second lowest, 0.2
    assert t[0] == 0.2 and (s[:10, 0] >= t[0]).mean() == 0.9
    assert metrics.sensitivity_thresholds(y[:5], s[:5], 0.9)[0] == 0.5  # 5 positives: 0.9 of them needs all 5
    assert np.isnan(metrics.sensitivity_thresholds(np.zeros((3, 1)), s[:3], 0.9)[0])  # no positive, no threshold


def test_calibration_error_by_hand():
    y = np.array([[1, 0], [0, 0], [1, np.nan], [1, -1]])
    p = np.array([[0.95, 0.05], [0.15, 0.12], [0.91, 0.5], [0.55, 0.9]])
    ece, bins = metrics.calibration_error(y, p, bins=10)
    # references: (1, .95) (0, .15) (1, .91) (1, .55) (0, .05) (0, .12): bins 0 {.05}, 1 {.15, .12}, 5 {.55}, 9 {.95, .91}
    want = (1 * .05 + 2 * abs(0 - .135) + 1 * abs(1 - .55) + 2 * abs(1 - .93)) / 6
    assert ece == pytest.approx(want) and bins[9][2] == 2 and bins[9][1] == 1 and bins[3][2] == 0
    assert metrics.calibration_error(np.array([[1.0], [0.0]]), np.array([[1.0], [0.0]]))[0] == 0


def test_temperature_recovers_a_known_one_and_keeps_the_auc():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 6, (4000, 3))  # logits 3x too confident: the truth is sigmoid(z / 3)
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z / 3))).astype(float)
    t = metrics.fit_temperature(z, y)
    assert t == pytest.approx(3, rel=0.1)
    before = metrics.calibration_error(y, 1 / (1 + np.exp(-z)))[0]
    after = metrics.calibration_error(y, 1 / (1 + np.exp(-z / t)))[0]
    assert after < before / 3
    assert metrics.per_label_auc(y, 1 / (1 + np.exp(-z / t)))[0] == metrics.per_label_auc(y, z)[0]


def test_platt_fits_a_hand_made_shift_per_label_and_keeps_each_order():
    """Label 0: the truth is sigmoid(2 z - 1.5); label 1: sigmoid(0.5 z + 1); label 2 has 4 positives, too few for two
    numbers: it keeps the temperature. One temperature could not fit both shifts."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (6000, 3))
    truth = np.stack([2 * z[:, 0] - 1.5, 0.5 * z[:, 1] + 1, z[:, 2]], 1)
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-truth))).astype(float)
    y[:, 2] = 0
    y[:4, 2] = 1
    y[4:10, 0] = -1  # uncertain rows carry no reference
    a, b, fitted = metrics.fit_platt(z, y, temperature=4.0)
    assert fitted.tolist() == [True, True, False]
    assert a[0] == pytest.approx(2, rel=0.1) and b[0] == pytest.approx(-1.5, abs=0.15)
    assert a[1] == pytest.approx(0.5, rel=0.1) and b[1] == pytest.approx(1, abs=0.15)
    assert (a[2], b[2]) == (0.25, 0.0)  # 1 / T, no shift
    p = metrics.platt_probabilities(z, a, b)
    for c in range(3):  # a monotone map per label: the same order, so the same AUC
        assert (np.argsort(p[:, c], kind="stable") == np.argsort(z[:, c], kind="stable")).all()
        assert metrics.per_label_auc(y[:, c:c + 1], p[:, c:c + 1])[0] == metrics.per_label_auc(y[:, c:c + 1], z[:, c:c + 1])[0]
    t = metrics.fit_temperature(z[:, :2], y[:, :2])
    platt, temp = (metrics.calibration_error(y[:, :2], q)[0] for q in (p[:, :2], 1 / (1 + np.exp(-z[:, :2] / t))))
    assert platt < temp / 2  # the shifts are what one temperature cannot absorb
    # a score that says nothing: the fit wants a = 0 (every probability the prevalence); the floor keeps the ranking
    # (every score value: 3 positives in 10, so the best fit is a = 0, b = logit(0.3))
    noise = np.repeat(np.linspace(-3, 3, 200), 10)[:, None]  # (2000, 1)
    a, b, fitted = metrics.fit_platt(noise, np.tile([1.0] * 3 + [0.0] * 7, 200)[:, None], temperature=2.0)
    assert fitted[0] and a[0] == pytest.approx(0.5 / 100) and len(np.unique(metrics.platt_probabilities(noise, a, b))) == 200


def test_platt_probabilities_of_far_scans_do_not_overflow():
    """A scan far from the training data gives logits of hundreds: 0 and 1 with no overflow warning (np.exp gave one)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = metrics.platt_probabilities(np.array([[-800.0, 0.0, 800.0]]), np.ones(3), np.zeros(3))
    np.testing.assert_array_equal(p, [[0.0, 0.5, 1.0]])


def test_mahalanobis_against_scipy():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    mean, precision = metrics.fit_gaussian(feats)
    q = rng.normal(size=(4, 6)) * 3
    want = [scipy_mahalanobis(x, mean, precision) for x in q]
    np.testing.assert_allclose(metrics.mahalanobis(q, mean, precision), want, rtol=1e-10)
    np.testing.assert_allclose(mean, feats.mean(0))


def test_reference_made_for_other_weights_is_refused(tmp_path):
    ck = tmp_path / "best.pt"
    ck.write_bytes(b"weights one")
    js, npz = checkpoints.save_reference(ck, {"split": "valid"}, {"mean": np.zeros(3), "precision": np.eye(3)})
    assert js.name == "best.operating_points.json" and npz.name == "best.features.npz"
    points, features = checkpoints.load_reference(ck)
    assert points["split"] == "valid" and features["precision"].shape == (3, 3)
    ck.write_bytes(b"weights two")  # retrained in place: the old measurements describe other weights
    with pytest.raises(D.DataError, match="made for other weights") as e:
        checkpoints.load_reference(ck)
    assert "\n" not in str(e.value) and "python evaluate.py --ckpt" in str(e.value)
    assert checkpoints.load_reference(tmp_path / "other.pt") == (None, None)  # none made: no reference, no error


# ----------------------------------------------------------------------------- scan.py on a small trained model

def run(script, *argv, cwd, ok=True):
    """A script's command line, in this process (conftest.run_script) -> an object with returncode, stdout, stderr."""
    code, out, err = run_script(script, *argv, cwd=cwd)
    assert (code == 0) == ok, err[-3000:]
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo set of 200 training volumes, a lite vision encoder trained on it for 2 epochs (about 30 s on one thread), an aligned
    checkpoint around it (scratch text encoder, projections at random) that records its data, and evaluate.py's
    reference beside it. The checks below need a trained encoder: random weights see no up or down."""
    from demo import make_demo
    d = tmp_path_factory.mktemp("trust")
    make_demo(d / "demo", n_train=200, n_valid=50, n_test=10, seed=0)
    run("pretrain_vision.py", "--lite", "--data", d / "demo", "--epochs", "2", "--workers", "0", "--out", d / "vis", cwd=d)
    table = D.load_table(d / "demo")
    vck = checkpoints.load_checkpoint(d / "vis" / "best.pt", stage="vision")
    text, _, _ = M.build_text("scratch", table.reports, max_len=64)
    torch.manual_seed(0)
    model, cfg = M.greenrfm_from_pretrained(len(table.label_names), 768, vck, None, vck["model_config"]["vision"], text)
    data = {"source": str(d / "demo" / "manifest.csv"), "name": "demo", "train_volumes": 200, "synthetic": True}
    checkpoints.save_checkpoint(d / "best.pt", stage="align", model=model, model_config=cfg, args={},
                                label_names=table.label_names, extra={"preset": "demo", "data": data})
    r = run("evaluate.py", "--ckpt", d / "best.pt", "--data", d / "demo", "--bootstrap", "0", "--out", d / "eval", cwd=d)
    assert "feature reference: 200 training volumes" in r.stdout
    return d, table


# Whichever of these tests runs first pays for the fixture: about 45 s (demo set, training, evaluate.py) on one thread.
TRAINS = pytest.mark.long(reason="the first test to use `trained` trains its encoder (2 epochs on 200 volumes): the "
                                 "trust checks need trained weights, random ones see no up or down")


def flagged(stderr):
    return {ln.split(": ")[1] for ln in stderr.splitlines() if ln.startswith("warning: ") and "should not be trusted" in ln}


@TRAINS
def test_corrupted_inputs_are_flagged_and_test_volumes_are_not(trained):
    from benchmarks.trust import REAL_CT, inputs
    d, table = trained
    made = inputs(table.subset("test"), 3, d)  # raw units, head to feet, abdomen, noise: 3 of each
    bad = [p for k in ("raw units", "head to feet", "abdomen", "noise") for p in made[k]] + made.get("real CT", [])
    r = run("scan.py", *bad, "--ckpt", d / "best.pt", cwd=d)
    assert flagged(r.stderr) == set(bad), r.stderr
    assert sum("upside down?" in ln for ln in r.stderr.splitlines()) >= 1  # the flip named where it is the cause
    r = run("scan.py", *table.subset("test").images, "--ckpt", d / "best.pt", cwd=d)
    assert len(flagged(r.stderr)) <= 1, r.stderr  # 10 demo test volumes: a false alarm at most


@TRAINS
def test_a_knee_mri_is_flagged_by_the_chest_model(trained):
    """Another modality (issue 31): knee MRI volumes, in MR units with no air at -1000, read under the chest model's
    preset are flagged as unlike its training data, beside the HU warning."""
    import nibabel as nib
    from knee_demo import LABEL_FILE, STORAGE, case
    d, _ = trained
    knees, names = [], D.resolve_label_set(str(LABEL_FILE))[0]
    for i in range(2):
        _, _, img, _ = case(np.random.default_rng(i), names, STORAGE[i])
        nib.save(img, d / f"knee_{i}.nii.gz")
        knees.append(str(d / f"knee_{i}.nii.gz"))
    r = run("scan.py", *knees, "--ckpt", d / "best.pt", cwd=d)
    assert flagged(r.stderr) == set(knees), r.stderr
    assert sum("unlike the data the model was trained on" in ln for ln in r.stderr.splitlines()) == 2, r.stderr
    assert sum("not CT Hounsfield units" in ln for ln in r.stderr.splitlines()) == 2


@TRAINS
def test_scan_output_has_the_demo_note_decisions_and_saves_them(trained):
    d, table = trained
    scan = table.subset("test").images[0]
    r = run("scan.py", scan, "--ckpt", d / "best.pt", "--findings", "pleural effusion, pneumothorax",
            "--save-latents", d / "s.npz", cwd=d)
    out = r.stdout
    assert "trained on: demo (" in out and "200 training volumes, the synthetic demo" in out
    assert "only seen synthetic phantoms: on a real scan its answers are not findings" in out
    assert "operating points: measured on split 'valid' (50 volumes)" in out and "distance to the training features" in out
    row = next(ln for ln in out.splitlines() if ln.startswith("  pleural effusion"))
    assert ("positive" in row or "negative" in row) and "% /" in row
    assert "no decision: not a trained label" in next(ln for ln in out.splitlines() if ln.startswith("  pneumothorax"))
    s = np.load(d / "s.npz")
    assert s["decision"].shape == (1, 2) and s["decision"][0, 1] == -1 and s["decision"][0, 0] in (0, 1)
    assert np.isfinite(s["distance"]).all() and np.isfinite(s["distance_flipped"]).all()
    points = json.loads((d / "best.operating_points.json").read_text())
    p = points["labels"]["Pleural effusion"]
    z = s["zero_shot"][0, 0]
    assert s["decision"][0, 0] == int(z >= p["youden"]) and s["screening"][0, 0] == int(z >= p["sensitivity_0.9"])
    assert p["positives"] == sorted(p["positives"]) and len(p["positives"]) + len(p["negatives"]) <= 50
    # the probabilities: a trained finding through its Platt pair, an open-vocabulary one through the temperature
    model, ckpt = checkpoints.model_from_checkpoint(d / "best.pt", stage="align")
    tok, max_len = M.tokenizer_from_cfg(ckpt["model_config"]["text"]), ckpt["model_config"]["text"]["max_len"]
    with torch.no_grad():
        prompts = M.prompt_latents(model.eval(), tok, ["pleural effusion", "pneumothorax"], "there_is", max_len, "cpu")
    logit = M.zero_shot_logits(torch.tensor(s["latent"]), prompts)[0].numpy()  # (2,)
    e, t = points["platt"]["zero_shot"]["Pleural effusion"], points["temperature"]["zero_shot"]
    assert e["a"] > 0 and (e["fitted"] or (e["a"], e["b"]) == (pytest.approx(1 / t), 0.0))
    assert s["zero_shot"][0, 0] == pytest.approx(1 / (1 + np.exp(-(e["a"] * logit[0] + e["b"]))), abs=1e-5)
    assert s["zero_shot"][0, 1] == pytest.approx(1 / (1 + np.exp(-logit[1] / t)), abs=1e-5)
    # Without the reference: no decisions, no distance, and the way to make them.
    (d / "best.operating_points.json").rename(d / "kept.json")
    try:
        r = run("scan.py", scan, "--ckpt", d / "best.pt", cwd=d)
    finally:
        (d / "kept.json").rename(d / "best.operating_points.json")
    assert "no operating points beside the checkpoint" in r.stdout and "python evaluate.py --ckpt" in r.stdout
    assert "no decision: no operating points" in r.stdout


@TRAINS
def test_evaluate_keeps_the_auc_and_records_calibration(trained):
    d, table = trained
    summary = json.loads((d / "eval" / "summary.json").read_text())
    ref = summary["reference"]
    assert ref["calibration"]["zero_shot"]["temperature"] > 0 and 0 <= ref["ood"]["beyond_evaluated"] <= 1
    for kind in ("zero_shot", "classifier"):  # Platt beside the temperature, for both probabilities
        c = ref["calibration"][kind]
        assert 0 <= c["ece_platt"] <= 1 and 0 <= c["platt_fitted"] <= c["labels"] == len(table.label_names)
    platt = json.loads((d / "best.operating_points.json").read_text())["platt"]
    assert set(platt["zero_shot"]) == set(table.label_names) and all(e["a"] > 0 for e in platt["zero_shot"].values())
    assert any(e["fitted"] for e in platt["zero_shot"].values())  # 50 validation volumes: the common findings are fitted
    assert (d / "eval" / "reliability.png").is_file()
    r = run("evaluate.py", "--scan", "x.nii.gz", cwd=d, ok=False)
    assert "python scan.py" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@TRAINS
@pytest.mark.parametrize("method", ["coarse_to_fine", "occlusion"])
def test_a_map_follows_a_finding_that_moves(trained, method):
    """A demo test volume with a chest port (medical material, on the patient's right) and the same volume mirrored
    left to right: the port moves to the other side, and so does the peak of its map (the trained encoder above).
    Coarse-to-fine (scan.py's default) and the occlusion it starts from: on this small model the exact map (1 x 2 x 2
    cells) and Grad-CAM (2 x 3 x 3) fail it (measured; docs/maps.md)."""
    import maps
    d, table = trained
    test = table.subset("test")
    i = next(i for i in range(len(test)) if test.labels[i, test.label_names.index("Medical material")] == 1)
    model, _ = checkpoints.model_from_checkpoint(d / "best.pt", stage="align")
    model.eval()
    x = D.VolumeReportDataset(test, "demo", train=False)[i]["image"][None]  # (1, K, D, H, W); W runs to the right
    # The fixture's text side was never aligned, so its prompts point nowhere: use a prompt pair whose difference v makes
    # the map's direction u = W_proj^T v the trained vision head's row for the finding (W_proj has full column rank).
    head = checkpoints.load_checkpoint(d / "vis" / "best.pt")["model"]["head.weight"][table.label_names.index("Medical material")]
    v = head.double() @ torch.linalg.pinv(model.img_proj.weight.double())  # (768,)
    prompts = torch.stack([v.float(), torch.zeros_like(v).float()])[None]  # (1, 2, 768)
    torch.testing.assert_close(maps.directions(model, prompts)[0], head.float(), rtol=1e-3, atol=1e-4)
    port = np.argwhere(x[0, 3].numpy() >= 0.99)[:, 2].mean()  # the calcium window saturates on the port's metal
    half = x.shape[-1] / 2
    for v, side in ((x, port > half), (torch.flip(x, dims=[4]), port <= half)):
        m = maps.make_maps(model, v, prompts, method, "demo")[0]  # (D, H, W)
        peak_w = maps.peak(m)[2]
        assert (peak_w > half) == side, (method, peak_w, port)
