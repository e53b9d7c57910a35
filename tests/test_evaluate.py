"""Zero-shot evaluation: metrics against sklearn, prompt scoring by hand, CT-RATE units, retrieval,
and evaluate.py end to end on a tiny checkpoint."""
import json
from types import SimpleNamespace


import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, roc_auc_score

import checkpoints
import evaluate as E
import metrics
import model as M
from conftest import SAMPLE, run_script


def _synthetic(n, c=3, seed=0):
    """Scores that carry signal: y ~ Bernoulli(0.4), score = y + noise."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.4).astype(float)
    return y, y + rng.normal(0, 1.0, (n, c))


# -----------------------------------------------------------------------------
# AUC, bootstrap, thresholds

def test_per_label_auc_matches_sklearn_and_ignores_missing():
    y, s = _synthetic(40)
    y[0, 0], y[1, 0], y[2, 1] = np.nan, -1, np.nan  # no reference: dropped for that label only
    aucs, macro = metrics.per_label_auc(y, s)
    for c in range(3):
        keep = (y[:, c] == 0) | (y[:, c] == 1)
        assert aucs[c] == pytest.approx(roc_auc_score(y[keep, c], s[keep, c]))
    assert macro == pytest.approx(np.mean(aucs))


def test_fast_auc_equals_sklearn_with_ties_and_missing():
    y, s = _synthetic(80, c=4, seed=5)
    s = np.round(s, 1)  # many ties
    y[:10, 0], y[10:20, 1], y[:, 3] = np.nan, -1, 1  # label 3: one class
    aucs, _ = metrics.per_label_auc(y, s)
    got = metrics.fast_auc(y, s)
    assert np.allclose(got[:3], aucs[:3]) and np.isnan(got[3]) and aucs[3] is None


def test_single_class_label_is_undefined_and_left_out_of_macro():
    y, s = _synthetic(30)
    y[:, 1] = 0  # one class only
    y[:5, 2] = np.nan
    aucs, macro = metrics.per_label_auc(y, s)
    assert aucs[1] is None and aucs[0] is not None and aucs[2] is not None
    assert macro == pytest.approx((aucs[0] + aucs[2]) / 2)
    assert metrics.per_label_auc(np.zeros((4, 2)), np.ones((4, 2))) == ([None, None], None)
    thr = metrics.youden_thresholds(y, s)
    assert np.isnan(thr[1]) and metrics.threshold_metrics(y, s, thr)[1] is None


def test_bootstrap_interval_contains_estimate_and_narrows():
    widths = []
    for n in (50, 2000):
        y, s = _synthetic(n, seed=1)
        aucs, macro = metrics.per_label_auc(y, s)
        ci, macro_ci = metrics.bootstrap_auc(y, s, n_boot=200, seed=0)
        for a, (lo, hi) in zip(aucs, ci):
            assert lo <= a <= hi
        assert macro_ci[0] <= macro <= macro_ci[1]
        widths.append(macro_ci[1] - macro_ci[0])
    assert widths[1] < widths[0] / 3  # about sqrt(40) narrower
    y, s = _synthetic(50, seed=1)
    assert metrics.bootstrap_auc(y, s, 50, seed=3) == metrics.bootstrap_auc(y, s, 50, seed=3)  # seeded


def test_threshold_metrics_match_sklearn():
    y, s = _synthetic(60, seed=2)
    y[3, 0] = -1
    thr = metrics.youden_thresholds(y, s)
    rows = metrics.threshold_metrics(y, s, thr)
    for c in range(3):
        keep = (y[:, c] == 0) | (y[:, c] == 1)
        pred = (s[keep, c] >= thr[c]).astype(float)
        assert rows[c]["f1"] == pytest.approx(f1_score(y[keep, c], pred, average="weighted"))
        assert rows[c]["acc"] == pytest.approx(accuracy_score(y[keep, c], pred))
        assert rows[c]["precision"] == pytest.approx(precision_score(y[keep, c], pred, average="weighted"))
    # a perfectly separable label: Youden's threshold sits between the classes
    yy, ss = np.array([[0.0], [0.0], [1.0], [1.0]]), np.array([[0.1], [0.2], [0.7], [0.9]])
    assert metrics.threshold_metrics(yy, ss, metrics.youden_thresholds(yy, ss))[0]["acc"] == 1.0


# -----------------------------------------------------------------------------
# Prompts and zero-shot scores

def test_zero_shot_scores_is_sigmoid_of_the_difference():
    g = torch.Generator().manual_seed(0)
    img, prompts = torch.randn(5, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    want = torch.sigmoid(img @ prompts[:, 0].T - img @ prompts[:, 1].T)  # by hand, (5, 3)
    assert torch.allclose(M.zero_shot_scores(img, prompts), want, atol=1e-6)


class _CountingModel(torch.nn.Module):
    """encode_text = mean of a fixed embedding; counts calls and texts encoded."""

    def __init__(self):
        super().__init__()
        self.emb, self.calls, self.rows = torch.nn.Embedding(100, 4), 0, 0

    def encode_text(self, ids, mask):
        self.calls, self.rows = self.calls + 1, self.rows + len(ids)
        return (self.emb(ids % 100) * mask[..., None]).sum(1)


def _tokenizer(texts, padding, truncation, max_length, return_tensors):
    ids = [[len(t) + 1, *(ord(ch) for ch in t)][:max_length] for t in texts]
    L = max(map(len, ids))
    ids = torch.tensor([i + [0] * (L - len(i)) for i in ids])
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def test_prompt_latents_computed_once_with_lowercased_names():
    m, seen = _CountingModel(), []
    tok = lambda texts, **kw: seen.extend(texts) or _tokenizer(texts, **kw)  # noqa: E731
    lat = M.prompt_latents(m, tok, ["Pleural effusion", "Emphysema"], "there_is", 64, "cpu")
    assert lat.shape == (2, 2, 4) and m.calls == 1 and m.rows == 4
    assert seen == ["There is pleural effusion.", "There is no pleural effusion.",
                    "There is emphysema.", "There is no emphysema."]
    M.prompt_latents(m, tok, ["renal_cyst"], M.PROMPT_TEMPLATES["empty"], 64, "cpu")  # a pair works too
    assert seen[-2:] == ["renal cyst.", ""]
    assert set(M.PROMPT_TEMPLATES) == {"not", "empty", "there_is", "present", "compatible"}


# -----------------------------------------------------------------------------
# Units and retrieval

def test_ctrate_units_of_the_real_validation_set():
    path = SAMPLE / "ctrate" / "valid_labels.csv"
    if not path.exists():
        pytest.skip(f"sample data absent: {path}")
    import csv
    with open(path, newline="") as f:
        ids = [r["VolumeName"] for r in csv.DictReader(f)]
    counts = [len(set(E.unit_keys(ids, u))) for u in ("volume", "scan", "patient")]
    assert counts == [3039, 1564, 1304]


def test_unit_grouping_names_and_fallback(capsys):
    ids = ["valid_53_a_1.nii.gz", "valid_53_a_2_fixed.nii.gz", "valid_53_b_1", "train_7_a_1.nii"]
    assert E.unit_keys(ids, "scan") == ["valid_53_a", "valid_53_a", "valid_53_b", "train_7_a"]
    assert E.unit_keys(ids, "patient") == ["valid_53", "valid_53", "valid_53", "train_7"]
    assert E.unit_keys(["demo_1", "x"], "scan") == ["demo_1", "x"] and "note" in capsys.readouterr().out


def test_unit_means_and_maxima():
    inv = np.array([0, 0, 1])
    assert np.allclose(metrics.unit_mean(inv, np.array([[0.2], [0.4], [1.0]])), [[0.3], [1.0]])
    got = metrics.unit_max(inv, np.array([[np.nan, 0], [1, -1], [np.nan, np.nan]]))
    assert got[0].tolist() == [1, 0] and np.isnan(got[1]).all()


def test_recall_at_k():
    assert metrics.recall_at_k(np.eye(120)) == {1: 1.0, 5: 1.0, 10: 1.0, 50: 1.0, 100: 1.0}
    n = 20
    perm = np.roll(np.arange(n), 1)  # report i's best volume is i-1; its own volume comes second
    sim = np.eye(n)[perm] * 2 + np.eye(n)
    r = metrics.recall_at_k(sim, ks=(1, 2, 5, 50))
    assert r == {1: 0.0, 2: 1.0, 5: 1.0, 50: None}  # K > N is undefined, not clipped


# -----------------------------------------------------------------------------
# End to end: evaluate.py on a tiny aligned checkpoint

def test_evaluate_script_end_to_end(tmp_path):
    import data
    import volumes
    from demo import make_demo
    make_demo(tmp_path / "demo", n_train=4, n_valid=6, n_test=8, seed=0)
    table = data.load_table(tmp_path / "demo")
    text, _, text_cfg = M.build_text("scratch", table.reports, max_len=64)
    cfg = {"kind": "align", "num_labels": len(table.label_names), "embed_dim": 768, "text": text_cfg,
           "vision": {"in_channels": volumes.input_channels("demo"), "stem": 4, "widths": [8, 16, 16, 16]}}
    net = M.build_model(cfg)
    ckpt = tmp_path / "align.pt"
    checkpoints.save_checkpoint(ckpt, stage="align", model=net, model_config=cfg, args={"preset": "demo"},
                      label_names=table.label_names)
    def run(*a):  # evaluate.py's command line, in this process (conftest.run_script)
        code, out, err = run_script("evaluate.py", "--data", tmp_path / "demo", "--out", tmp_path / "eval", "--workers", "0",
                                    "--bootstrap", "20", *a, cwd=tmp_path)
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    r = run("--ckpt", str(ckpt), "--protocol", "ctrate16")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n_units"] == 8 and len(summary["labels"]) == 16 and summary["checkpoint"]["stage"] == "align"
    assert set(summary["retrieval"]) >= {"recall@1", "recall@100"} and summary["retrieval"]["recall@100"] is None
    assert (tmp_path / "eval" / "per_label.csv").read_text().count("\n") == 16 + 2  # header, 16 labels, macro
    assert "matplotlib" in r.stdout or (tmp_path / "eval" / "roc.png").exists()
    # The same model with its latents 1000x longer: every logit 1000x larger, no ranking changed, so no AUC may change.
    # Scored on float32 sigmoids, logits beyond about 17 all become 1.0 and tie, and the AUCs would fall towards 0.5.
    with torch.no_grad():
        net.img_proj.weight.mul_(1000)
    checkpoints.save_checkpoint(tmp_path / "long.pt", stage="align", model=net, model_config=cfg, args={"preset": "demo"},
                                label_names=table.label_names)
    r = run("--ckpt", str(tmp_path / "long.pt"), "--protocol", "ctrate16", "--out", tmp_path / "long")
    assert r.returncode == 0, r.stderr[-2000:]
    long = json.loads((tmp_path / "long" / "summary.json").read_text())
    assert long["macro"]["auc"] is not None and abs(long["macro"]["auc"] - summary["macro"]["auc"]) < 1e-9
    for k in ("ensemble", "classifier"):
        assert abs(long["macro_auc_by_score"][k] - summary["macro_auc_by_score"][k]) < 1e-9, k
    checkpoints.save_checkpoint(tmp_path / "vision.pt", stage="vision", model=net, model_config=cfg, args={},
                      label_names=table.label_names)
    r = run("--ckpt", str(tmp_path / "vision.pt"))  # wrong stage: one line, no traceback, exit 2
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "vision" in r.stderr and "align" in r.stderr
    one = dict(cfg, vision=dict(cfg["vision"], in_channels=1))  # an encoder for the paper's single window
    checkpoints.save_checkpoint(tmp_path / "one.pt", stage="align", model=M.build_model(one), model_config=one, args={},
                      label_names=table.label_names)
    r = run("--ckpt", str(tmp_path / "one.pt"))  # the demo preset gives 4 windows: refused, one line
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "1 input channel" in r.stderr and "gives 4" in r.stderr


def test_exact_fp32_flags():
    """evaluate.py and scan.py call checkpoints.exact_fp32 (issue 24's review): fp32 really is fp32 on a GPU, with
    TF32 off for cuDNN's convolutions (on by default on Ampere and later) and for matmuls (allowed in training by
    devices.cuda_speed_flags). Only the flags can be checked on a CPU; the previous settings are restored."""
    before = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")  # as a training run leaves it
        checkpoints.exact_fp32()
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cudnn.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])
