"""The pre-training scripts (stages 2a, 2b) end to end by their command lines (in this
process; torchrun in subprocesses), at toy size on a small demo set: defaults, resume
equality, torchrun with 2 processes and with 1 (gloo on CPU)."""
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, run_script

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TOY = ["--epochs", "2", "--batch-size", "4", "--workers", "0", "--log-every", "1"]


def run(args, cwd, ok=True):
    """A stage script's command line: in this process (conftest.run_script: torch is imported once), except under
    torchrun, whose launcher and process group are the subject and run in subprocesses below."""
    code, out, err = run_script(Path(args[0]).name, *args[1:], cwd=cwd)
    if ok:
        assert code == 0, f"{args} failed:\n{out[-3000:]}\n{err[-3000:]}"
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small demo set (16 train / 8 valid / 8 test) built by demo.py's command line."""
    d = tmp_path_factory.mktemp("tiny")
    run([str(ROOT / "demo.py"), "--out", str(d / "demo"), "--n-train", "16", "--n-valid", "8", "--n-test", "8"], cwd=d)
    return d / "demo"


# torchrun as this interpreter's module: it runs wherever torch is installed, also from a virtual environment that
# was never activated (its bin/ not on PATH), so these tests never skip for want of a `torchrun` command.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def load_last(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("script,extra", [("pretrain_vision.py", ["--lite"]), ("pretrain_text.py", ["--max-len", "256"])])
def test_pretraining_runs_and_writes_checkpoints(tmp_path, tiny, script, extra):
    r = run([str(ROOT / script), "--data", str(tiny), "--out", str(tmp_path / "o"), *TOY, *extra], cwd=tmp_path)
    out = r.stdout
    assert "labels: the manifest label columns" in out  # no distill labels here: says which it used
    assert "for distilled ones run python distill.py --backend rules" in out  # and how to train on distilled ones
    assert "valid macro AUC" in out and "wrote" in out
    for name in ("last.pt", "best.pt"):
        ck = load_last(tmp_path / "o" / name)  # weights_only=True must read every checkpoint
        assert set(ck) >= {"stage", "model", "model_config", "args", "label_names", "optimizer", "step", "epoch", "best_metric"}
        assert ck["stage"] == ("vision" if "vision" in script else "text")
        # last.pt is the end of training; best.pt the end of the epoch with the best validation AUC
        assert ck["step"] == 2 * (16 // 4) if name == "last.pt" else ck["step"] in (4, 8)
        assert len(ck["label_names"]) == 18
    if "text" in script:
        assert "truncated at 256" in out
    # The demo's dataset.json recommends its own epochs (text 5, lite vision 2), lr 3e-3 for text and the paper's
    # 1e-4 for lite vision: applied and printed, while the command line (--epochs 2) still wins.
    assert "defaults recommended by the data set" in out
    key = "vision-lite" if "vision" in script else "text"  # and where they come from: this data set's dataset.json
    assert f'defaults recommended by the data set ({tiny / "dataset.json"} "train" -> {key!r})' in out, out[:500]
    assert ck["args"]["lr"] == (1e-4 if "vision" in script else 3e-3) and ck["args"]["epochs"] == 2
    if "vision" in script:  # and centre crops for lite vision (its phantoms are all centred alike)
        assert ck["args"]["random_crop"] is False


# --random-crop: the demo recommends centre crops; resume must also reproduce the per-epoch random crops.
@pytest.mark.parametrize("script,extra", [("pretrain_vision.py", ["--lite", "--random-crop"]),
                                          ("pretrain_text.py", ["--max-len", "128"])])
def test_resume_gives_the_same_weights(tmp_path, tiny, script, extra):
    common = [str(ROOT / script), "--data", str(tiny), *TOY, *extra]
    run([*common, "--out", str(tmp_path / "full")], cwd=tmp_path)
    # Stop after 3 steps (mid-epoch 1 of 2: 4 steps per epoch), then resume to the end.
    run([*common, "--out", str(tmp_path / "cut"), "--max-steps", "3", "--save-every", "1"], cwd=tmp_path)
    assert load_last(tmp_path / "cut" / "last.pt")["step"] == 3
    r = run([*common, "--out", str(tmp_path / "cut"), "--resume"], cwd=tmp_path)
    assert "resume:" in r.stdout and "at step 3" in r.stdout
    a, b = load_last(tmp_path / "full" / "last.pt"), load_last(tmp_path / "cut" / "last.pt")
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"


@pytest.mark.parametrize("script,extra", [("pretrain_vision.py", ["--lite"]), ("pretrain_text.py", ["--max-len", "128"])])
def test_torchrun_two_processes(tmp_path, tiny, script, extra):
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(ROOT / script), "--data", str(tiny),
           "--out", str(tmp_path / "o"), "--epochs", "1", "--batch-size", "4", "--workers", "0", *extra]
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]
    assert r.stdout.count("done:") == 1  # rank 0 alone logs
    assert "under torchrun, backend gloo" in r.stdout  # the log names the process group's backend
    assert load_last(tmp_path / "o" / "last.pt")["step"] == 16 // 4


def test_torchrun_one_process_takes_the_ddp_path(tmp_path, tiny):
    """torchrun with a single process still runs under DDP (a process group, here gloo), so that a one-GPU machine
    can exercise the NCCL path: launched by torchrun means DDP, whatever the number of processes."""
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "1", str(ROOT / "pretrain_text.py"), "--data",
           str(tiny), "--out", str(tmp_path / "o"), "--epochs", "1", "--batch-size", "4", "--workers", "0", "--max-len", "128"]
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(1 process(es)" in training_line(r.stdout) and "under torchrun, backend gloo" in training_line(r.stdout)
    r = run([str(ROOT / "pretrain_text.py"), "--data", str(tiny), "--out", str(tmp_path / "p"), "--epochs", "1",
             "--batch-size", "4", "--workers", "0", "--max-len", "128"], cwd=tmp_path)
    assert "backend" not in training_line(r.stdout)  # a plain python run: no process group


def training_line(stdout):
    return next(line for line in stdout.splitlines() if line.startswith("training:"))


def test_bad_batch_size_is_one_line(tmp_path, tiny):
    r = run([str(ROOT / "pretrain_vision.py"), "--lite", "--data", str(tiny), "--out", str(tmp_path / "o"),
             "--batch-size", "100", "--workers", "0"], cwd=tmp_path, ok=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "fewer than one batch" in r.stderr


def test_labels_of_another_data_set(tmp_path, tiny):
    """Default distill labels for other reports are not used (and it says so); given with --labels, they are an error."""
    (tmp_path / "out" / "distill").mkdir(parents=True)
    (tmp_path / "out" / "distill" / "labels.csv").write_text("id,Emphysema\nsomeone_else,1\n")
    args = [str(ROOT / "pretrain_text.py"), "--data", str(tiny), "--out", str(tmp_path / "o"), "--max-len", "128", *TOY]
    r = run(args, cwd=tmp_path)
    assert "labels: the manifest label columns (not out/distill/labels.csv" in r.stdout
    r = run([*args, "--labels", "out/distill/labels.csv"], cwd=tmp_path, ok=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "labels.csv" in r.stderr


def test_cuda_speed_flags():
    """A GPU run autotunes cuDNN's 3D convolutions for the fixed crop and lets fp32 matmuls use TF32 (issue 24's review;
    only the device check can time them): both flags are set by the function setup() calls on CUDA."""
    import devices
    before = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    try:
        torch.backends.cudnn.benchmark = False
        torch.set_float32_matmul_precision("highest")
        devices.cuda_speed_flags()
        assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.set_float32_matmul_precision(before[1])


@pytest.mark.parametrize("stage,kept", [("vision", False), ("align", False), ("text", True)])
def test_bf16_on_a_cpu_only_for_the_text_stage(stage, kept, capsys, monkeypatch):
    """On a CPU, --amp bf16 gave wrong Conv3d weight gradients (the device check's toy run found it; docs/benchmarks.md):
    the stages with 3D convolutions run in fp32 there, said in a note; BERT alone keeps bf16."""
    import common
    import devices
    for k in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    args = common.parser("").parse_args(["--amp", "bf16", "--device", "cpu"])
    run = devices.setup(args, stage)
    with run.autocast():
        assert torch.is_autocast_enabled("cpu") == kept
    assert ("note: --amp bf16 on a CPU" in capsys.readouterr().out) == (not kept)


def tiny_run(tmp_path, fp16):
    """The part of devices.setup's and common.start's `run` that common.save and common.resume read, around a toy model;
    the GradScaler on the CPU stands for the CUDA one an --amp fp16 run has (fp16=False: a run without fp16)."""
    model = torch.nn.Linear(4, 2)
    return SimpleNamespace(out=tmp_path, stage="vision", model=model, model_config={}, args=SimpleNamespace(resume=True),
                           label_names=["a", "b"], opt=torch.optim.AdamW(model.parameters()), step=3, steps_per_epoch=4,
                           best=-math.inf, history=[], metrics={}, extra={}, device=torch.device("cpu"),
                           scaler=torch.amp.GradScaler("cpu", enabled=fp16), log=lambda *a: None)


def test_resume_keeps_the_fp16_loss_scale(tmp_path):
    """--amp fp16 --resume continues with the saved GradScaler state (loss scale and growth count), not a fresh 65536
    (issue 24's review). A run without fp16 saves none and ignores a saved one; a CPU run saves no CUDA RNG state."""
    import common
    run = tiny_run(tmp_path, fp16=True)
    for x in (torch.full((1, 4), math.inf), torch.ones(1, 4)):  # an overflowing step halves the scale; a good one counts
        run.scaler.scale(run.model(x).sum()).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
        run.opt.zero_grad()
    saved = run.scaler.state_dict()
    assert saved["scale"] == 65536.0 / 2 and saved["_growth_tracker"] == 1
    common.save(run, "last.pt")
    extra = load_last(tmp_path / "last.pt")["extra"]
    assert extra["scaler"] == saved and "cuda_rng" not in extra
    resumed = tiny_run(tmp_path, fp16=True)
    common.resume(resumed)
    assert resumed.step == 3 and resumed.scaler.state_dict() == saved
    plain = tiny_run(tmp_path, fp16=False)
    common.resume(plain)  # fp16 saved, fp32 resumed: the scale is not wanted, and no error
    assert plain.step == 3 and not plain.scaler.is_enabled()
    common.save(plain, "last.pt")
    assert "scaler" not in load_last(tmp_path / "last.pt")["extra"]


def test_sync_batchnorm_keeps_parameters_and_keys():
    """Under torchrun on GPUs (issue 24's review) BatchNorm becomes SyncBatchNorm after the optimizer is built: the
    conversion must reuse the same Parameter objects (the optimizer updates what the model computes with) and leave
    the state_dict keys alone (checkpoints load either way). Conversion alone runs on the CPU; its forward would not."""
    import devices
    import model as M
    net = M.build_model({"kind": "vision", "num_labels": 3, "vision": {"in_channels": 1, "stem": 4, "widths": [8, 16, 32, 64]}})
    opt = torch.optim.AdamW(net.parameters())
    params, keys = list(net.parameters()), list(net.state_dict())
    n_bn = sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    assert devices.sync_batchnorm(net) == n_bn == 2 * 8 + 3 + 1  # two per block, three shortcuts, the stem
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules()) == n_bn
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    assert all(a is b for a, b in zip(net.parameters(), params)) and len(list(net.parameters())) == len(params)
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], net.parameters()))
    assert list(net.state_dict()) == keys
