"""
Stage 2 of GreenRFM: align the image and text encoders in one shared space.

Both stage-1 encoders are loaded and trained together, end to end, with two kinds of supervision:
  1. a contrastive (CLIP) loss on the raw dot products of image and report latents in a 768-d space,
     so that each volume scores its own report above the others of the batch;
  2. ONE linear classifier shared by image and text latents, trained with masked BCE on the labels,
     so that both modalities place each finding in the same direction of the shared space.
  loss = L_clip + (BCE(classifier(image latent)) + BCE(classifier(text latent))) / 2
No L2 normalisation anywhere (the paper found that keeping feature magnitude helps) and temperature 1.
After training, zero-shot diagnosis compares each volume with "There is {x}." / "There is no {x}.".
For short runs (the demo recommends both; the defaults are the paper's): --head-lr trains the new projections
and classifier faster than the pretrained encoders, and --init-shared heads starts them from the stage-1 heads.

Reads:  a data set (default data/demo, built on first use); stage-1 checkpoints
        out/vision[-lite]/best.pt and out/text/best.pt (a missing one is a warning: that encoder
        starts from its initialisation); labels as in stage 1.
Writes: <out>/last.pt, <out>/best.pt, <out>/metrics.jsonl (out/align, or out/align-lite with --lite);
        prints the zero-shot AUC table of the validation split at the end.

Examples:
  python align.py --lite                                          # demo set on a laptop CPU, minutes
  python align.py --data ctrate/manifest.csv --amp bf16 --grad-ckpt             # one 24 GB GPU
  torchrun --nproc_per_node 4 align.py --data ctrate/manifest.csv --amp bf16
"""
import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import data as D
from demo import ensure_demo
import model as M

STAGE = "align"
CXR_BERT = "microsoft/BiomedVLP-CXR-BERT-specialized"


def main():
    # -----------------------------------------------------------------------------
    # config
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=D.DEMO_DIR, help="manifest.csv or its folder (default: the demo set, built if missing)")
    g.add_argument("--labels", default=None, help="label CSV (id + label columns); default: out/distill/labels.csv if present, else the manifest's labels")
    g.add_argument("--preset", default=None, help="preprocessing preset (chest, abdomen, mri, demo); default: the data set's dataset.json, else chest")
    g.add_argument("--cache", default=None, help="preprocessed cache folder (default: <data>/cache-<preset>, used when it exists)")
    g.add_argument("--uncertain", default="mask", choices=["mask", "positive", "negative"], help="how uncertain (-1) labels enter the BCE terms")
    g.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    g.add_argument("--random-crop", action=argparse.BooleanOptionalAction, default=True,
                   help="train on random crops of the stored volume (translation augmentation); --no-random-crop: centre crops")
    g = p.add_argument_group("model")
    g.add_argument("--lite", action="store_true", help="the 6 GB configuration: stride-4 stem, text encoder checkpointed, reads out/vision-lite, writes out/align-lite")
    g.add_argument("--vision-ckpt", default=None, help="stage-1 vision checkpoint (default out/vision[-lite]/best.pt)")
    g.add_argument("--text-ckpt", default="out/text/best.pt", help="stage-1 text checkpoint")
    g.add_argument("--text-model", default=None, help="text encoder used only when there is no text checkpoint (as in pretrain_text.py)")
    g.add_argument("--pooling", default="cls", choices=M.POOLINGS, help="report embedding, used only when there is no text checkpoint (as in pretrain_text.py)")
    g.add_argument("--max-len", type=int, default=512, help="maximum tokens per report")
    g.add_argument("--embed-dim", type=int, default=768, help="size of the shared latent space")
    g.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both encoders (less memory, more compute)")
    g.add_argument("--init-shared", default="random", choices=["random", "heads"],
                   help="how the projections and the shared classifier start: random (the paper's), or heads: from the "
                        "two stage-1 heads, so the classifier starts reading both latents as stage 1 did (needs both checkpoints)")
    g = p.add_argument_group("optimization (paper defaults)")
    g.add_argument("--epochs", type=int, default=5, help="training epochs")
    g.add_argument("--batch-size", type=int, default=10, help="volume-report pairs per optimizer step, over all processes")
    g.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-steps (each micro-batch is its own contrastive batch)")
    g.add_argument("--lr", type=float, default=1e-5, help="peak AdamW learning rate")
    g.add_argument("--head-lr", type=float, default=None,
                   help="peak learning rate of the layers this stage adds (the two projections and "
                        "the shared classifier); default: --lr, one rate for everything as in the paper")
    g.add_argument("--min-lr", type=float, default=1e-6, help="cosine schedule floor, reached at the last step (scaled alike for --head-lr)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--clip", type=float, default=0.5, help="gradient norm clipping (0 = off)")
    g.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision (fp16 only on CUDA, with a GradScaler)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0, help="random seed (weights, shuffling, crops)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (default out/align or out/align-lite)")
    g.add_argument("--template", default="there_is", choices=sorted(M.PROMPT_TEMPLATES), help="prompt pair for the zero-shot validation AUC")
    g.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    g.add_argument("--log-every", type=int, default=10, help="log every N optimizer steps")
    g.add_argument("--save-every", type=int, default=0, help="also save last.pt every N steps (0: once per epoch)")
    g.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps in total (0: run all epochs)")
    g.add_argument("--skip-nonfinite", action="store_true", help="skip (and count) batches with a non-finite loss instead of stopping")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    # A data set may recommend training flags of its own in its dataset.json (the tiny demo set needs a
    # higher learning rate and more epochs than CT-RATE); flags given on the command line still win.
    pre = p.parse_known_args()[0]
    tuned = D.training_defaults(pre.data, STAGE + ("-lite" if pre.lite else ""))
    p.set_defaults(**tuned)
    args = p.parse_args()
    out = Path(args.out or ("out/align-lite" if args.lite else "out/align"))
    vision_ckpt = Path(args.vision_ckpt or ("out/vision-lite/best.pt" if args.lite else "out/vision/best.pt"))

    # -----------------------------------------------------------------------------
    # setup: processes, device, precision, seed
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:  # launched by torchrun: one process per GPU (or per CPU slot with gloo)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu")
    else:
        rank, world = 0, 1
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    # bf16 autocast works on CPU and GPU; fp16 needs CUDA and a GradScaler against underflow.
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if amp_dtype == torch.float16 and device.type != "cuda":
        log("note: --amp fp16 needs CUDA; running in fp32")
        amp_dtype = None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    if args.batch_size % (world * args.accum):
        raise D.DataError(f"--batch-size {args.batch_size} is not divisible by processes x --accum = {world * args.accum}")
    micro = args.batch_size // (world * args.accum)  # pairs per forward pass on one process = contrastive batch

    if tuned:
        log(f"defaults recommended by the data set (dataset.json): {tuned}")

    # -----------------------------------------------------------------------------
    # data: (volume, report, labels) triples
    if master and args.data == D.DEMO_DIR:
        ensure_demo(args.data)
    if ddp:
        dist.barrier()  # the other ranks wait until rank 0 has built the demo set
    table = D.load_table(args.data)
    table, labels_used = D.pick_labels(table, args.labels)  # --labels, else distill.py's, else the manifest's
    empty = [rid for rid, r in zip(table.ids, table.reports) if not r.strip()]
    if empty:  # no text to learn from (distill.py lists such reports as failures): skipped, and counted
        log(f"skipping {len(empty)} rows with an empty report: {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
        table = table.take([i for i, r in enumerate(table.reports) if r.strip()])
    preset = args.preset or D.dataset_defaults(args.data).get("preset", "chest")
    cache = args.cache or Path(table.source).parent / f"cache-{preset}"
    train_t, valid_t = table.subset("train"), table.subset("valid")
    if len(train_t) < args.batch_size:
        raise D.DataError(f"{table.source}: {len(train_t)} training pairs, fewer than one batch of {args.batch_size}")
    log(f"data: {table.source} ({len(train_t)} train / {len(valid_t)} valid pairs), preset {preset}, "
        f"cache {cache if Path(cache).exists() else 'none (reading NIfTI)'}")
    log(f"labels: {labels_used} ({len(table.label_names)} labels)")
    train_ds = D.VolumeReportDataset(train_t, preset, train=args.random_crop, cache_dir=cache, seed=args.seed, uncertain=args.uncertain)
    valid_ds = D.VolumeReportDataset(valid_t, preset, train=False, cache_dir=cache, uncertain=args.uncertain)
    # One sampler for every case: with a single process it is a seeded shuffle, under torchrun each
    # rank gets a disjoint shard. drop_last keeps every contrastive batch full.
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // (micro * args.accum)
    total_steps = steps_per_epoch * args.epochs

    # -----------------------------------------------------------------------------
    # model: the two stage-1 encoders, two projections into the shared space, one shared classifier
    C = len(table.label_names)
    if vision_ckpt.exists():  # rebuild exactly the stage-1 architecture from the checkpoint itself
        vck = M.load_checkpoint(vision_ckpt, stage="vision", label_names=table.label_names)
        vision_cfg = vck["model_config"]["vision"]
        if vision_cfg["stem"] != (4 if args.lite else 2):
            raise D.DataError(f"{vision_ckpt}: a stem-{vision_cfg['stem']} encoder, but {'--lite' if args.lite else 'the standard model'} "
                              f"needs stem {4 if args.lite else 2}; pass the matching --vision-ckpt")
        D.require_channels(vision_cfg, preset, vision_ckpt)
    else:  # one input channel per intensity window of the preset
        vck, vision_cfg = None, {"in_channels": D.input_channels(preset), "stem": 4 if args.lite else 2,
                                 "widths": [64, 128, 256, 512]}
        log(f"WARNING: no vision checkpoint at {vision_ckpt}: the image encoder starts from random initialisation "
            f"(run pretrain_vision.py{' --lite' if args.lite else ''} first for the full recipe)")
    text_path = Path(args.text_ckpt)
    if text_path.exists():
        tck = M.load_checkpoint(text_path, stage="text", label_names=table.label_names)
        text_cfg = tck["model_config"]["text"]
        tokenizer = M.tokenizer_from_cfg(text_cfg)
        text_encoder = M.TextEncoder(text_cfg)
    else:
        tck = None
        source = args.text_model or D.dataset_defaults(args.data).get("text_model", CXR_BERT)
        text_encoder, tokenizer, text_cfg = M.build_text(source, reports=train_t.reports, max_len=args.max_len, pooling=args.pooling)
        log(f"WARNING: no text checkpoint at {text_path}: the text encoder starts from {source} "
            f"(run pretrain_text.py first for the full recipe)")
    model_config = {"kind": STAGE, "num_labels": C, "embed_dim": args.embed_dim, "vision": vision_cfg, "text": text_cfg}
    model = M.build_model(model_config)
    model.text.load_state_dict(text_encoder.state_dict())  # pretrained weights when built from a hub model
    # Copy the stage-1 encoders in strictly: a key that does not match is an error, never a silent skip.
    for ck, name, path in ((vck, "vision", vision_ckpt), (tck, "text", text_path)):
        if ck is not None:
            M.load_encoder_from_stage1(model, ck, name, where=path)
            log(f"loaded {name} encoder: {path} (stage-1 step {ck['step']}, valid macro AUC {ck['best_metric']})")
    # Where the shared space starts. "random": the layers' default initialisation, as in the paper. "heads": from
    # the stage-1 heads H_img (C, 512) and H_txt (C, H). With A (E, C) orthonormal columns and a = 0.1:
    #   img_proj = a A H_img, txt_proj = a A H_txt, classifier = A^T / a (bias: the mean of the two heads' biases)
    # so classifier(img_proj(f)) = H_img f, the stage-1 read-out exactly, and an image-text dot product starts
    # as a^2 (image logits) . (text logits): zero-shot begins from what both stage-1 heads know. a keeps those
    # products moderate for the temperature-1 CLIP loss; the contrastive gradient then widens the rank-C space.
    if args.init_shared == "heads" and (vck is None or tck is None):
        log("note: --init-shared heads needs both stage-1 checkpoints: the projections and classifier start random")
    elif args.init_shared == "heads":
        if C > args.embed_dim:
            raise D.DataError(f"--init-shared heads needs --embed-dim >= the {C} labels")
        a = 0.1
        A = torch.linalg.qr(torch.randn(args.embed_dim, C, generator=torch.Generator().manual_seed(args.seed)))[0]  # (E, C)
        with torch.no_grad():
            model.img_proj.weight.copy_(a * A @ vck["model"]["head.weight"].float())  # (E, 512)
            model.txt_proj.weight.copy_(a * A @ tck["model"]["head.weight"].float())  # (E, H)
            model.classifier.weight.copy_(A.T / a)  # (C, E)
            model.classifier.bias.copy_((vck["model"]["head.bias"] + tck["model"]["head.bias"]).float() / 2)
        log("shared space: projections and classifier start from the stage-1 heads (--init-shared heads)")
    model.vision.grad_ckpt = args.grad_ckpt
    # --lite must fit 6 GB: at 512 tokens the fp32 BERT alone keeps ~3 GiB of activations for the backward pass, so
    # the lite configuration always recomputes its layers (exact: no BatchNorm in BERT; +17% FLOPs per lite step).
    if args.grad_ckpt or args.lite:
        model.text.gradient_checkpointing_enable()
    model.to(device)
    log(f"model: ResNet-18 stem {vision_cfg['stem']} + {text_cfg['source']} -> {args.embed_dim}-d, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, all trained")

    def tokens(reports):  # list of B strings -> input_ids, attention_mask (B, L) on the device
        enc = tokenizer(list(reports), padding=True, truncation=True, max_length=args.max_len, return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    # -----------------------------------------------------------------------------
    # optimizer, cosine schedule (stepped per iteration), resume
    # Two parameter groups: the encoders arrive trained by stage 1, while the projections and the shared classifier
    # are new (random, or the stage-1 heads recombined above). Adam moves a weight by about lr per step, so at the
    # paper's 1e-5 a random layer needs the paper's ~23,000 steps to learn; --head-lr lets a short run train the
    # new layers faster without shaking the pretrained encoders. Both groups follow one cosine curve (x lr_scale).
    groups = {True: [], False: []}  # is an encoder weight -> parameters
    for n, p in model.named_parameters():
        groups[n.startswith(("vision.", "text."))].append(p)
    encoders, new_layers = groups[True], groups[False]
    if args.lr <= 0 or (args.head_lr is not None and args.head_lr <= 0):
        raise D.DataError(f"--lr {args.lr} / --head-lr {args.head_lr}: learning rates must be positive")
    head_scale = (args.head_lr or args.lr) / args.lr
    opt = torch.optim.AdamW([{"params": encoders, "lr_scale": 1.0}, {"params": new_layers, "lr_scale": head_scale}],
                            lr=args.lr, weight_decay=args.weight_decay)
    log(f"learning rates: encoders {args.lr:g}, projections + classifier {args.lr * head_scale:g} (peak, cosine to {args.min_lr:g}"
        f"{f' x {head_scale:g}' if head_scale != 1 else ''})")
    step, best, history = 0, -math.inf, []
    if args.resume and (out / "last.pt").exists():
        ck = M.load_checkpoint(out / "last.pt", stage=STAGE, label_names=table.label_names)
        model.load_state_dict(ck["model"])
        if len(ck["optimizer"]["param_groups"]) != 2:  # encoders + new layers since the --head-lr split
            raise D.DataError(f"{out / 'last.pt'}: saved by an older align.py with one optimizer group; "
                              f"start afresh (without --resume) or pass another --out")
        opt.load_state_dict(ck["optimizer"])
        for group, scale in zip(opt.param_groups, (1.0, head_scale)):  # this command's --head-lr, not the saved one
            group["lr_scale"] = scale
        step, best = ck["step"], ck["best_metric"] if ck["best_metric"] is not None else -math.inf
        torch.set_rng_state(ck["extra"]["rng"])
        history = ck["extra"].get("history", [])
        log(f"resume: {out / 'last.pt'} at step {step}")
    elif args.resume:
        log(f"resume: no {out / 'last.pt'} yet, starting fresh")
    train_model = DDP(model) if ddp else model
    if args.compile:
        train_model = torch.compile(train_model)

    def lr_at(s):  # cosine from --lr down to --min-lr over all steps
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(s / max(total_steps, 1), 1.0)))

    def save(name, metrics):
        M.save_checkpoint(out / name, stage=STAGE, model=model, model_config=model_config, args=vars(args),
                          label_names=table.label_names, optimizer=opt, step=step, epoch=step // steps_per_epoch,
                          best_metric=None if best == -math.inf else best,
                          extra={"rng": torch.get_rng_state(), "history": history, "metrics": metrics, "preset": preset})

    @torch.no_grad()
    def evaluate():  # zero-shot and classifier AUC on the validation split, on rank 0
        model.eval()
        # Prompt latents depend only on the text encoder: compute them once per evaluation, (C, 2, E).
        prompts = M.prompt_latents(model, tokenizer, table.label_names, M.PROMPT_TEMPLATES[args.template], args.max_len, device)
        zs, cls, refs = [], [], []
        for b in DataLoader(valid_ds, batch_size=micro, num_workers=args.workers,
                            generator=torch.Generator()):  # own generator: the global RNG stays untouched (exact resume)
            with autocast():
                img = model.encode_image(b["image"].to(device)).float()  # (B, E)
            zs.append(M.zero_shot_scores(img, prompts).cpu())  # (B, C) P(positive prompt)
            cls.append(torch.sigmoid(model.classifier(img)).cpu())  # shared classifier read-out
            refs.append(torch.where(b["mask"] > 0, b["targets"], torch.nan))
        model.train()
        refs = torch.cat(refs).numpy()
        aucs, macro = M.per_label_auc(refs, torch.cat(zs).numpy())
        _, cls_macro = M.per_label_auc(refs, torch.cat(cls).numpy())
        return {"auc": dict(zip(table.label_names, aucs)), "macro_auc": macro, "classifier_macro_auc": cls_macro}

    # -----------------------------------------------------------------------------
    # training loop
    if master:
        out.mkdir(parents=True, exist_ok=True)
    log(f"training: {args.epochs} epochs x {steps_per_epoch} steps, batch {args.batch_size} "
        f"({world} process(es) x {micro} x accum {args.accum}), amp {args.amp}, device {device}")
    model.train()
    skipped, dropped, t0, seen, metrics = 0, False, time.time(), 0, {}
    while step < total_steps and not (args.max_steps and step >= args.max_steps):
        epoch, done = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)  # new random crops each epoch, reproducible from (seed, epoch, index)
        # Skip the batches a resumed run has already seen this epoch, without loading them.
        batches = list(BatchSampler(list(sampler), micro, drop_last=True))[done * args.accum:]
        loader = DataLoader(train_ds, batch_sampler=batches, num_workers=args.workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(args.seed + epoch))  # keeps the global RNG untouched
        for i, b in enumerate(loader):
            x = b["image"].to(device, non_blocking=True)  # (B, K windows, D, H, W)
            ids, att = tokens(b["report"])  # (B, L) each
            y, m = b["targets"].to(device), b["mask"].to(device)  # (B, C) each
            last_micro = (i + 1) % args.accum == 0
            saved = [t.clone() for t in model.buffers()] if args.skip_nonfinite else []  # BatchNorm statistics
            with (train_model.no_sync() if ddp and not last_micro else nullcontext()), autocast():
                # Latents (B, E) in the shared space, and the shared classifier's logits (B, C) for each:
                # one set of classifier weights reads both, which ties the two modalities together.
                img, txt, img_logits, txt_logits = train_model(x, ids, att)
                loss, parts = M.align_loss(img.float(), txt.float(), img_logits.float(), txt_logits.float(), y, m)
            bad = (~torch.isfinite(loss.detach())).float()  # (1,): 1 if this process's loss is not finite
            if ddp:  # decided together: a process skipping alone would leave the others waiting for its gradients
                dist.all_reduce(bad)
            if bad:
                where = f"batch ids {b['id']}" if not torch.isfinite(loss) else "on another process"
                if not args.skip_nonfinite:
                    raise D.DataError(f"non-finite loss at step {step}, {where} (use --skip-nonfinite to skip such batches)")
                skipped += 1
                log(f"skipped: non-finite loss at step {step}, {where}")
                for t, old in zip(model.buffers(), saved):  # the forward pass updated them: undo, no trace left
                    t.copy_(old)
                dropped = True  # its optimizer step passes without an update: epochs and schedule stay in step
            else:
                scaler.scale(loss / args.accum).backward()
                seen += len(x) * world
            if not last_micro:
                continue
            if not dropped:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step) * group["lr_scale"]
                if args.clip:  # the paper clips at 0.5: the raw dot products of the CLIP loss can spike
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                scaler.step(opt)
                scaler.update()
            opt.zero_grad(set_to_none=True)
            step, dropped = step + 1, False
            if step % args.log_every == 0 or step == total_steps:
                rate = seen / (time.time() - t0)
                parts = {k: round(v.item(), 4) for k, v in parts.items()}
                log(f"step {step}/{total_steps} | epoch {epoch + 1} | loss {loss.item():.4f} {parts} | lr {lr_at(step - 1):.2e} | {rate:.1f} samples/s")
                history.append({"step": step, "loss": loss.item(), **parts, "lr": lr_at(step - 1)})
            if master and args.save_every and step % args.save_every == 0 and step % steps_per_epoch:  # (epoch end: below)
                save("last.pt", metrics)
            if step >= total_steps or (args.max_steps and step >= args.max_steps):
                break
        # -------------------------------------------------------------------------
        # end of epoch (or early stop): evaluate on rank 0, keep the best and the last checkpoint
        if master:
            metrics = evaluate() if len(valid_ds) else {"macro_auc": None}
            macro, cmacro = metrics["macro_auc"], metrics.get("classifier_macro_auc")
            log(f"epoch {epoch + 1} | valid zero-shot macro AUC {'undefined' if macro is None else f'{macro:.4f}'}"
                f" | classifier {'undefined' if cmacro is None else f'{cmacro:.4f}'}")
            history.append({"step": step, "epoch": epoch + 1, **metrics})
            improved = macro is not None and macro > best
            if improved:
                best = macro
            # best.pt first: killed in between, the run resumes from the old last.pt and evaluates again, so
            # last.pt never remembers a best.pt that is not on disk (nor one left by an earlier run in --out)
            if improved or best == -math.inf:
                save("best.pt", metrics)
            save("last.pt", metrics)
            # rewritten whole from the history (which a resumed run reloads): no epoch lost or repeated
            D.write_atomic(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history if "epoch" in h))
        if ddp:
            dist.barrier()

    # -----------------------------------------------------------------------------
    # summary: the zero-shot AUC table of the validation split (last epoch)
    if master and metrics.get("auc"):
        width = max(len(n) for n in table.label_names)
        log(f"zero-shot AUC, validation split, prompts {M.PROMPT_TEMPLATES[args.template]}:")
        for name, auc in metrics["auc"].items():
            log(f"  {name:<{width}}  {'undefined' if auc is None else f'{auc:.3f}'}")
        macro = metrics["macro_auc"]
        log(f"  {'macro':<{width}}  {'undefined' if macro is None else f'{macro:.3f}'}")
    log(f"done: {step} steps in {time.time() - t0:.0f} s, {skipped} non-finite batches skipped; "
        f"best valid zero-shot macro AUC {best if best > -math.inf else 'undefined'}; wrote {out / 'last.pt'}, {out / 'best.pt'}")
    log(f"next: python evaluate.py --ckpt {out / 'best.pt'}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    D.run_main(main)
