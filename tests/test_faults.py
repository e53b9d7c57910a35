"""Nothing lost, nothing silent: injected faults, SIGKILLs and bad input across every stage.

- distill.py against a loopback server that fails 30% of calls (500, 429 + Retry-After, timeouts, a body that
  is not JSON, an answer that is not JSON, a missing label, a truncated body), SIGKILLed at 5 random moments
  and restarted: every report labelled exactly once or listed with a reason, no request beyond reports + retries.
- each training script SIGKILLed during a step and during a checkpoint write, then --resume: the checkpoint on
  disk is always a complete one (the old or the new), and the resumed run completes.
- a corpus of bad input (tests/badinput.py): each gets one line naming the file or row, and its documented outcome.
- non-finite losses stop the run naming the step and the batch ids (or are skipped and counted on request).
- security: weights_only loads, no trust_remote_code, the API key in no output, atomic writes.
"""
import csv
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import badinput as B
import checkpoints
import data
import model as M
import volumes
from conftest import ROOT

KEY = "sk-test-FAULTS-7f3a9"
NAMES = ["Cardiomegaly", "Pleural effusion", "Lung nodule", "Emphysema"]
ANSWERS = ["present", "absent", "uncertain", "not mentioned"]
CODE = {"present": "1", "absent": "0", "uncertain": "-1", "not mentioned": ""}
FAULTS = ["http500", "http429", "timeout", "body_not_json", "answer_not_json", "missing_label", "truncated_body"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def truth(rid):
    """The answer the fake model gives for a report: fixed per id, so a label written for the wrong report shows."""
    rng = random.Random(f"truth:{rid}")
    return {n: rng.choice(ANSWERS) for n in NAMES}


# -----------------------------------------------------------------------------
# distill.py: a fault-injecting server, 5 SIGKILLs, 6 runs

class FaultServer:
    """OpenAI-compatible chat completions; request n of report id fails with probability `rate`, the fault drawn
    from FAULTS by a seeded RNG of (seed, id, n). Every request is logged with the run that sent it."""

    def __init__(self, rate=0.3, seed=7, latency=0.03, hang=1.0):
        self.rate, self.seed, self.latency, self.hang = rate, seed, latency, hang
        self.log, self.counts, self.lock, self.run = [], Counter(), threading.Lock(), 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, data, headers, sleep, cut = fake.answer(body, self.headers)
                time.sleep(sleep)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2] if cut else data)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out or was killed
                if cut:  # a truncated body: fewer bytes than Content-Length, then the connection drops
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 64
        self.httpd.handle_error = lambda *a: None  # connections reset by a killed client are expected here
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, body, headers):
        rid = body["messages"][1]["content"].split("ID=")[1].split()[0]
        with self.lock:
            self.counts[rid] += 1
            n = self.counts[rid]
            rng = random.Random(f"{self.seed}:{rid}:{n}")
            fault = rng.choice(FAULTS) if rng.random() < self.rate else None
            self.log.append({"run": self.run, "id": rid, "n": n, "fault": fault})
        good = json.dumps(truth(rid))
        chat = lambda content: json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}],  # noqa: E731
                                           "usage": {"total_tokens": 11}}).encode()
        js = {"Content-Type": "application/json"}
        if fault == "http500":  # a server that echoes the request's headers in its error text
            return 500, json.dumps({"error": f"internal error, headers {dict(headers)}"}).encode(), js, self.latency, False
        if fault == "http429":
            return 429, b'{"error": "rate limited"}', {**js, "Retry-After": "0.05"}, self.latency, False
        if fault == "timeout":
            return 200, chat(good), js, self.hang, False  # answers after the client gave up
        if fault == "body_not_json":
            return 200, b"<html><body>502 Bad Gateway</body></html>", {"Content-Type": "text/html"}, self.latency, False
        if fault == "answer_not_json":
            return 200, chat("The heart looks big to me."), js, self.latency, False
        if fault == "missing_label":
            return 200, chat(json.dumps({k: v for k, v in truth(rid).items() if k != NAMES[-1]})), js, self.latency, False
        return 200, chat(good), js, self.latency, fault == "truncated_body"

    def close(self):
        self.httpd.shutdown()


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def cached_ids(path):
    """Ids with a complete answer line in distill's cache (a torn last line does not count)."""
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            ids.append(json.loads(line)["id"])
        except (ValueError, KeyError):
            pass
    return ids


def test_distill_survives_faults_and_kills(tmp_path):
    rng = random.Random(2024)
    n_reports, concurrency, max_retries, max_fixes, kills = 80, 4, 4, 2, 5
    ids = [f"r{i:03d}" for i in range(n_reports)]
    with open(tmp_path / "reports.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "report"]] + [[i, f"ID={i} The heart is enlarged. No effusion."] for i in ids])
    (tmp_path / "labels.txt").write_text("\n".join(NAMES) + "\n")
    server = FaultServer(latency=0.03, hang=1.0)
    env = {**ENV, "OPENAI_API_KEY": KEY}
    cmd = [sys.executable, str(ROOT / "distill.py"), "--reports", "reports.csv", "--labels", "labels.txt",
           "--api-base", server.url, "--model", "fake", "--concurrency", str(concurrency), "--timeout", "0.5",
           "--max-retries", str(max_retries), "--backoff", "0.02", "--max-fixes", str(max_fixes)]
    outputs, cached_before = [], {}  # cached_before[run]: ids already answered when that run started
    out = tmp_path / "out" / "distill"
    try:
        for run in range(kills + 1):
            server.run = run
            cached_before[run] = set(cached_ids(out / "cache.jsonl"))
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if run < kills:  # kill after k requests of this run were seen, plus a random delay
                k, deadline = rng.randint(1, 25), time.time() + 60
                while sum(e["run"] == run for e in server.log) < k and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0, 0.1))
                assert proc.poll() is None, f"run {run} ended before its kill: {proc.communicate()}"
                proc.send_signal(signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=120)
            outputs += [stdout, stderr]
            if run == kills:
                assert proc.returncode in (0, 1), stdout + stderr
    finally:
        server.close()

    # Every report labelled exactly once, or listed with a reason: none lost, none twice.
    labels, failures = read_rows(out / "labels.csv"), read_rows(out / "failures.csv")
    got = [r["id"] for r in labels] + [r["id"] for r in failures]
    assert sorted(got) == ids, "a report is missing or listed twice"
    for r in failures:  # a transient fault is retried: a report fails only once its retries are spent
        assert f"after {max_retries + 1} tries" in r["reason"] or f"after {max_fixes + 1} tries" in r["reason"], r
    assert proc.returncode == (1 if failures else 0)
    for r in labels:  # each label is the answer to that very report
        assert {n: r[n] for n in NAMES} == {n: CODE[v] for n, v in truth(r["id"]).items()}, r["id"]
    answered = cached_ids(out / "cache.jsonl")
    assert len(answered) == len(set(answered)) == len(labels), "an answer was paid for twice"

    # Requests: a report answered before a run started is never asked again; within a run at most
    # (max_fixes + 1) x (max_retries + 1) requests per report; over all runs, every request beyond a report's
    # first is a retry of an injected fault or a resend of an answer the SIGKILL cut off before it was cached.
    per_run = defaultdict(Counter)
    for e in server.log:
        per_run[e["run"]][e["id"]] += 1
        assert e["id"] not in cached_before[e["run"]], f"run {e['run']} asked again for {e['id']}, already answered"
    assert max(c for runs in per_run.values() for c in runs.values()) <= (max_fixes + 1) * (max_retries + 1)
    faults = Counter(e["id"] for e in server.log if e["fault"])
    lost = Counter()  # answers sent whole to a run that was killed before caching them
    for run in range(kills):
        after = set(cached_before[run + 1])
        lost.update({e["id"] for e in server.log if e["run"] == run and e["fault"] is None and e["id"] not in after})
    assert sum(lost.values()) <= kills * concurrency
    for rid in ids:
        assert server.counts[rid] <= 1 + faults[rid] + lost[rid], (rid, [e for e in server.log if e["id"] == rid])
    assert len(server.log) <= n_reports + sum(faults.values()) + sum(lost.values())
    print(f"distill: {len(server.log)} requests for {n_reports} reports, {sum(faults.values())} faults injected "
          f"({dict(Counter(e['fault'] for e in server.log if e['fault']))}), {kills} SIGKILLs, {sum(lost.values())} answers "
          f"cut off by a kill, {len(labels)} labelled, {len(failures)} failed with a reason, 0 lost")

    # The key reaches no output: stdout, stderr, cache, labels, failures, temporary files.
    files = [p.read_text(encoding="utf-8", errors="replace") for p in out.iterdir()]
    assert all(KEY not in text for text in outputs + files)


# -----------------------------------------------------------------------------
# training scripts: SIGKILL during a step and during a checkpoint write, then --resume

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small demo set (16 train / 8 valid / 8 test): 4 steps an epoch at batch 4."""
    d = tmp_path_factory.mktemp("tiny")
    r = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--out", str(d / "demo"), "--n-train", "16",
                        "--n-valid", "8", "--n-test", "8"], cwd=d, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return d / "demo"


class Run:
    """A script in a subprocess whose stdout is read line by line, so a test can kill it at a chosen moment."""

    def __init__(self, args, cwd, env=None):
        self.proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env or ENV, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()

    def wait_for(self, text, timeout=300):
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None and time.time() < deadline, f"no {text!r} in:\n{''.join(self.lines)[-3000:]}"
            time.sleep(0.01)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def finish(self, timeout=600):
        self.proc.wait(timeout=timeout)
        time.sleep(0.1)  # the reader thread drains the pipe
        out = "".join(self.lines)
        assert self.proc.returncode == 0, out[-3000:]
        return out


# Runs a script with os.replace held for one file name: a checkpoint write pauses after its temporary file is
# complete (and fsynced), before the rename, so the test can SIGKILL it mid-write. Nothing of it is in the scripts.
PAUSE_WRITE = """
import os, runpy, sys, time
name, replace = sys.argv[1], os.replace
def paused(src, dst, *a, **k):
    if os.path.basename(dst) == name:
        print(f"test: paused writing {src}", flush=True)
        time.sleep(600)
    return replace(src, dst, *a, **k)
os.replace = paused
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def check_pair(out):
    """What is on disk is always usable: last.pt complete, and the best it remembers is the one in best.pt."""
    last = load(out / "last.pt")
    if last["best_metric"] is not None:
        best = load(out / "best.pt")
        assert best["best_metric"] >= last["best_metric"], "last.pt remembers a best.pt that is not on disk"
    return last


KILL_ARGS = {"pretrain_vision.py": ["--lite"], "pretrain_text.py": ["--max-len", "64"],
             "align.py": ["--lite", "--max-len", "64", "--text-ckpt", "none.pt", "--vision-ckpt", "none.pt"]}


@pytest.mark.parametrize("script", list(KILL_ARGS))
def test_training_survives_sigkill(tmp_path, tiny, script):
    rng = random.Random(script)
    out = tmp_path / "o"
    args = [ROOT / script, "--data", tiny, "--out", out, "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--log-every", "1", *KILL_ARGS[script]]
    # 1. SIGKILL during a step: at a random moment after step 2 is logged (--save-every 1 saves each step after
    # logging it), i.e. while step 2 is saved or step 3 runs.
    r = Run([*args, "--save-every", "1"], tmp_path)
    r.wait_for("step 2/4")
    time.sleep(rng.uniform(0, 0.05))
    r.kill()
    s = check_pair(out)["step"]
    assert s in (1, 2, 3), s
    # 2. SIGKILL during a checkpoint write: resume, and hold the write of best.pt at the end of the epoch (after
    # its temporary file is written, before fsync and rename). last.pt is still the complete old one.
    r = Run(["-c", PAUSE_WRITE, "best.pt", *args, "--resume"], tmp_path)
    r.wait_for("test: paused writing")
    assert f"at step {s}" in "".join(r.lines)
    r.kill()
    assert check_pair(out)["step"] == s and list(out.glob(".best.pt.tmp*")), "the killed write should be a temp file"
    # 3. --resume runs to the end (that it then holds the same weights as an uninterrupted run: test_stages.py).
    text = Run([*args, "--resume"], tmp_path).finish()
    assert f"resume: {out / 'last.pt'} at step {s}" in text
    last, best = check_pair(out), load(out / "best.pt")
    assert last["step"] == 4 and not list(out.glob(".*.tmp*")), "a killed save's temp file was left behind"
    assert best["best_metric"] == last["best_metric"] == best["extra"]["metrics"]["macro_auc"]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1], epochs  # one evaluation per epoch: none lost, none twice


# -----------------------------------------------------------------------------
# bad input: one line naming the file or row, and a documented outcome (refused: exit 2; or skipped and counted)

# script(name, *args) -> (exit code, stdout, stderr): the stage script's command line run in this process (conftest.py)


def refused(result, *words):
    """Exit 2 and exactly one line on stderr, naming what was wrong."""
    code, out, err = result
    assert code == 2 and "Traceback" not in out + err, (code, out[-2000:], err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


VISION = ["pretrain_vision.py", "--lite", "--epochs", "1", "--batch-size", "4", "--workers", "0"]


def test_bad_volumes_preprocess_skips_and_lists_each(tmp_path, capsys):
    rows = B.toy_set(tmp_path)
    for kind in B.VOLUME_KINDS:
        B.bad_volume(tmp_path / f"bad_{kind}.nii.gz", kind)
        rows.append([f"bad_{kind}", f"bad_{kind}.nii.gz", "x", "train", "", "", ""])
    B.write_csv(tmp_path / "manifest.csv", rows)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        data.run_main(lambda: data.main(["preprocess", "--data", str(tmp_path), "--preset", "demo"]))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert f"{len(B.VOLUME_KINDS)} of {len(rows) - 1} volumes failed" in err
    for kind, words in B.VOLUME_KINDS.items():
        lines = [ln for ln in err.splitlines() if f"bad_{kind}.nii.gz" in ln]
        assert len(lines) == 1 and words in lines[0], (kind, err)
    cached = sorted(p.name for p in (tmp_path / "cache-demo").glob("*.npy"))
    assert cached == [f"v{i}.npy" for i in range(8)]  # the good ones are cached, the bad ones skipped


@pytest.mark.parametrize("kind", list(B.VOLUME_KINDS))
def test_bad_volume_refused_by_training(tmp_path, script, kind):
    bad = B.with_bad_volume(tmp_path / "d", kind)
    workers = "1" if kind == "truncated" else "0"  # an error raised in a DataLoader worker: still one line
    refused(script(*VISION, "--data", tmp_path / "d", "--out", tmp_path / "o", "--workers", workers),
            bad.name, B.VOLUME_KINDS[kind])


def test_nan_in_cache_refused(tmp_path, script):
    B.toy_set(tmp_path / "d")
    cache = tmp_path / "d" / "cache-demo"
    cache.mkdir()
    (cache / "preprocess.json").write_text(json.dumps({"spacing": [4.0, 4.0, 8.0], "size": [28, 64, 64],
                                                          "intensity": volumes.PRESETS["demo"]["intensity"]}))
    np.save(cache / "v1.npy", np.full((28, 64, 64), np.nan, np.float32))  # a damaged float cache file
    refused(script(*VISION, "--data", tmp_path / "d", "--out", tmp_path / "o"), "v1.npy", "NaN or infinite")


def test_bad_reports(tmp_path, script):
    rows = B.toy_set(tmp_path / "d", n_train=6)
    rows[1][2], rows[2][2] = "", " \n\t "  # empty and whitespace-only reports
    B.write_csv(tmp_path / "d" / "manifest.csv", rows)
    # distill: listed in failures.csv with the reason, exit 1 (never sent to an LLM, never labelled by default)
    code, out, err = script("distill.py", "--backend", "rules", "--reports", tmp_path / "d" / "manifest.csv",
                            "--labels", tmp_path / "d" / "manifest.csv")
    assert code == 1 and "Traceback" not in err
    failures = [(r["id"], r["reason"]) for r in read_rows(tmp_path / "out/distill/failures.csv")]
    assert failures == [("v0", "empty report"), ("v1", "empty report")]
    # the text and alignment stages: skipped, counted and named
    code, out, err = script("pretrain_text.py", "--data", tmp_path / "d", "--out", tmp_path / "t", "--epochs", "1",
                            "--batch-size", "4", "--max-len", "32", "--labels", tmp_path / "d" / "manifest.csv")
    assert code == 0, err
    assert "skipping 2 rows with an empty report: v0, v1" in out and "(4 train / 4 valid reports)" in out
    # non-UTF-8 bytes in a manifest: refused, naming the row
    raw = (tmp_path / "d" / "manifest.csv").read_bytes().replace(b"There is A.", b"There is A \xe9\xff.", 1)
    (tmp_path / "d" / "manifest.csv").write_bytes(raw)
    bad_row = next(i for i, r in enumerate(rows) if "There is A." in r[2])
    refused(script("pretrain_text.py", "--data", tmp_path / "d", "--out", tmp_path / "t"),
            "manifest.csv", f"row {bad_row}", "not UTF-8")
    # in a plain reports CSV (not a manifest) distill decodes them as U+FFFD and names the rows
    (tmp_path / "plain.csv").write_bytes(b"AccessionNo,report_text\nr1,No effusion.\nr2,Effusion \xe9.\n")
    code, out, err = script("distill.py", "--backend", "rules", "--reports", tmp_path / "plain.csv", "--labels", "chest_ct")
    assert code == 0 and "not UTF-8" in out and "rows [2]" in out


def test_bad_label_csvs(tmp_path, script):
    B.toy_set(tmp_path / "d")
    text = ["pretrain_text.py", "--data", tmp_path / "d", "--out", tmp_path / "t", "--epochs", "1", "--batch-size", "4",
            "--max-len", "32", "--labels"]
    ok = [["1", "0", ""]] * 8
    cases = {  # file -> words of its one line
        B.label_csv(tmp_path / "dup.csv", ok, ids=["v0", "v0"] + [f"v{i}" for i in range(2, 8)]): ["dup.csv row 2", "duplicate id 'v0'"],
        B.label_csv(tmp_path / "two.csv", [["1", "2", ""]] + ok[1:]): ["two.csv row 1 (id v0), column 'B'", "'2'"],
        B.label_csv(tmp_path / "yes.csv", ok[:3] + [["yes", "0", "0"]] + ok[4:]): ["yes.csv row 4 (id v3), column 'A'", "'yes'"],
        B.label_csv(tmp_path / "age.csv", [r + ["63"] for r in ok], extra_header=["PatientAge"]): ["age.csv row 1", "'PatientAge'", "'63'"],
        B.label_csv(tmp_path / "short.csv", ok[:6]): ["short.csv: no row for 2 of the 8 ids", "v6"],
        B.label_csv(tmp_path / "other.csv", ok, ids=[f"x{i}" for i in range(8)]): ["other.csv: no row for 8 of the 8 ids"],
    }
    for path, words in cases.items():
        refused(script(*text, path), *words)
    # ids the manifest does not have: skipped and counted
    code, out, err = script(*text, B.label_csv(tmp_path / "more.csv", ok + ok, ids=[f"v{i}" for i in range(16)]))
    assert code == 0 and "more.csv: ignoring 8 rows whose ids are not in" in out, err
    # distill --reference whose ids match no report: refused before any labelling
    refused(script("distill.py", "--backend", "rules", "--reports", tmp_path / "d" / "manifest.csv", "--labels",
                   tmp_path / "d" / "manifest.csv", "--reference", tmp_path / "other.csv"), "other.csv", "none of its ids")
    assert not (tmp_path / "out" / "distill" / "labels.csv").exists()


def tiny_checkpoints(d, reports):
    """Checkpoints of each stage with small encoders: the scripts refuse them before any weight is used."""
    d.mkdir(exist_ok=True)
    _, _, text_cfg = M.build_text("scratch", reports=reports, max_len=32)
    vision = {"in_channels": volumes.input_channels("demo"), "stem": 4, "widths": [8, 16, 32, 32]}
    configs = {"vision": {"kind": "vision", "num_labels": 3, "vision": vision},
               "text": {"kind": "text", "num_labels": 3, "text": text_cfg},
               "align": {"kind": "align", "num_labels": 3, "vision": vision, "text": text_cfg, "embed_dim": 16}}
    paths = {}
    for stage, cfg in configs.items():
        paths[stage] = checkpoints.save_checkpoint(d / f"{stage}.pt", stage=stage, model=M.build_model(cfg), model_config=cfg,
                                         args={}, label_names=B.LABELS, extra={"rng": None})
    cfg = dict(configs["vision"], num_labels=2)
    paths["vision_AB"] = checkpoints.save_checkpoint(d / "vision_AB.pt", stage="vision", model=M.build_model(cfg), model_config=cfg,
                                           args={}, label_names=B.LABELS[:2])
    (d / "cut.pt").write_bytes(paths["align"].read_bytes()[:1000])
    paths["cut"] = d / "cut.pt"
    return paths


def test_checkpoints_of_another_stage_or_label_set(tmp_path, script):
    rows = B.toy_set(tmp_path / "d")
    ck = tiny_checkpoints(tmp_path / "ck", [r[2] for r in rows[1:]])
    common = ["--data", tmp_path / "d", "--workers", "0", "--batch-size", "4"]
    align = ["align.py", "--lite", "--out", tmp_path / "a", "--max-len", "32", *common]
    refused(script(*align, "--vision-ckpt", ck["text"], "--text-ckpt", ck["text"]), "text.pt", "expected a 'vision'", "found a 'text'")
    refused(script(*align, "--vision-ckpt", ck["vision_AB"], "--text-ckpt", ck["text"]), "vision_AB.pt", "label set differs")
    refused(script(*align, "--vision-ckpt", ck["vision"], "--text-ckpt", ck["align"]), "align.pt", "expected a 'text'")
    evaluate = ["evaluate.py", "--out", tmp_path / "e", "--bootstrap", "0", *common[:4], "--split", "valid"]
    refused(script(*evaluate, "--ckpt", ck["vision"]), "vision.pt", "expected a 'align'")
    refused(script(*evaluate, "--ckpt", ck["cut"]), "cut.pt", "not a readable checkpoint")
    # a label CSV with a column the checkpoint does not know: evaluated without it, and said
    B.label_csv(tmp_path / "extra.csv", [["1", "0", "1", "0"], ["0", "1", "0", "1"]] * 4, extra_header=["D"])
    code, out, err = script(*evaluate, "--ckpt", ck["align"], "--labels", tmp_path / "extra.csv")
    assert code == 0 and "note: 1 label columns of" in out and "['D']" in out, err
    # resume from another stage's last.pt; --init with another stage's checkpoint, garbage, or foreign keys
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "last.pt").write_bytes(ck["text"].read_bytes())
    vision = [*VISION[:-2], *common, "--out", tmp_path / "v"]
    refused(script(*vision, "--resume"), "last.pt", "expected a 'vision'", "found a 'text'")
    refused(script(*vision, "--init", ck["text"]), "text.pt", "expected a 'vision'")
    (tmp_path / "junk.pt").write_text("not weights")
    refused(script(*vision, "--init", tmp_path / "junk.pt"), "junk.pt", "not a readable state dict")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "foreign.pt")
    refused(script(*vision, "--init", tmp_path / "foreign.pt"), "foreign.pt", "none of its 1 keys")
    torch.save({"stem.0.weight": torch.zeros(3, 3)}, tmp_path / "shape.pt")
    refused(script(*vision, "--init", tmp_path / "shape.pt"), "shape.pt", "does not fit the encoder")


# -----------------------------------------------------------------------------
# training health: a non-finite loss stops the run naming the step and the batch, or is skipped and counted

STAGES = {"pretrain_vision.py": ["--lite"], "pretrain_text.py": ["--max-len", "32"],
          "align.py": ["--lite", "--max-len", "32", "--vision-ckpt", "none.pt", "--text-ckpt", "none.pt"]}


@pytest.mark.parametrize("name", list(STAGES))
def test_nonfinite_loss_stops_naming_step_and_ids(tmp_path, script, name):
    B.toy_set(tmp_path / "d", n_train=8)
    line = refused(script(name, *STAGES[name], "--data", tmp_path / "d", "--out", tmp_path / "o", "--epochs", "1",
                          "--batch-size", "4", "--workers", "0", "--lr", "1e30"),  # the first step blows the weights up
                   "non-finite loss at step 1, batch ids [", "--skip-nonfinite")
    assert sum(f"'v{i}'" in line for i in range(8)) == 4  # the 4 ids of that batch


def test_nonfinite_batch_skipped_and_counted(tmp_path, script, monkeypatch):
    """A batch whose input is NaN (a read that slipped past every check) is skipped on request: counted, named,
    and without a trace in the weights or the BatchNorm statistics; the run's numbers stay finite."""
    B.toy_set(tmp_path / "d", n_train=8)
    getitem = data.VolumeReportDataset.__getitem__

    def poisoned(self, i):
        item = getitem(self, i)
        if item["id"] == "v3":
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item
    monkeypatch.setattr(data.VolumeReportDataset, "__getitem__", poisoned)
    args = [*VISION, "--data", tmp_path / "d", "--out", tmp_path / "o"]
    refused(script(*args), "non-finite loss at step", "'v3'")
    code, out, err = script(*args, "--skip-nonfinite")
    assert code == 0, err
    assert out.count("skipped: non-finite loss") == 1 and "'v3'" in out and "1 non-finite batches skipped" in out
    ck = load(tmp_path / "o" / "last.pt")
    assert ck["step"] == 2 and math.isfinite(ck["best_metric"])  # the epoch ended on schedule: 1 of its 2 steps updated
    assert all(torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point())
    # A model whose weights are no longer finite: skipping cannot help; no AUC is computed from its NaN scores.
    refused(script(*args, "--skip-nonfinite", "--lr", "1e30", "--out", tmp_path / "o2"), "non-finite scores")


# -----------------------------------------------------------------------------
# security and atomic outputs, read from the source

SOURCES = sorted(p for p in list(ROOT.glob("*.py")) + list((ROOT / "benchmarks").glob("*.py")))


def calls(pattern):
    return [(p.name, n, line) for p in SOURCES for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(pattern, line.split("#")[0])]


def test_every_checkpoint_load_is_weights_only():
    loads = calls(r"torch\.load\(")
    assert loads and all("weights_only=True" in line for _, _, line in loads), loads
    assert not calls(r"allow_pickle\s*=\s*True|pickle\.load|weights_only\s*=\s*False")


def test_no_remote_code():
    assert not calls(r"trust_remote_code\s*=|AutoModel|AutoTokenizer\.from_pretrained"), "repository code must never run"


def test_outputs_are_written_atomically():
    """Every file a stage writes goes to a temporary name first, then os.replace: data.write_atomic, the cache's
    .npy files, save_checkpoint. The one exception is distill's cache, an append-only log of fsynced lines whose
    torn last line a restart skips. (demo.py builds the demo set, which ensure_demo() rebuilds unless its last
    file, dataset.json, is there; bench.py and benchmarks/ write scratch inputs, not outputs.)"""
    writes = [w for w in calls(r"open\([^)]*['\"][wa]b?['\"]|\.write_text\(|\.write_bytes\(|savefig\(|np\.save\(|torch\.save\(")
              if w[0] not in ("demo.py", "bench.py") and not (ROOT / "benchmarks" / w[0]).exists()]
    allowed = ["tmp.write_bytes(", 'open(tmp, "wb")', "np.save(f,", "torch.save(ckpt, f)", "savefig(png,",
               'open(cache_path, "a"']
    assert [w for w in writes if not any(a in w[2] for a in allowed)] == [], "write a temporary file, then os.replace it"
    assert all(any(a in w[2] for w in writes) for a in allowed)  # each allowed write is still there: the scan works
