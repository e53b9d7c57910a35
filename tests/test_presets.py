"""A new modality without a code edit: presets written as JSON (in dataset.json, or a --preset file), checked on
the way in, recorded by the cache and the checkpoint, and used end to end by a training script."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import badinput as B
import data
import volumes
from conftest import run_script
from data import DataError, UsageError

# Two windows (lung-ish and soft tissue), a stored size and crop of its own: nothing of it is in volumes.PRESETS.
CUSTOM = {"spacing": [4.0, 4.0, 8.0], "size": [8, 16, 16], "crop": [8, 12, 12], "intensity": [[-1000, 200], [-160, 240]]}


def run(script, *args, cwd, ok=True):
    """A script's command line in this process (conftest.run_script) -> an object with returncode, stdout, stderr."""
    code, out, err = run_script(script, *args, cwd=cwd, timeout=600)
    if ok:
        assert code == 0, out[-3000:] + err[-3000:]
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_json_preset_is_checked_and_named():
    p = volumes.get_preset(CUSTOM)
    assert p["spacing"] == (4.0, 4.0, 8.0) and p["size"] == (8, 16, 16) and p["crop"] == (8, 12, 12)
    assert volumes.input_channels(CUSTOM) == 2 and volumes.input_channels({**CUSTOM, "intensity": "mri"}) == 1
    # windows map HU linearly onto [-1, 1], one channel each, as the built-in ones do
    out = volumes.normalize(np.array([-1000, -400, 200], np.float32), p["intensity"])
    np.testing.assert_allclose(out, [[-1, 0, 1], [-1, -1, 0.8]])
    # a stable name for the cache folder, different for different parameters
    name = volumes.preset_name(CUSTOM)
    assert name.startswith("custom-") and name == volumes.preset_name(json.loads(json.dumps(CUSTOM)))
    assert name != volumes.preset_name({**CUSTOM, "crop": [8, 16, 16]}) and volumes.preset_name("demo") == "demo"
    bad = {"spacing": [4, 4], "size": [8, 16, 16.5], "crop": [8, 12, 12], "intensity": [[200, -1000]]}
    for key, words in (("spacing", "3 positive numbers"), ("size", "3 positive integers"), ("intensity", "lo < hi")):
        with pytest.raises(DataError, match=f"my.json: '{key}'.*{words}"):
            volumes.get_preset({**CUSTOM, key: bad[key]}, "my.json")
    with pytest.raises(DataError, match="'intensity' must be 'mri'"):
        volumes.get_preset({**CUSTOM, "intensity": "zscore"})


def test_resolve_preset_flag_file_and_dataset_json(tmp_path):
    B.toy_set(tmp_path)
    assert data.resolve_preset(None, tmp_path) == "demo"  # the toy set's dataset.json names a built-in preset
    (tmp_path / "dataset.json").write_text(json.dumps({"preset": CUSTOM}))
    assert data.resolve_preset(None, tmp_path) == CUSTOM
    assert data.resolve_preset("chest", tmp_path) == "chest"  # the flag wins
    (tmp_path / "mri.json").write_text(json.dumps({**CUSTOM, "intensity": "mri"}))
    assert data.resolve_preset(str(tmp_path / "mri.json"), tmp_path)["intensity"] == "mri"
    with pytest.raises(UsageError, match="--preset lungs: not one of"):  # a bad flag is not bad data
        data.resolve_preset("lungs", tmp_path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match="broken.json: cannot read a preset"):
        data.resolve_preset(str(tmp_path / "broken.json"), tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"preset": {**CUSTOM, "crop": [8, 12]}}))
    with pytest.raises(DataError, match=r"dataset.json: 'crop' must be 3 positive integers"):
        data.resolve_preset(None, tmp_path)


def test_usage_and_data_errors_are_one_line_exit_2(capsys):
    for err in (UsageError("--lr -1: learning rates must be positive"), DataError("x.csv row 3: bad")):
        def fail(e=err):
            raise e
        with pytest.raises(SystemExit) as e:
            data.run_main(fail)
        assert e.value.code == 2 and capsys.readouterr().err == f"error: {err}\n"


def test_a_preset_defined_only_in_dataset_json_trains_end_to_end(tmp_path):
    d = tmp_path / "scans"
    B.toy_set(d, n_train=8, n_valid=4)
    (d / "dataset.json").write_text(json.dumps({"preset": CUSTOM, "text_model": "scratch"}))
    # the cache is made with the data set's own preset, and says so
    r = run("data.py", "preprocess", "--data", d, cwd=tmp_path)
    cache = d / f"cache-{volumes.preset_name(CUSTOM)}"
    assert f"preset {cache.name[len('cache-'):]}" in r.stdout
    assert np.load(next(cache.glob("*.npy"))).shape == (8, 16, 16)  # the preset's stored size
    recorded = json.loads((cache / "preprocess.json").read_text())
    assert recorded["size"] == CUSTOM["size"] and recorded["intensity"] == CUSTOM["intensity"]
    # stage 2a trains on it: two input channels (its two windows), the crop of the preset, the preset in the checkpoint
    r = run("pretrain_vision.py", "--lite", "--data", d, "--out", tmp_path / "v", "--epochs", "1", "--batch-size", "4",
            "--workers", "0", cwd=tmp_path)
    assert f"preset {volumes.preset_name(CUSTOM)}, cache {cache}" in r.stdout and "valid macro AUC" in r.stdout
    ck = torch.load(tmp_path / "v" / "best.pt", weights_only=True)
    assert ck["model_config"]["vision"]["in_channels"] == 2 and ck["extra"]["preset"] == CUSTOM
    # another preset on the same cache is refused (one line), as for the built-in presets
    r = run("pretrain_vision.py", "--lite", "--data", d, "--out", tmp_path / "w", "--preset", "demo", "--cache", cache,
            "--epochs", "1", "--batch-size", "4", "--workers", "0", cwd=tmp_path, ok=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "preprocess.json: made with" in r.stderr
    # an unknown --preset name is a usage error: one line, exit 2, before any work
    r = run("pretrain_vision.py", "--lite", "--data", d, "--preset", "lungs", cwd=tmp_path, ok=False)
    assert r.returncode == 2 and r.stderr.startswith("error: --preset lungs: not one of")
