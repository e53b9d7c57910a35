"""Training plumbing shared by the training scripts (stages 2a, 2b and 3), written once, as plain functions. What a
stage does lives in its script, in plain sight (flags, data, model, loss, training loop); what every stage does
alike lives here, in the order a script calls it:

    parser, parse     the flags all training stages share; the data set's recommended defaults under the command line
    (devices.setup    processes (torchrun), device, precision, seed -> `run`, a plain namespace of the run's state;
                      its docstring lists every field of `run`, and which function sets it)
    load_data         manifest, labels, splits, preset and cache (the demo set is built when missing)
    start             sampler and step counts, --resume from <out>/last.pt, DDP / torch.compile wrapping
    epochs            the epochs and (micro-)batches still to run; a resumed run continues mid-epoch exactly
    forward_context   autocast, DDP gradient sync on the last micro-step only, buffers kept for a skipped batch
    backward          the backward pass, under the non-finite-loss policy (stop naming the batch, or skip it)
    optimizer_step    cosine learning rate, clipping, optimizer step, log line, periodic last.pt
    predict, validate, end_of_epoch, finish   validation AUC, best.pt / last.pt / metrics.jsonl, the summary
    save              <out>/last.pt or best.pt from the run's state (checkpoints.py defines the file)
No Trainer class and no callbacks: each function does one visible thing to `run`, and the training loop
itself (batch, forward, loss, backward, step) stays in the stage script.
"""
import argparse
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import checkpoints
import data as D
import devices
import metrics
import model as M
import volumes as V
from demo import DEMO_TRAIN, ensure_demo

SCRIPTS = {"vision": "pretrain_vision.py", "text": "pretrain_text.py", "align": "align.py"}


# -----------------------------------------------------------------------------
# flags

def parser(doc, images=True, **paper_defaults):
    """An ArgumentParser with the data, optimization and run flags every training stage shares; the stage adds its
    "model" group. paper_defaults: the stage's own defaults (lr, weight_decay, clip, workers, ...)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=D.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=D.DEMO_DIR, help="manifest.csv or its folder (default: the demo set, built if missing)")
    g.add_argument("--labels", default=None, help="label CSV (id + label columns); default: out/distill/labels.csv "
                                                  "if it covers the data set, else the manifest's labels")
    g.add_argument("--uncertain", default="mask", choices=["mask", "positive", "negative"], help="how uncertain (-1) labels enter the BCE terms")
    g.add_argument("--train-fraction", type=float, default=1.0, help="train on this share of the training split (data scaling, "
                   "Fig. 3a): the same rows for every stage given --seed, and a smaller share's rows among a larger one's")
    g.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    if images:
        g.add_argument("--preset", default=None, help=f"preprocessing preset: one of {list(V.PRESETS)} or a .json preset "
                                                      "file; default: the data set's dataset.json, else chest")
        g.add_argument("--cache", default=None, help="preprocessed cache folder (default: <data>/cache-<preset>, used when it exists)")
        g.add_argument("--random-crop", action=argparse.BooleanOptionalAction, default=True,
                       help="train on random crops of the stored volume (translation augmentation); --no-random-crop: centre crops")
    g = p.add_argument_group("optimization (paper defaults)")
    g.add_argument("--epochs", type=int, default=5, help="training epochs")
    g.add_argument("--batch-size", type=int, default=10, help="samples per optimizer step, over all processes")
    g.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-steps per optimizer step")
    g.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    g.add_argument("--min-lr", type=float, default=1e-6, help="cosine schedule floor, reached at the last step")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--clip", type=float, default=0.0, help="gradient norm clipping (0 = off)")
    g.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision (fp16 only on CUDA, with a GradScaler)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0, help="random seed (weights, shuffling, crops)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (default out/<stage>, e.g. out/vision-lite)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    g.add_argument("--log-every", type=int, default=10, help="log every N optimizer steps")
    g.add_argument("--save-every", type=int, default=0, help="also save last.pt every N steps (0: once per epoch)")
    g.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps in total (0: run all epochs)")
    g.add_argument("--skip-nonfinite", action="store_true", help="skip (and count) batches with a non-finite loss instead of stopping")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(**paper_defaults)
    return p


def training_defaults(path, stage):
    """Training flags a data set recommends for a stage: dataset.json's {"train": {stage: {flag: value}}}. The stage
    scripts apply them under the command line and print them."""
    return D.dataset_defaults(path).get("train", {}).get(stage, {}) if D.manifest_path(path).is_file() else {}


def parse(p, stage):
    """Parse the command line over the data set's recommended defaults (the tiny demo set needs more epochs and
    other rates than CT-RATE): its dataset.json's "train" entry for the stage (vision, vision-lite, text, align,
    align-lite), or demo.py's own for the default demo folder, which is built later if missing. Flags given on the
    command line still win. -> args, with args.out filled in."""
    pre = p.parse_known_args()[0]
    key = stage + ("-lite" if getattr(pre, "lite", False) else "")
    demo = pre.data == D.DEMO_DIR
    tuned = DEMO_TRAIN.get(key, {}) if demo else training_defaults(pre.data, key)
    p.set_defaults(**tuned)
    args = p.parse_args()
    args.out = Path(args.out or f"out/{key}")
    if tuned and os.environ.get("RANK", "0") == "0":  # the first line a stage prints: where its non-paper defaults come from
        where = f"demo.DEMO_TRAIN[{key!r}]" if demo else f'{D.manifest_path(pre.data).parent / "dataset.json"} "train" -> {key!r}'
        print(f"defaults recommended by the data set ({where}): {tuned}; a flag on the command line wins")
    return args


DISTILL_LABELS = "out/distill/labels.csv"  # where distill.py writes labels, read by later stages by default


def pick_labels(table, path=None):
    """The labels a stage trains on: `path` when given (it must cover every id), else distill.py's output
    when it covers this data set, else the manifest's own columns. -> (table, what was used, for the log)."""
    if path:
        return table.with_labels(path), str(path)
    if Path(DISTILL_LABELS).is_file():
        if Path(DISTILL_LABELS).stat().st_mtime < Path(table.source).stat().st_mtime:  # e.g. a rebuilt demo set
            return table, f"the manifest label columns (not {DISTILL_LABELS}: older than {table.source}; run distill.py again)"
        try:
            return table.with_labels(DISTILL_LABELS), DISTILL_LABELS
        except D.DataError as e:  # labels of another data set: say so, and use the manifest's own
            return table, f"the manifest label columns (not {DISTILL_LABELS}: {e})"
    return table, "the manifest label columns"


def load_data(run, images=True, reports=True):
    """The data set -> (table, preset, cache): the manifest; its labels (--labels, else distill.py's, else the
    manifest's own); rows without report text skipped (and named) when reports are read; the preset and cache
    folder when images are. The default demo set is built first when missing (by rank 0; the others wait)."""
    args, log = run.args, run.log
    if run.master and args.data == D.DEMO_DIR:
        ensure_demo(args.data)
    if run.ddp:
        dist.barrier()
    table = D.load_table(args.data)
    table, labels_used = pick_labels(table, args.labels)
    if args.train_fraction != 1.0:  # before anything depends on the reports: the same rows in all three stages
        table = take_train_fraction(table, args.train_fraction, args.seed, log)
    empty = [rid for rid, r in zip(table.ids, table.reports) if not r.strip()] if reports else []
    if empty:  # no text to learn from (distill.py lists such reports as failures): skipped, and counted
        log(f"skipping {len(empty)} rows with an empty report: {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
        table = table.take([i for i, r in enumerate(table.reports) if r.strip()])
    preset = D.resolve_preset(args.preset, args.data) if images else None
    cache = (args.cache or Path(table.source).parent / f"cache-{V.preset_name(preset)}") if images else None
    n_train, n_valid = table.splits.count("train"), table.splits.count("valid")
    unit = "pairs" if images and reports else "volumes" if images else "reports"
    if n_train < args.batch_size:
        raise D.DataError(f"{table.source}: {n_train} training {unit}, fewer than one batch of {args.batch_size}")
    where = f", preset {V.preset_name(preset)}, cache {cache if Path(cache).exists() else 'none (reading NIfTI)'}" if images else ""
    log(f"data: {table.source} ({n_train} train / {n_valid} valid {unit}){where}")
    if labels_used == "the manifest label columns":  # no distilled labels yet: say how to train on them
        labels_used += f" ({len(table.label_names)} labels); for distilled ones run python distill.py --backend rules " \
                       f"(or an LLM) first: every stage then reads {DISTILL_LABELS}"
    else:
        labels_used += f" ({len(table.label_names)} labels)"
    log(f"labels: {labels_used}")
    return table, preset, cache


def take_train_fraction(table, fraction, seed, log):
    """--train-fraction (Fig. 3a): the first round(fraction x N) training rows in an order drawn from `seed` by a generator
    of its own (the run's other draws unchanged), the other splits whole. One order for all: the 1/8 lies in the 1/4."""
    if not 0 < fraction <= 1:
        raise D.UsageError(f"--train-fraction {fraction}: a share of the training split, in (0, 1]")
    train = [i for i, s in enumerate(table.splits) if s == "train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    keep = {train[j] for j in order[:max(1, round(fraction * len(train)))]}
    log(f"train fraction {fraction:g} (--seed {seed}): {len(keep)} of {len(train)} training rows")
    return table.take([i for i, s in enumerate(table.splits) if s != "train" or i in keep])


def data_record(args, table):
    """What a model was trained on, kept in its checkpoint: the data set, its training volumes, and whether it is the
    synthetic demo (dataset.json "synthetic", or the demo preset), so a scan's answers can be put in context."""
    info = D.dataset_defaults(args.data)
    return {"source": str(table.source), "name": info.get("name") or Path(table.source).parent.name,
            "train_volumes": table.splits.count("train"), "synthetic": bool(info.get("synthetic", info.get("preset") == "demo"))}


def tokenize(tokenizer, reports, max_len, device):
    """B report strings -> input_ids, attention_mask (B, L) each, on the device; longer reports are cut at max_len."""
    enc = tokenizer(list(reports), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    if device.type == "cuda":  # a copy from pageable memory makes the host wait for the GPU's stream; from pinned
        # (page-locked) memory it is queued and the host goes on (the images come pinned from the DataLoader)
        return ids.pin_memory().to(device, non_blocking=True), att.pin_memory().to(device, non_blocking=True)
    return ids.to(device), att.to(device)


# -----------------------------------------------------------------------------
# the training run: start (or resume), epochs, one step, end of epoch

def start(run, model, opt, train_ds, model_config, label_names, extra=None):
    """Between building the model and its first step -> the module to train (wrapped for DDP / torch.compile).
    Records what checkpoints need, makes the sampler and step counts, and resumes from <out>/last.pt (--resume)."""
    args = run.args
    run.model, run.opt, run.model_config, run.label_names, run.extra = model, opt, model_config, label_names, extra or {}
    # One sampler for every case: with a single process it is a seeded shuffle, under torchrun each rank gets a
    # disjoint shard. drop_last keeps every batch full (BatchNorm and the contrastive loss dislike tiny batches).
    run.sampler = DistributedSampler(train_ds, num_replicas=run.world, rank=run.rank, shuffle=True, seed=args.seed, drop_last=True)
    run.steps_per_epoch = len(run.sampler) // (run.micro * args.accum)
    run.total_steps = run.steps_per_epoch * args.epochs
    run.step, run.epoch, run.best, run.history, run.metrics = 0, 0, -math.inf, [], {}
    run.skipped, run.dropped, run.seen, run.saved = 0, False, 0, []
    resume(run)
    if run.ddp and run.device.type == "cuda":  # (CPU processes under gloo keep BatchNorm: SyncBatchNorm refuses CPU tensors)
        n = devices.sync_batchnorm(model)
        if n:  # the text stage has none
            run.log(f"SyncBatchNorm: {n} BatchNorm layers take their statistics over all processes")
    run.train_model = DDP(model) if run.ddp else model
    if args.compile:
        run.train_model = torch.compile(run.train_model)
    if run.master:
        run.out.mkdir(parents=True, exist_ok=True)
    run.log(f"training: {args.epochs} epochs x {run.steps_per_epoch} steps, batch {args.batch_size} ({run.world} "
            f"process(es) x {run.micro} x accum {args.accum}), amp {args.amp}, device {run.device}"
            f"{f', under torchrun, backend {dist.get_backend()}' if run.ddp else ''}")
    model.train()
    run.t0 = time.time()
    return run.train_model


def resume(run):
    """--resume: continue exactly from <out>/last.pt: weights, optimizer state, step, best metric, history, the RNG
    states and the fp16 loss scale. The learning-rate scales of this command's parameter groups win over the saved
    ones."""
    path = run.out / "last.pt"
    if not run.args.resume:
        return
    if not path.exists():
        run.log(f"resume: no {path} yet, starting fresh")
        return
    ck = checkpoints.load_checkpoint(path, stage=run.stage, label_names=run.label_names)
    M.load_state_strict(run.model, ck["model"], path)
    scales = [group.get("lr_scale", 1.0) for group in run.opt.param_groups]
    try:
        run.opt.load_state_dict(ck["optimizer"])
    except ValueError:  # other parameter groups, e.g. one group saved where align.py now has two
        raise D.DataError(f"{path}: saved by an older {SCRIPTS[run.stage]} with {len(ck['optimizer']['param_groups'])} optimizer "
                          f"group(s), this one has {len(scales)}; start afresh (without --resume) or pass another --out") from None
    for group, scale in zip(run.opt.param_groups, scales):
        group["lr_scale"] = scale
    run.step, run.best = ck["step"], ck["best_metric"] if ck["best_metric"] is not None else -math.inf
    devices.restore_random_and_scale(run, ck["extra"])
    run.history = ck["extra"].get("history", [])
    run.log(f"resume: {path} at step {run.step}")


def done(run):
    return run.step >= run.total_steps or bool(run.args.max_steps and run.step >= run.args.max_steps)


def epochs(run, train_ds):
    """The epochs still to run -> (epoch, its batches), where batches yields (batch, last_micro): last_micro is
    True for the last micro-batch of an optimizer step. A resumed run skips what it has already seen this epoch."""
    while not done(run):
        run.epoch, seen_steps = divmod(run.step, run.steps_per_epoch)
        run.sampler.set_epoch(run.epoch)
        train_ds.set_epoch(run.epoch)  # new random crops each epoch, reproducible from (seed, epoch, index)
        yield run.epoch, _batches(run, train_ds, seen_steps)


def _batches(run, train_ds, seen_steps):
    args = run.args
    # The epoch's micro-batches of indices, minus those already seen; none of the skipped ones is loaded.
    batches = list(BatchSampler(list(run.sampler), run.micro, drop_last=True))[seen_steps * args.accum:]
    loader = DataLoader(train_ds, batch_sampler=batches, num_workers=args.workers, pin_memory=run.device.type == "cuda",
                        generator=torch.Generator().manual_seed(args.seed + run.epoch))  # keeps the global RNG untouched
    for i, b in enumerate(loader):
        last_micro = (i + 1) % args.accum == 0
        yield b, last_micro
        if last_micro and done(run):  # --max-steps, or the end of the schedule
            return


@contextmanager
def forward_context(run, last_micro):
    """Around one micro-batch's forward pass: autocast; under DDP, gradients are synchronised on the last micro-step
    of an optimizer step only; with --skip-nonfinite a copy of the buffers (BatchNorm statistics) for backward()."""
    run.saved = [t.clone() for t in run.model.buffers()] if run.args.skip_nonfinite else []
    with (run.train_model.no_sync() if run.ddp and not last_micro else nullcontext()), run.autocast():
        yield


def backward(run, loss, batch):
    """Backpropagate loss / --accum (scaled by the GradScaler for fp16), unless the loss is not finite. A NaN or inf
    loss stops the run with one line naming the step and the batch ids; with --skip-nonfinite it is skipped and
    counted instead: the buffers its forward pass updated are restored, and its optimizer step passes without an
    update, so the epochs and the schedule stay in step. All processes decide together: one skipping alone would
    leave the others waiting for its gradients."""
    bad = (~torch.isfinite(loss.detach())).float()  # (1,): 1 if this process's loss is not finite
    if run.ddp:
        dist.all_reduce(bad)
    # `if not bad` reads a GPU tensor back to the host: one synchronisation per micro-step, beyond what logging needs.
    # Kept on purpose: the policy must know before the backward whether to run it, or to stop the run naming this
    # batch (a NaN loss's backward would leave NaN in every .grad, summed over the --accum micro-steps).
    # benchmarks/gpu_check.py measures its cost on a GPU.
    if not bad:
        run.scaler.scale(loss / run.args.accum).backward()
        run.seen += len(batch["id"]) * run.world
        return
    where = f"batch ids {batch['id']}" if not torch.isfinite(loss) else "on another process"
    if not run.args.skip_nonfinite:
        raise D.DataError(f"non-finite loss at step {run.step}, {where} (use --skip-nonfinite to skip such batches)")
    run.skipped += 1
    run.log(f"skipped: non-finite loss at step {run.step}, {where}")
    for t, old in zip(run.model.buffers(), run.saved):  # the forward pass updated them: undo, no trace left
        t.copy_(old)
    run.dropped = True


def lr_at(run, step):
    """Cosine from --lr down to --min-lr over all steps, stepped per iteration (a group's lr_scale multiplies it)."""
    a = run.args
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * min(step / max(run.total_steps, 1), 1.0)))


def optimizer_step(run, loss, parts=None):
    """After the last micro-batch of a step: set each group's learning rate, clip the gradient norm (--clip), step
    the optimizer and the GradScaler (not for a skipped non-finite batch), then log every --log-every steps and
    save last.pt every --save-every steps. parts: named loss terms (detached) for the log."""
    args, opt = run.args, run.opt
    if not run.dropped:
        for group in opt.param_groups:
            group["lr"] = lr_at(run, run.step) * group.get("lr_scale", 1.0)
        if args.clip:
            run.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.clip)
        run.scaler.step(opt)
        run.scaler.update()
    opt.zero_grad(set_to_none=True)
    run.step, run.dropped = run.step + 1, False
    if run.step % args.log_every == 0 or run.step == run.total_steps:
        parts = {k: round(v.item(), 4) for k, v in (parts or {}).items()}
        lr, rate = lr_at(run, run.step - 1), run.seen / (time.time() - run.t0)
        run.log(f"step {run.step}/{run.total_steps} | epoch {run.epoch + 1} | loss {loss.item():.4f}"
                f"{f' {parts}' if parts else ''} | lr {lr:.2e} | {rate:.1f} samples/s")
        run.history.append({"step": run.step, "loss": loss.item(), **parts, "lr": lr})
    if run.master and args.save_every and run.step % args.save_every == 0 and run.step % run.steps_per_epoch:
        save(run, "last.pt")  # (at the end of an epoch, end_of_epoch saves)


@torch.no_grad()
def predict(run, dataset, read):
    """An eval-mode pass over a split -> (references (N, C): 1/0, nan where masked; [scores (N, C), ...]).
    read(batch) -> a tuple of (B, C) score tensors. The loader has its own generator: the global RNG stays untouched,
    so a resumed run draws exactly what an uninterrupted one does."""
    run.model.eval()
    refs, outs = [], []
    for b in DataLoader(dataset, batch_size=run.micro, num_workers=run.args.workers, generator=torch.Generator()):
        outs.append([s.float().cpu() for s in read(b)])
        refs.append(torch.where(b["mask"] > 0, b["targets"], torch.nan))
    run.model.train()
    return torch.cat(refs).numpy(), [torch.cat(s).numpy() for s in zip(*outs)]


def validate(run, dataset, scores, label_names):
    """Per-label AUC of scores(batch) -> (B, C) logits over the validation split, on rank 0 -> {"auc": {label: AUC or
    None}, "macro_auc": their mean or None}. The other processes, and an empty split, get {"macro_auc": None}.
    Logits, not probabilities: a float32 sigmoid is exactly 1.0 beyond a logit of about 17, which would tie cases."""
    if not run.master or not len(dataset):
        return {"macro_auc": None}
    refs, (s,) = predict(run, dataset, lambda b: (scores(b),))
    aucs, macro = metrics.per_label_auc(refs, s)
    return {"auc": dict(zip(label_names, aucs)), "macro_auc": macro}


def fmt(x, nd=4):
    return "undefined" if x is None else f"{x:.{nd}f}"


def end_of_epoch(run, result, what="valid macro AUC"):
    """After each epoch (or an early stop), on rank 0: log the validation result ({"macro_auc", "auc", ...}), keep
    best.pt (the best macro AUC so far) and last.pt, rewrite metrics.jsonl. The other processes wait here."""
    if run.master:
        run.metrics = result
        extra = f" | classifier {fmt(result['classifier_macro_auc'])}" if "classifier_macro_auc" in result else ""
        run.log(f"epoch {run.epoch + 1} | {what} {fmt(result['macro_auc'])}{extra}")
        run.history.append({"step": run.step, "epoch": run.epoch + 1, **result})
        improved = result["macro_auc"] is not None and result["macro_auc"] > run.best
        if improved:
            run.best = result["macro_auc"]
        # best.pt first: killed in between, the run resumes from the old last.pt and evaluates again, so last.pt
        # never remembers a best.pt that is not on disk (nor one left by an earlier run in --out)
        if improved or run.best == -math.inf:
            save(run, "best.pt")
        save(run, "last.pt")
        # rewritten whole from the history (which a resumed run reloads): no epoch lost or repeated
        D.write_atomic(run.out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in run.history if "epoch" in h))
    if run.ddp:
        dist.barrier()


def finish(run, title, what="valid macro AUC"):
    """The summary: the last validation's AUC table under `title`, the run's last line; the process group closed."""
    if run.master and run.metrics.get("auc"):
        width = max(len(n) for n in run.metrics["auc"])
        run.log(title)
        for name, auc in [*run.metrics["auc"].items(), ("macro", run.metrics["macro_auc"])]:
            run.log(f"  {name:<{width}}  {fmt(auc, 3)}")
    run.log(f"done: {run.step} steps in {time.time() - run.t0:.0f} s, {run.skipped} non-finite batches skipped; best "
            f"{what} {fmt(None if run.best == -math.inf else run.best)}; wrote {run.out / 'last.pt'}, {run.out / 'best.pt'}")
    if run.ddp:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# checkpoints (checkpoints.py: the format, the atomic write, the checked read)

def save(run, name):
    """<out>/<name> from the run's state: what save_checkpoint needs; the RNG states, loss scale and history for --resume."""
    checkpoints.save_checkpoint(run.out / name, stage=run.stage, model=run.model, model_config=run.model_config, args=vars(run.args),
                    label_names=run.label_names, optimizer=run.opt, step=run.step, epoch=run.step // run.steps_per_epoch,
                    best_metric=None if run.best == -math.inf else run.best,
                    extra={**devices.random_and_scale(run), "history": run.history, "metrics": run.metrics, **run.extra})
