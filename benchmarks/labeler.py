"""
The rules labeler's figures for docs/labeler.md: per-label F1 (present vs rest) of `distill.py --backend rules`

  - on the 800 real CT-RATE reports with hand labels (../shared/greenrfm-sample-data, beside the checkout), with the
    built-in chest CT synonyms of data.py;
  - on the composed chest radiograph reports of examples/chexpert_reports.csv, with examples/chexpert_labels.txt
    (also the exact 4-way agreement: present / absent / uncertain / not mentioned, over the cells either side fills).

Prints markdown tables. Pass --compare DIR (a copy of an older checkout) to add its figures as a column.

  python benchmarks/labeler.py
  git worktree add /tmp/old 7dd0f5c && python benchmarks/labeler.py --compare /tmp/old
"""
import argparse, csv, json, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared/greenrfm-sample-data/reports/ctrate_ctclip_manual_labels_train.csv"
CXR = ROOT / "examples/chexpert_reports.csv"
sys.path.insert(0, str(ROOT))
from data import HelpFormatter  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
p.add_argument("--compare", default=None, help="another checkout whose distill.py to run on the same reports")
args = p.parse_args()

def run(checkout, reports, labels):
    """agreement.json and labels.csv of distill.py --backend rules, run from `checkout` on `reports`."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, str(Path(checkout) / "distill.py"), "--backend", "rules", "--reports", str(reports),
                        "--reference", str(reports), "--labels", labels, "--out", out],
                       check=True, capture_output=True, text=True, cwd=checkout, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
        with open(Path(out) / "labels.csv", newline="") as f:
            return json.loads((Path(out) / "agreement.json").read_text()), list(csv.DictReader(f))

def table(reports, labels, title):
    runs = {"now": run(ROOT, reports, labels)} | ({"compared": run(args.compare, reports, labels)} if args.compare else {})
    cols = list(runs)
    print(f"\n### {title}\n\n| label | positives | " + " | ".join(f"F1 {c}" for c in cols) + " |\n|---|---:|" + "---:|" * len(cols))
    for name, m in runs["now"][0]["labels"].items():
        f1 = [runs[c][0]["labels"][name]["f1"] for c in cols]
        print(f"| {name} | {sum(m['confusion'][0])} | " + " | ".join("undefined" if v is None else f"{v:.3f}" for v in f1) + " |")
    print("| **macro** | | " + " | ".join(f"**{runs[c][0]['macro_f1']:.3f}**" for c in cols) + " |")
    return runs["now"][1]

def exact(rows, reports):
    """Cells where the reference or the prediction says something: how many agree exactly (1, 0, -1 or empty)."""
    gold = {r["id"]: r for r in csv.DictReader(open(reports, newline=""))}
    cells = [(r[n], gold[r["id"]][n]) for r in rows for n in r if n != "id" and (r[n] or gold[r["id"]][n])]
    return sum(a == b for a, b in cells), len(cells)

if REAL.exists():
    table(REAL, "chest_ct", f"800 CT-RATE reports ({REAL.name}), built-in synonyms")
else:
    print(f"{REAL} not present: the CT-RATE table is skipped")
ok, n = exact(table(CXR, str(ROOT / "examples/chexpert_labels.txt"), "composed chest radiograph reports, CheXpert label file"), CXR)
print(f"\nexact 4-way agreement on the composed reports: {ok}/{n} cells ({ok / n:.3f})")
