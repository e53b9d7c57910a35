"""localise.py's location prior (issue 30): the baseline that never looks at the scan, the mean training mask per
finding, checked against hand counts; the report's paired differences and prior-hard cases on hand-made cases; and
the script end to end on a toy demo set."""
import json
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoints
import data as D
import localise
import model as M
import volumes as V
from conftest import run_script


def strip(*on, n=6):
    """A (1, 1, n) mask covering the given W positions."""
    m = np.zeros((1, 1, n), dtype=bool)
    m[0, 0, list(on)] = True
    return m


def test_location_prior_is_the_mean_training_mask(tmp_path, monkeypatch):
    """Three training volumes positive for a port (masks at W = {0, 1}, {1}, {3}), one with a nodule, one without any
    mask: the prior is each voxel's share of the positive cases, and its peak the most covered place."""
    masks = {"a": {"Port": strip(0, 1)}, "b": {"Port": strip(1), "Nodule": strip(5)}, "c": {"Port": strip(3)}, "d": {}}
    for rid, found in masks.items():
        (tmp_path / rid).mkdir()
        for n in found:
            (tmp_path / rid / f"{n}.nii.gz").touch()
    (tmp_path / "d" / "Port.nii.gz").touch()  # a mask file for a finding the volume is negative for: not counted
    class Table(SimpleNamespace):
        __len__ = lambda self: len(self.meta)  # noqa: E731
    table = Table(source=str(tmp_path / "manifest.csv"), label_names=["Port", "Nodule"], images=list(masks),
                            meta=[{"masks": rid} for rid in masks],
                            labels=np.array([[1, 0], [1, 1], [1, 0], [0, 0]]))
    monkeypatch.setattr(localise, "mask_on_crop", lambda path, image, preset: masks[Path(path).parent.name][Path(path).stem.split(".")[0]])
    prior = localise.location_prior(table, "demo")
    assert set(prior) == {"Port", "Nodule"}
    np.testing.assert_allclose(prior["Port"][0, 0], [1 / 3, 2 / 3, 0, 1 / 3, 0, 0])
    np.testing.assert_allclose(prior["Nodule"][0, 0], [0, 0, 0, 0, 0, 1])
    assert localise.prior_point(prior["Port"]) == (0, 0, 1)
    # a maximum in two pieces (a port and its catheter, both in every case): the pointer lies on one, not between
    two = np.zeros((1, 1, 9))
    two[0, 0, [0, 1, 7]] = 1.0
    assert localise.prior_point(two) in {(0, 0, 1), (0, 0, 7)} and localise.maps.peak(two) == (0, 0, 3)


def hand_cases():
    """Hand-made per-case results of score_case for two methods: (hit, mass) per method, and the baselines."""
    def case(a, b, prior, centre=0, random=0.1):
        return {"A": (a, 0.5), "B": (b, 0.25), "prior": prior, "centre": centre, "random": random, "seconds": {"A": 1.0, "B": 2.0}}
    return {"Port": [case(1, 1, True), case(1, 0, True), case(1, 0, False), case(0, 0, False)],  # 2 prior-hard
            "Nodule": [case(0, 1, False), case(1, 1, True)],  # 1 prior-hard
            "Cardiomegaly": [case(1, 1, True, centre=1)],  # diffuse: in "all", not in "focal"
            "Mystery": [case(1, 0, None)]}  # no training mask: out of every prior comparison


def test_report_against_the_prior_on_hand_counts(tmp_path, capsys):
    args = Namespace(methods=["A", "B"], bootstrap=200, split="test", tolerance_mm=10.0, ckpt="x.pt", out=tmp_path)
    localise.report(hand_cases(), args, "demo", diffuse=["Cardiomegaly"])  # as a data set's dataset.json says
    out = capsys.readouterr().out
    assert "prior-hard" in out and "A - prior" in out
    res = json.loads((tmp_path / "localise.json").read_text())
    per = lambda k: {n: (v[0] if v else None) for n, v in res["all"][k]["per_finding"].items()}  # noqa: E731
    assert per("prior_point") == {"Port": 0.5, "Nodule": 0.5, "Cardiomegaly": 1.0, "Mystery": None}
    assert per("A_point") == {"Port": 0.75, "Nodule": 0.5, "Cardiomegaly": 1.0, "Mystery": 1.0}
    assert per("A_minus_prior") == {"Port": 0.25, "Nodule": 0.0, "Cardiomegaly": 0.0, "Mystery": None}  # (1-1+1-1+1-0+0-0)/4
    assert per("B_minus_prior") == {"Port": -0.25, "Nodule": 0.5, "Cardiomegaly": 0.0, "Mystery": None}
    assert per("A_prior_hard") == {"Port": 0.5, "Nodule": 0.0, "Cardiomegaly": None, "Mystery": None}
    assert per("B_prior_hard") == {"Port": 0.0, "Nodule": 1.0, "Cardiomegaly": None, "Mystery": None}
    focal = res["focal"]
    assert focal["prior_point"]["mean"][0] == pytest.approx(0.5)  # Port and Nodule; Mystery has no prior
    assert focal["A_prior_hard"]["mean"][0] == pytest.approx(0.25) and focal["B_prior_hard"]["mean"][0] == pytest.approx(0.5)
    assert res["all"]["prior_point"]["mean"][0] == pytest.approx(2 / 3)
    rows = (tmp_path / "per_finding.csv").read_text().splitlines()
    assert rows[0].startswith("finding,n,n_prior_hard,") and "Port,4,2," in rows[2] + rows[1] + rows[3]


def test_localise_end_to_end_prints_the_prior(tmp_path):
    """A toy demo set with masks and a random-weights aligned model: the script runs, prints the prior beside each
    method and the prior-hard table, and writes both files."""
    from demo import make_demo
    make_demo(tmp_path / "demo", n_train=6, n_valid=2, n_test=3, seed=0)
    table = D.load_table(tmp_path / "demo")
    _, _, text_cfg = M.build_text("scratch", table.reports, max_len=64)
    torch.manual_seed(0)
    cfg = {"kind": "align", "num_labels": len(table.label_names), "embed_dim": 32, "text": text_cfg,
           "vision": {"in_channels": V.input_channels("demo"), "stem": 4, "widths": [8, 16, 16, 16]}}
    checkpoints.save_checkpoint(tmp_path / "a.pt", stage="align", model=M.build_model(cfg), model_config=cfg, args={},
                                label_names=table.label_names, extra={"preset": "demo"})
    code, out, err = run_script("localise.py", "--ckpt", tmp_path / "a.pt", "--data", tmp_path / "demo", "--methods", "exact",
                                "--bootstrap", "50", "--out", tmp_path / "loc", cwd=tmp_path)
    assert code == 0, err
    assert "location prior: 6/6 training volumes" in out and "exact - prior" in out and "prior-hard" in out
    res = json.loads((tmp_path / "loc" / "localise.json").read_text())
    assert {"prior_point", "exact_minus_prior", "exact_prior_hard", "random_prior_hard"} <= set(res["all"])
    assert res["all"]["prior_point"]["mean"] is not None
