"""
Throughput of distill.py's LLM client against a fake server with a fixed latency.

A loopback OpenAI-compatible server answers every request after --latency seconds; distill.py labels --n reports
at --concurrency requests in flight. Ideal time = n * latency / concurrency; the client's overhead (threads, JSON,
the fsync'd cache) shows as the ratio to it, which should stay at or below 1.15.

  python benchmarks/distill_throughput.py                   # 500 reports, 200 ms, concurrency 16
  python benchmarks/distill_throughput.py --n 2000 --concurrency 64
"""
import argparse, csv, json, os, re, subprocess, sys, tempfile, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import CHEST_CT_LABELS, HelpFormatter  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
p.add_argument("--n", type=int, default=500, help="reports to label")
p.add_argument("--latency", type=float, default=0.2, help="seconds the fake server takes per request")
p.add_argument("--concurrency", type=int, default=16, help="requests in flight (distill.py --concurrency)")
args = p.parse_args()

# -----------------------------------------------------------------------------
# the fake server: a valid answer for the 18 chest CT labels after a fixed latency

ANSWER = json.dumps({"choices": [{"message": {"role": "assistant", "content": json.dumps({n: "absent" for n in CHEST_CT_LABELS})}}],
                     "usage": {"total_tokens": 300}}).encode()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as vLLM / llama.cpp / OpenAI do
    disable_nagle_algorithm = True  # TCP_NODELAY, as real servers set: else headers + body cost a 40 ms delayed ACK

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(args.latency)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

ThreadingHTTPServer.request_queue_size = 256
httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
httpd.daemon_threads = True
threading.Thread(target=httpd.serve_forever, daemon=True).start()

# -----------------------------------------------------------------------------
# run distill.py on n short reports and read its own timing of the labelling phase

with tempfile.TemporaryDirectory() as tmp:
    reports = Path(tmp) / "reports.csv"
    with open(reports, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "report"])
        w.writerows([[f"r{i}", f"Report {i}. No pleural effusion. A 4 mm nodule in the right upper lobe."] for i in range(args.n)])
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "distill.py"), "--reports", str(reports), "--out", str(Path(tmp) / "out"),
                        "--api-base", f"http://127.0.0.1:{httpd.server_address[1]}/v1", "--model", "fake",
                        "--concurrency", str(args.concurrency)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.time() - t0
    if r.returncode != 0:
        sys.exit(f"distill.py failed:\n{r.stdout}\n{r.stderr}")
    seconds = float(re.search(r"llm: \d+ reports in ([\d.]+) s", r.stdout).group(1))

ideal = args.n * args.latency / args.concurrency
print(f"{args.n} reports, {args.latency * 1000:.0f} ms latency, concurrency {args.concurrency}, {os.cpu_count()} CPUs")
print(f"labelling: {seconds:.2f} s (ideal {ideal:.2f} s) -> ratio {seconds / ideal:.3f} (target <= 1.15); "
      f"{args.n / seconds:.1f} reports/s; whole process incl. start-up {wall:.1f} s")
