"""benchmarks/ablations.py, issue 29's study runner: its --toy mode end to end on a tiny demo set (the runs' result files,
a rerun that runs nothing, the markdown and both pictures), a failing command (one line naming the arm and its log, the
study goes on), and its pure functions on hand values: the spread over seeds and the tie rule. The stage scripts run in
this process (conftest.run_script) instead of one subprocess each: same scripts, same flags, torch imported once."""
import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import ablations  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def in_process(argv, log):
    """ablations.execute, in this process: `python <argv>` from the repository root, its output into log."""
    code, out, err = run_script(argv[0], *argv[1:], cwd=ROOT)
    Path(log).write_text(out + err)
    return code


def test_toy_study_runs_each_run_once_resumes_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablations, "execute", in_process)
    argv = ["--toy", "--work", str(tmp_path), "--only", "recipe,no_shared_classifier,data_scaling,alignment_selectivity",
            "--seeds", "1", "--fractions", "0.5"]
    assert ablations.main(argv) == 0
    out = capsys.readouterr().out
    # 4 pre-training runs (whole and half split), 5 alignments, their 5 evaluations, 2 sentence alignments: the recipe's
    # pre-training pair ran once although three arms use it
    assert "16 runs to do" in out and "[16/16]" in out and "FAILED" not in out
    assert sum(line.endswith(f"--out {tmp_path / 'vision-s0'}") for line in out.splitlines()) == 1
    assert "--train-fraction 0.5" in out and "--no-shared-classifier" in out and "about" in out.split("[16/16]")[1]
    res = json.loads((tmp_path / "recipe-s0/eval/result.json").read_text())
    assert res["split"] == "test" and res["n_units"] == 4 and 0 <= res["macro_auc"] <= 1 and len(res["ci"]) == 2
    assert res["command"].startswith("python evaluate.py --ckpt ") and res["seconds"] > 0
    sel = json.loads((tmp_path / "clip_only-s0/sentences/result.json").read_text())
    assert sel["n_related"] > 0 and sel["n_unrelated"] > 0 and sel["related"] > 0

    doc = (tmp_path / "ablations.md").read_text()
    assert "## Protocol" in doc and doc.count(ablations.MARK) == 1  # the protocol part comes from docs/ablations.md
    results = doc.split(ablations.MARK)[1]
    assert "a --toy run" in results and "| arm | the paper's direction | what the demo shows |" in results
    assert "| no_shared_classifier (Fig. 4a) |" in results and "undecided (fewer than 2 seeds" in results
    assert "0.5: recipe undecided" in results and "| 0.5 | 4 |" in results  # half of the 8 training volumes
    assert "| recipe | recipe | 1 |" in results and "| clip_only | 1 |" in results  # the numbers, the selectivity table
    for png in ("ablations-arms.png", "ablations-scaling.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG and (tmp_path / png).stat().st_size > 10_000

    # Resumable: run again, nothing runs; remove one run's result, only that run runs again.
    calls = []
    monkeypatch.setattr(ablations, "execute", lambda argv, log: calls.append(argv) or in_process(argv, log))
    assert ablations.main(argv) == 0 and calls == [] and "0 runs to do" in capsys.readouterr().out
    (tmp_path / "no_shared_classifier-s0/eval/result.json").unlink()
    assert ablations.main(argv) == 0
    assert [c[0] for c in calls] == ["evaluate.py"] and "no_shared_classifier-s0/best.pt" in calls[0][2]


def test_a_failed_command_is_one_line_and_the_study_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablations, "execute", lambda argv, log: 3 if argv[0] == "pretrain_vision.py" else 0)
    assert ablations.main(["--toy", "--work", str(tmp_path), "--only", "recipe,no_shared_classifier", "--seeds", "1"]) == 1
    out = capsys.readouterr().out
    log = tmp_path / "vision-s0/log.txt"
    assert f"FAILED: arm recipe, seed 0: pretrain_vision.py exited with 3; log: {log}" in out
    assert "skipped: arm no_shared_classifier, seed 0: needs vision-s0, which failed" in out
    assert not (tmp_path / "vision-s0/result.json").exists()  # not done: the next study runs it again
    doc = (tmp_path / "ablations.md").read_text()
    assert "**failed**: arm recipe, seed 0: pretrain_vision.py exited with 3" in doc and "not run yet" in doc


def test_dry_run_prints_every_arms_commands_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablations, "execute", lambda *a: pytest.fail("--dry-run ran a command"))
    assert ablations.main(["--dry-run", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for flags in ("--no-vision-pretraining --text-ckpt", "--no-text-pretraining --vision-ckpt", "--encoders-from",
                  "--image-pooling max", "--image-pooling noisy_or", "--l2-norm", "--joint", "--train-fraction 0.125",
                  "--sentence-alignment", "--seed 2 "):
        assert flags in out, flags
    assert "runs, about" in out and not any(tmp_path.iterdir())


def test_spread_over_seeds_on_hand_values():
    s = ablations.spread([0.90, 0.92, 0.94])
    assert s["n"] == 3 and s["min"] == 0.90 and s["max"] == 0.94
    assert s["mean"] == pytest.approx(0.92) and s["std"] == pytest.approx(0.02)  # sample std: sqrt((4 + 0 + 4) e-4 / 2)
    assert ablations.spread([0.8])["std"] == 0.0 and ablations.spread([]) is None and ablations.spread([None]) is None


def test_the_tie_rule_on_hand_values():
    ref = ablations.spread([0.90, 0.92, 0.94])
    word, diff = ablations.verdict(ablations.spread([0.85, 0.86, 0.87]), ref)
    assert word == "lower" and diff == pytest.approx(-0.06)
    assert ablations.verdict(ablations.spread([0.95, 0.96, 0.97]), ref)[0] == "higher"
    assert ablations.verdict(ablations.spread([0.85, 0.88, 0.91]), ref)[0] == "tie"  # overlaps at the low end
    assert ablations.verdict(ablations.spread([0.86, 0.88, 0.90]), ref)[0] == "tie"  # touching ranges overlap
    assert ablations.verdict(ablations.spread([0.5]), ref)[0] == "undecided"  # one seed decides nothing
    assert ablations.verdict(None, ref) == ("no result", None)
    assert ablations.shows("lower", -0.06, "lower") == "lower by 0.060 (seeds' ranges do not overlap): agrees with the paper"
    assert "**disagrees with the paper**" in ablations.shows("higher", 0.03, "lower")
    assert ablations.shows("tie", 0.001, "lower").endswith("the paper's difference is not seen")
    assert ablations.shows("tie", 0.001, None) == "tie (ranges overlap; means +0.001)"
