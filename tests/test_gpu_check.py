"""benchmarks/gpu_check.py, the device check: its CPU toy run end to end (every part, at toy size), so that the check a
lent GPU runs cannot break unnoticed; its budgets; and that its comparisons and verdicts can fail."""
import importlib.util
import json
import os
import runpy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gpu_check as G
from conftest import ROOT

GPU_ONLY = ("GPU", "CUDA", "fp16 needs CUDA", "TF32 exists on GPUs only", "Conv3d weight gradients")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy run, once: -> (completed process, the JSON report)."""
    work = tmp_path_factory.mktemp("gpu_check")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--work", str(work)], capture_output=True, text=True, timeout=900,
                       env={"HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1"})
    return r, json.loads((work / "gpu_check.json").read_text())


# Whichever of these tests runs first pays for the toy run (about 70 s on 2 cores).
TOY_RUN = pytest.mark.long(reason="the first test to use `toy` runs the device check at toy size: its subject is the "
                                  "subprocesses a lent GPU runs (torchrun, --resume, the bare recipe, evaluate.py)")


def rows(report, part):
    return {r["check"]: r for r in report["parts"][part]["rows"]}


@TOY_RUN
def test_toy_run_passes_every_part(toy):
    r, report = toy
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert list(report["parts"]) == list(G.PARTS)  # every part ran, in order
    for name, part in report["parts"].items():
        assert part["rows"], f"{name}: no rows"
        for row in part["rows"]:
            assert row["verdict"] in ("ok", "info", "skip"), row
            if row["verdict"] == "skip":  # a skip says why, and only GPU-only work is skipped in the toy run
                assert any(s in str(row["value"]) for s in GPU_ONLY), row
    assert "0 FAIL" in r.stdout and "| part | check | value | expected | verdict |" in r.stdout


@TOY_RUN
def test_toy_correctness_compares_what_a_cpu_can(toy):
    c = rows(toy[1], "correctness")
    for stage in ("vision", "text", "align"):  # the same device and precision: the comparison must find no difference
        d = toy[1]["parts"]["correctness"]["data"][f"{stage} fp32"]
        assert d["loss"] == d["norm"] == d["after"] == 0 and d["cos"] == pytest.approx(1.0, abs=1e-12)
        assert c[f"{stage} step, fp32 vs CPU fp32"]["verdict"] == "ok"
    text_bf16 = toy[1]["parts"]["correctness"]["data"]["text bf16"]  # a real difference, within the stated tolerance
    assert 0 < text_bf16["loss"] <= G.TOL["bf16"]["loss"] and text_bf16["cos"] < 1
    assert c["Conv3x3x3 im2col path"]["verdict"] == "ok" and not c["Conv3x3x3 im2col path"]["value"].startswith("0 ")


@TOY_RUN
def test_toy_scripts_run_under_torchrun_and_resume_exactly(toy):
    s = rows(toy[1], "scripts")
    ddp = next(v for k, v in s.items() if k.startswith("torchrun"))
    assert ddp["verdict"] == "ok" and "'backend gloo' logged" in ddp["value"]
    assert s["--resume = uninterrupted"]["verdict"] == "ok" and "diff| 0.0e+00" in s["--resume = uninterrupted"]["value"]
    recipe = rows(toy[1], "recipe")
    assert "validation zero-shot AUC" in recipe["python align.py --lite"]["value"]
    assert "test zero-shot AUC" in recipe["python evaluate.py"]["value"]


def test_budgets_fit_eight_minutes():
    assert set(G.BUDGET_S) == set(G.PARTS)
    assert sum(G.BUDGET_S.values()) + 10 < 8 * 60  # with the start-up: imports, CUDA's context


def test_compare_fails_beyond_tolerance():
    g = torch.randn(1000, dtype=torch.float64)
    ref = {"loss": 0.7, "norm": 3.0, "after": 0.69, "grad": g}
    assert G.compare(ref, dict(ref), G.TOL["fp32"])[1]
    assert not G.compare(ref, dict(ref, loss=0.7 * (1 + 2e-4)), G.TOL["fp32"])[1]  # just beyond fp32's 1e-4
    assert not G.compare(ref, dict(ref, norm=3.0 * 1.2), G.TOL["bf16"])[1]
    assert not G.compare(ref, dict(ref, grad=g + 0.5 * torch.randn(1000, dtype=torch.float64)), G.TOL["bf16"])[1]
    assert not G.compare(ref, dict(ref, loss=float("nan")), G.TOL["bf16"])[1]  # NaN never passes


def test_a_broken_part_fails_the_run_and_loses_nothing(tmp_path, monkeypatch, capsys):
    def broken(ctx, part):
        raise RuntimeError("out of something")
    monkeypatch.setitem(G.PARTS, "memory", broken)
    code = G.main(["--device", "cpu", "--tiny", "--only", "env", "memory", "--work", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 1 and list(report["parts"]) == ["env", "memory"]
    assert report["parts"]["memory"]["rows"][-1] == {"part": "memory", "check": "error", "value":
                                                     "RuntimeError: out of something", "expect": "", "verdict": "FAIL"}
    assert "1 FAIL: memory: error" in capsys.readouterr().out


def test_paper_scale_on_a_cpu_is_refused_in_one_line():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "--tiny" in r.stderr


def test_missing_packages_stop_it_in_one_line(monkeypatch):
    """The lent GPUs' image has no nibabel or pydicom: the check says so before data.py's imports would fail."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pydicom" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "benchmarks" / "gpu_check.py"), run_name="gpu_check_without_pydicom")
    assert str(e.value).startswith("error: pydicom not installed") and "\n" not in str(e.value)


def test_schedule_from_measured_rates_by_hand(capsys):
    """The GPU-only schedule arithmetic, fed rates by hand: CT-RATE's 47,149 volumes x 5 epochs per stage at each
    stage's samples/s, and the share of the peak the whole schedule achieves."""
    d = {"vision standard --amp bf16": dict(samples_per_s=40.0, gflop_per_sample=2000.0),
         "text BERT-base --amp bf16": dict(samples_per_s=200.0, gflop_per_sample=300.0),
         "align standard --amp bf16": dict(samples_per_s=25.0, gflop_per_sample=2400.0)}
    ctx = SimpleNamespace(device=torch.device("cuda"), report={"parts": {"speed": {"data": d}}})  # no GPU is touched
    part = {"name": "speed", "rows": []}
    G.schedule(ctx, part, {}, peak=1000)
    seconds = 47149 * 5 * (1 / 40 + 1 / 200 + 1 / 25)  # every volume seen 5 times by each stage
    assert f"total {seconds / 3600:.1f} GPU-hours" in part["rows"][0]["value"]
    achieved = 47149 * 5 * (2000 + 300 + 2400) / 1e3 / seconds  # TFLOP/s over the whole schedule
    assert ctx.report["efficiency"] == pytest.approx(achieved / 1000)
