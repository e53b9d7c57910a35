"""The whole recipe through subprocess at toy size, in a fresh working folder, each stage finding the
previous stage's files at their default paths: demo -> distill (rules) -> pretrain_vision --lite ->
pretrain_text -> align --lite -> evaluate. Fresh processes, as a user runs them; the checks whose subject is not the
start-up run the command line in this process (conftest.run_script)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import torch

from conftest import ROOT, run_script

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TOY = ["--epochs", "1", "--batch-size", "5", "--workers", "0"]


def run(cwd, script, *args, ok=True):
    r = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    if ok:
        assert r.returncode == 0, f"{script} {args}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


def run_here(cwd, script, *args):
    """The same command line in this process (conftest.run_script): for the stages that train nothing, whose start-up
    (importing torch and transformers) would cost more than their work."""
    code, out, err = run_script(script, *args, cwd=cwd)
    assert code == 0, f"{script} {args}:\n{out[-3000:]}\n{err[-3000:]}"
    return SimpleNamespace(stdout=out, stderr=err)


def test_whole_recipe_at_toy_size(tmp_path):
    run(tmp_path, "demo.py", "--out", "data/demo", "--n-train", "20", "--n-valid", "10", "--n-test", "10")

    r = run_here(tmp_path, "distill.py", "--backend", "rules")
    assert (tmp_path / "out/distill/labels.csv").is_file() and "agreement" in r.stdout

    r = run(tmp_path, "pretrain_vision.py", "--lite", *TOY)
    assert "labels: out/distill/labels.csv" in r.stdout  # pre-training reads the distilled labels by default
    r = run(tmp_path, "pretrain_text.py", "--max-len", "256", *TOY)
    assert "labels: out/distill/labels.csv" in r.stdout and "sentence pooling" in r.stdout

    # align finds both pre-trained checkpoints at their default paths and copies them in.
    r = run(tmp_path, "align.py", "--lite", *TOY)
    assert "loaded vision encoder: out/vision-lite/best.pt" in r.stdout
    assert "loaded text encoder: out/text/best.pt" in r.stdout
    assert "WARNING" not in r.stdout
    assert "zero-shot AUC, validation split" in r.stdout
    aligned = torch.load(tmp_path / "out/align-lite/best.pt", weights_only=True)
    vision = torch.load(tmp_path / "out/vision-lite/best.pt", weights_only=True)
    assert aligned["stage"] == "align" and aligned["model_config"]["vision"]["stem"] == 4
    # The demo recommends sentence-level text encoding; stage 2b applied it and stage 3 rebuilt it from the checkpoint.
    assert aligned["model_config"]["text"]["pooling"] == "sentence"
    # The aligned model started from the pre-trained weights: the stem moved only a little at lr 1e-5.
    delta = (aligned["model"]["vision.stem.0.weight"] - vision["model"]["encoder.stem.0.weight"]).abs().max()
    assert delta < 1e-2
    # Two learning rates, as the demo recommends: the paper's 1e-5 for the encoders, 5e-4 for the layers stage 3
    # adds. The second optimizer group holds exactly those four tensors and its rate is 50x the first's.
    assert aligned["args"]["lr"] == 1e-5 and aligned["args"]["head_lr"] == 5e-4
    assert "learning rates: encoders 1e-05, projections + classifier 0.0005" in r.stdout
    enc_group, new_group = aligned["optimizer"]["param_groups"]
    n_new = sum(not k.startswith(("vision.", "text.")) for k in aligned["model"])
    assert n_new == 4 and len(new_group["params"]) == 4  # img_proj, txt_proj, classifier weight and bias
    assert abs(new_group["lr"] / enc_group["lr"] - 50) < 1e-9

    # --init-shared heads (the demo's recommendation): the projections and classifier start from the two pre-trained
    # heads. One step at lr 1e-12 leaves them where they started: the classifier reads each latent with the weights of
    # that encoder's pre-trained head (W P = H), W's rows are orthogonal with norm 1 / 0.1 (W W^T = 100 I), and the
    # bias is the mean of the two heads' (so the logits are each head's shifted by half the bias difference).
    assert "start from the pre-trained heads" in r.stdout
    code, out, err = run_script("align.py", "--lite", *TOY, "--out", "init", "--max-steps", "1", "--lr", "1e-12",
                                "--head-lr", "1e-12", cwd=tmp_path)
    assert code == 0, err[-3000:]
    sd = torch.load(tmp_path / "init/last.pt", weights_only=True)["model"]
    text = torch.load(tmp_path / "out/text/best.pt", weights_only=True)["model"]
    W = sd["classifier.weight"].double()
    for proj, head in (("img_proj", vision), ("txt_proj", {"model": text})):
        assert torch.allclose(W @ sd[f"{proj}.weight"].double(), head["model"]["head.weight"].double(), atol=1e-5)
    assert torch.allclose(W @ W.T, 100 * torch.eye(len(W), dtype=torch.float64), atol=1e-3)
    assert torch.allclose(sd["classifier.bias"], (vision["model"]["head.bias"] + text["head.bias"]) / 2, atol=1e-6)

    # A last.pt from before the two groups cannot be resumed into them: one line, no traceback.
    old = torch.load(tmp_path / "out/align-lite/last.pt", weights_only=True)
    groups = old["optimizer"]["param_groups"]
    groups[0]["params"] += groups.pop()["params"]
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old/last.pt")
    code, out, err = run_script("align.py", "--lite", *TOY, "--out", "old", "--resume", cwd=tmp_path)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "older align.py" in err

    # A checkpoint of another stage where a vision one belongs: one line naming the file, exit 2 (in this process: the
    # refusal is the subject, not the start-up).
    code, out, err = run_script("align.py", "--lite", "--vision-ckpt", "out/text/best.pt", *TOY, "--out", "refused", cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in out + err
    assert "out/text/best.pt" in err and "vision" in err

    r = run_here(tmp_path, "evaluate.py", "--bootstrap", "50")
    summary = json.loads((tmp_path / "out/eval/summary.json").read_text())
    assert "align-lite" in json.dumps(summary)  # it evaluated the checkpoint align.py just wrote
    assert (tmp_path / "out/eval/per_label.csv").is_file()


def test_align_on_the_demo_trains_the_missing_pretrained_checkpoints_first(tmp_path):
    """The bare command on the default demo set: stages 2a and 2b run first (the README's commands, printed), write
    to their usual folders, and are reused by the next run; then alignment starts from both."""
    run_here(tmp_path, "demo.py", "--out", "data/demo", "--n-train", "10", "--n-valid", "5", "--n-test", "5")
    r = run(tmp_path, "align.py", "--lite", *TOY)
    assert "running: python pretrain_vision.py --lite" in r.stdout and "running: python pretrain_text.py" in r.stdout
    assert r.stdout.index("running: python pretrain_vision.py") < r.stdout.index("loaded vision encoder: out/vision-lite/best.pt")
    assert "loaded text encoder: out/text/best.pt" in r.stdout and "WARNING" not in r.stdout
    assert "start from the pre-trained heads" in r.stdout and "zero-shot AUC, validation split" in r.stdout
    vision = torch.load(tmp_path / "out/vision-lite/best.pt", weights_only=True)
    assert vision["stage"] == "vision" and vision["args"]["epochs"] == 2  # the demo's recommendation, not align's TOY flags
    code, out, err = run_script("align.py", "--lite", *TOY, "--out", "again", cwd=tmp_path)
    assert code == 0 and "running:" not in out and "loaded vision encoder: out/vision-lite/best.pt" in out  # reused


def test_align_without_pretraining_warns_and_trains(tmp_path):
    """Anywhere but the default demo folder a missing checkpoint is a warning, never an automatic training run."""
    run_script("demo.py", "--out", "elsewhere", "--n-train", "10", "--n-valid", "5", "--n-test", "5", cwd=tmp_path)
    code, out, err = run_script("align.py", "--lite", "--data", "elsewhere", *TOY, cwd=tmp_path)
    assert code == 0, err[-3000:]
    r = SimpleNamespace(stdout=out)
    assert "running:" not in r.stdout and not (tmp_path / "out/text").exists()
    assert "WARNING: no vision checkpoint at out/vision-lite/best.pt" in r.stdout
    assert "WARNING: no text checkpoint at out/text/best.pt" in r.stdout
    assert "note: --init-shared heads needs both pre-trained checkpoints" in r.stdout  # said, not silently skipped
    aligned = torch.load(tmp_path / "out/align-lite/best.pt", weights_only=True)
    assert aligned["model_config"]["text"]["pooling"] == "sentence"  # --pooling, from the demo's recommended flags
