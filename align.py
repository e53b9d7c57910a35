"""
Stage 3 of GreenRFM: align the image and text encoders in one shared space.

Both pre-trained encoders (stages 2a and 2b) are loaded and trained together, end to end, with two kinds of
supervision:
  1. a contrastive (CLIP) loss on the raw dot products of image and report latents in a 768-d space,
     so that each volume scores its own report above the others of the batch;
  2. ONE linear classifier shared by image and text latents, trained with masked BCE on the labels,
     so that both modalities place each finding in the same direction of the shared space.
  loss = L_clip + (BCE(classifier(image latent)) + BCE(classifier(text latent))) / 2
No L2 normalisation anywhere (the paper found that keeping feature magnitude helps) and temperature 1.
After training, zero-shot diagnosis compares each volume with "There is {x}." / "There is no {x}.".
For short runs (the demo recommends both; the defaults are the paper's): --head-lr trains the new projections
and classifier faster than the pretrained encoders, and --init-shared heads starts them from the pre-trained heads.
The paper's ablations are switches of this script, each off in the recipe (--help names the figure): leave out the
vision or text pre-training or the shared classifier (Fig. 4a: --no-vision-pretraining, --no-text-pretraining,
--no-shared-classifier; all three: CLIP alone), L2-normalise the latents (Fig. 4e: --l2-norm), train in one stage
(Fig. 3e/f: --joint), or start both encoders from a CLIP-only run of this script: pre-training on the reports instead
of the labels (Fig. 4c: --encoders-from). --train-fraction (Fig. 3a) is every training stage's (2a, 2b, 3).

Reads:  a data set (default data/demo, built on first use); the pre-trained checkpoints
        out/vision[-lite]/best.pt and out/text/best.pt (a missing one is a warning: that encoder
        starts from its initialisation; on the default demo set it is trained first);
        labels from --labels, else out/distill/labels.csv when present (`python distill.py` writes it), else the
        manifest's own. The first command (`python align.py --lite`) never distils: it trains on the demo
        manifest's labels and says so; `python distill.py --backend rules` first makes every stage read distilled ones.
Writes: <out>/last.pt, <out>/best.pt, <out>/metrics.jsonl (out/align, or out/align-lite with --lite);
        prints the zero-shot AUC table of the validation split at the end.
Flags: the paper's defaults, under those the data set recommends (its dataset.json "train" entry for align or
        align-lite; the demo's are demo.DEMO_TRAIN: --head-lr 5e-4, --init-shared heads, 2 epochs, ...), under the
        command line; the first line printed names them.

Examples:
  python align.py --lite                                          # demo set on a laptop CPU, minutes
  python align.py --data ctrate/manifest.csv --amp bf16 --grad-ckpt             # one 24 GB GPU
  torchrun --nproc_per_node 4 align.py --data ctrate/manifest.csv --amp bf16
"""
import argparse
import subprocess
import sys
from pathlib import Path

import torch

import checkpoints
import common
import data as D
import devices
import metrics
import model as M
import volumes as V

STAGE = "align"
CXR_BERT = "microsoft/BiomedVLP-CXR-BERT-specialized"
HEADS_SCALE = 0.1  # --init-shared heads: a in M.init_shared_from_heads (image-text products start at a^2 x logits)


def get_args():
    p = common.parser(__doc__, lr=1e-5, weight_decay=0.0, clip=0.5)  # the paper's stage-3 optimizer
    g = p.add_argument_group("model")
    g.add_argument("--lite", action="store_true", help="the 6 GB configuration: stride-4 stem, text encoder checkpointed on a GPU, reads out/vision-lite, writes out/align-lite")
    g.add_argument("--vision-ckpt", default=None, help="pre-trained vision checkpoint, stage 2a (default out/vision[-lite]/best.pt; on the default demo set "
                                                     "trained first when missing)")
    g.add_argument("--text-ckpt", default="out/text/best.pt", help="pre-trained text checkpoint, stage 2b (on the default demo set trained first when missing)")
    g.add_argument("--text-model", default=None, help="text encoder used only when there is no text checkpoint (as in pretrain_text.py; Fig. 4b)")
    g.add_argument("--pooling", default="cls", choices=M.POOLINGS, help="report embedding, used only when there is no text checkpoint (as in pretrain_text.py)")
    g.add_argument("--max-len", type=int, default=512, help="maximum tokens per report")
    g.add_argument("--embed-dim", type=int, default=768, help="size of the shared latent space")
    g.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both encoders (less memory, more compute)")
    g.add_argument("--init-shared", default="random", choices=["random", "heads"],
                   help="how the projections and the shared classifier start: random (the paper's), or heads: from the "
                        "two pre-trained heads, so the classifier reads each latent with its head's weights and the mean of the "
                        "two heads' biases (needs both checkpoints)")
    g.add_argument("--head-lr", type=float, default=None,
                   help="peak learning rate of the layers this stage adds (the two projections and "
                        "the shared classifier); default: --lr, one rate for everything as in the paper")
    g.add_argument("--template", default="there_is", choices=sorted(M.PROMPT_TEMPLATES), help="prompt pair for the zero-shot validation AUC")
    on_off = argparse.BooleanOptionalAction
    g.add_argument("--vision-pretraining", action=on_off, default=True, help="the image encoder starts from stage 2a (--vision-ckpt); "
                   "--no-vision-pretraining: from random weights (supervision scope, Fig. 4a; with --no-text-pretraining: no pre-training signal, Fig. 4c)")
    g.add_argument("--text-pretraining", action=on_off, default=True, help="the text encoder starts from stage 2b (--text-ckpt); "
                   "--no-text-pretraining: from --text-model's own weights (Fig. 4a)")
    g.add_argument("--shared-classifier", action=on_off, default=True, help="the shared classifier and its two BCE terms; "
                   "--no-shared-classifier: the CLIP loss alone, no classifier (Fig. 4a; all three switches off: the CLIP-only baseline of Fig. 3a)")
    g.add_argument("--l2-norm", action="store_true", help="unit-length latents and CLIP's learnable temperature (from 0.07), "
                   "instead of raw dot products at temperature 1 (Fig. 4e)")
    g.add_argument("--joint", action="store_true", help="one stage, not two: both encoders from their initialisation (no "
                   "checkpoint read), each with its own head to the labels, whose BCE joins the loss (Fig. 3e/f)")
    g.add_argument("--encoders-from", default=None, help="both encoders from this aligned checkpoint instead of stages 2a and 2b: "
                   "given a run with Fig. 4a's three switches off, pre-training supervised by the reports, not labels (Fig. 4c)")
    args = common.parse(p, STAGE)
    if args.joint:  # the encoders are trained here from the start: no pre-trained checkpoint is read
        if args.encoders_from:
            raise D.UsageError("--joint trains both encoders from their initialisation: it reads no --encoders-from")
        args.vision_pretraining = args.text_pretraining = False
    args.vision_ckpt = Path(args.vision_ckpt or ("out/vision-lite/best.pt" if args.lite else "out/vision/best.pt"))
    return args


def main():
    args = get_args()
    run = devices.setup(args, STAGE)  # processes, device, precision, seed

    # -----------------------------------------------------------------------------
    # data: (volume, report, labels) triples
    table, preset, cache = common.load_data(run, images=True, reports=True)
    train_t = table.subset("train")
    train_ds = D.VolumeReportDataset(train_t, preset, train=args.random_crop, cache_dir=cache, seed=args.seed, uncertain=args.uncertain)
    valid_ds = D.VolumeReportDataset(table.subset("valid"), preset, train=False, cache_dir=cache, uncertain=args.uncertain)
    if args.data == D.DEMO_DIR and not args.encoders_from:  # the demo trains what it needs, as it builds its data: 2a, 2b first
        train_missing_pretrained(run)

    # -----------------------------------------------------------------------------
    # model: the two pre-trained encoders, a projection each into the shared space, one shared classifier
    vck = read_pretrained(args.vision_ckpt, "vision", table.label_names, run, preset)  # None when absent or switched off (said)
    tck = read_pretrained(args.text_ckpt, "text", table.label_names, run)
    vision_cfg = {"in_channels": V.input_channels(preset), "stem": 4 if args.lite else 2, "widths": [64, 128, 256, 512]}
    text_encoder = tokenizer = None
    if tck is None:  # start from a hub model (CXR-BERT) or a scratch BERT, as pretrain_text.py would
        source = args.text_model or D.dataset_defaults(args.data).get("text_model", CXR_BERT)
        text_encoder, tokenizer, _ = M.build_text(source, reports=train_t.reports, max_len=args.max_len, pooling=args.pooling)
    # The ablations that change the model (Fig. 4a, 4e, 3e/f), recorded in its model_config; the recipe's are the defaults
    switches = {"shared_classifier": args.shared_classifier, "l2_norm": args.l2_norm, "joint_heads": args.joint}
    model, model_config = M.greenrfm_from_pretrained(len(table.label_names), args.embed_dim, vck, tck, vision_cfg, text_encoder, switches)
    tokenizer = tokenizer or M.tokenizer_from_cfg(model_config["text"])
    if switches != M.ALIGN_SWITCHES:
        run.log(f"ablation, not the recipe: {', '.join(f'{k} {v}' for k, v in switches.items() if v != M.ALIGN_SWITCHES[k])}")
    if args.init_shared == "heads" and not all(ck is not None and "head.weight" in ck["model"] for ck in (vck, tck)):
        run.log("note: --init-shared heads needs both pre-trained checkpoints: the projections and classifier start random")
    elif args.init_shared == "heads":
        heads = [(ck["model"]["head.weight"], ck["model"]["head.bias"]) for ck in (vck, tck)]
        try:
            M.init_shared_from_heads(model, *heads, scale=HEADS_SCALE, seed=args.seed)
        except ValueError as e:
            raise D.UsageError(str(e)) from None
        run.log("shared space: projections and classifier start from the pre-trained heads (--init-shared heads)")
    model.vision.grad_ckpt = args.grad_ckpt
    # --lite must fit a 6 GB GPU: at 512 tokens the fp32 BERT alone keeps ~3 GiB of activations for the backward pass,
    # so on a GPU the lite configuration always recomputes its layers (exact: no BatchNorm in BERT; +17% FLOPs per lite
    # step). A CPU has no such wall: there it recomputes only when asked (--grad-ckpt), as the vision encoder does.
    if args.grad_ckpt or (args.lite and run.device.type == "cuda"):
        model.text.gradient_checkpointing_enable()
    model.to(run.device)
    run.log(f"model: ResNet-18 stem {model_config['vision']['stem']} + {model_config['text']['source']} -> {args.embed_dim}-d, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, all trained")

    # -----------------------------------------------------------------------------
    # optimizer: two parameter groups on one cosine curve (x lr_scale), then resume if asked.
    # The encoders arrive trained, while the projections and the shared classifier are new. Adam moves a weight by
    # about lr per step, so at the paper's 1e-5 a new layer needs the paper's ~23,000 steps to learn; --head-lr lets
    # a short run train the new layers faster without shaking the pretrained encoders.
    if args.lr <= 0 or (args.head_lr is not None and args.head_lr <= 0):
        raise D.UsageError(f"--lr {args.lr} / --head-lr {args.head_lr}: learning rates must be positive")
    head_scale = (args.head_lr or args.lr) / args.lr
    encoders = [p for n, p in model.named_parameters() if n.startswith(("vision.", "text."))]
    new_layers = [p for n, p in model.named_parameters() if not n.startswith(("vision.", "text."))]
    opt = torch.optim.AdamW([{"params": encoders, "lr_scale": 1.0}, {"params": new_layers, "lr_scale": head_scale}],
                            lr=args.lr, weight_decay=args.weight_decay, fused=True)
    run.log(f"learning rates: encoders {args.lr:g}, projections + classifier {args.lr * head_scale:g} (peak, cosine to "
            f"{args.min_lr:g}{f' x {head_scale:g}' if head_scale != 1 else ''})")
    train_model = common.start(run, model, opt, train_ds, model_config, table.label_names,
                               extra={"preset": preset, "data": common.data_record(args, table)})  # scan.py reads both

    # -----------------------------------------------------------------------------
    # training loop
    for epoch, batches in common.epochs(run, train_ds):
        for b, last_micro in batches:
            x = b["image"].to(run.device, non_blocking=True)  # (B, K windows, D, H, W)
            ids, att = common.tokenize(tokenizer, b["report"], args.max_len, run.device)  # (B, L) each
            y, m = (b[k].to(run.device, non_blocking=True) for k in ("targets", "mask"))  # (B, C) each; m = 0: unknown
            with common.forward_context(run, last_micro):
                # Latents (B, E) in the shared space, and the shared classifier's logits (B, C) for each:
                # one set of classifier weights reads both, which ties the two modalities together.
                # (--no-shared-classifier: logits None; --joint: + each encoder's own head's logits (B, C) in `heads`)
                img, txt, img_logits, txt_logits, *heads = train_model(x, ids, att)
                loss, parts = M.align_loss(img, txt, img_logits, txt_logits, y, m, M.clip_scale(model), heads)
            common.backward(run, loss, b)  # a non-finite loss stops the run naming the batch (or is skipped)
            if last_micro:
                common.optimizer_step(run, loss, parts)
        result = validate_zero_shot(run, model, tokenizer, valid_ds, table.label_names) if run.master and len(valid_ds) else {"macro_auc": None}
        common.end_of_epoch(run, result, "valid zero-shot macro AUC")

    # -----------------------------------------------------------------------------
    # summary: the zero-shot AUC table of the validation split (last epoch)
    common.finish(run, f"zero-shot AUC, validation split, prompts {M.PROMPT_TEMPLATES[args.template]}:", "valid zero-shot macro AUC")
    run.log(f"next: python evaluate.py --ckpt {run.out / 'best.pt'}")


def train_missing_pretrained(run):
    """On the default demo set a missing pre-trained checkpoint (at its default path) is trained first, by the very
    command the README teaches, into its usual folder; later runs and the stage scripts reuse it. With --data
    elsewhere a missing checkpoint stays a warning (read_pretrained): hours of training are never a side effect."""
    args = run.args
    jobs = [(args.vision_ckpt, Path("out/vision-lite/best.pt" if args.lite else "out/vision/best.pt"),
             ["pretrain_vision.py", *(["--lite"] if args.lite else [])], args.vision_pretraining),
            (Path(args.text_ckpt), Path("out/text/best.pt"), ["pretrain_text.py"], args.text_pretraining)]
    for path, default, cmd, wanted in jobs:
        if not wanted or path != default or path.exists():
            continue
        if run.ddp:  # one pre-training run under torchrun would need the processes to itself
            run.log(f"note: {path} is missing; under torchrun it is not trained here (run python {' '.join(cmd)} first)")
            continue
        if run.master:  # one after the other: each uses both cores; overlapped they only slowed each other down
            print(f"{path} is missing: training it first, as the README's recipe does\nrunning: python {' '.join(cmd)}", flush=True)
            done = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / cmd[0]), *cmd[1:]])
            if done.returncode:
                raise D.DataError(f"python {' '.join(cmd)} failed (exit code {done.returncode}); its output is above")
            print(f"back in align.py: {path} written", flush=True)


def read_pretrained(path, stage, label_names, run, preset=None):
    """A pre-trained checkpoint (stage 2a or 2b; --encoders-from's aligned one) that fits this run, or None: when there
    is none (a WARNING), or the pre-training is switched off (said)."""
    path, args = Path(path), run.args
    if not getattr(args, f"{stage}_pretraining"):  # Fig. 4a's scope, or --joint (Fig. 3e/f): said, not warned
        run.log(f"{stage} encoder: not pre-trained ({'--joint' if args.joint else f'--no-{stage}-pretraining'}), it starts from "
                f"{'random initialisation' if stage == 'vision' else 'its initialisation (--text-model)'}")
        return None
    if args.encoders_from:  # Fig. 4c: the encoders of an aligned (CLIP-only) run, pre-trained on the reports alone
        path = Path(args.encoders_from)
    elif not path.exists():
        script = "pretrain_vision.py" + (" --lite" if args.lite else "") if stage == "vision" else "pretrain_text.py"
        start = "random initialisation" if stage == "vision" else "its initialisation"
        run.log(f"WARNING: no {stage} checkpoint at {path}: the {'image' if stage == 'vision' else 'text'} encoder starts "
                f"from {start} (run {script} first for the full recipe)")
        return None
    ck = checkpoints.load_checkpoint(path, stage="align" if args.encoders_from else stage, label_names=label_names)
    if stage == "vision":  # the standard model needs a stem-2 encoder, --lite a stem-4 one
        stem, want = ck["model_config"]["vision"]["stem"], 4 if args.lite else 2
        if stem != want:
            raise D.UsageError(f"{path}: a stem-{stem} encoder, but {'--lite' if args.lite else 'the standard model'} "
                               f"needs stem {want}; pass the matching --vision-ckpt")
        V.require_channels(ck["model_config"]["vision"], preset, path)
    run.log(f"loaded {stage} encoder: {path} (pre-trained step {ck['step']}, valid macro AUC {ck['best_metric']})")
    if ck["model_config"].get("image_pooling", "gap") != "gap":  # pretrain_vision.py --image-pooling (Fig. 4d)
        run.log(f"note: it was pre-trained with {ck['model_config']['image_pooling']} pooling; alignment reads the encoder "
                f"by GAP (one embedding per volume): the mismatch Fig. 4d measures")
    return ck


@torch.no_grad()
def validate_zero_shot(run, model, tokenizer, valid_ds, label_names):
    """Zero-shot and shared-classifier AUC on the validation split (rank 0): align.py's own validation, where the
    pre-training stages call common.validate with their head's probabilities."""
    # Prompt latents depend only on the text encoder: computed once per evaluation, (C, 2, E).
    prompts = M.prompt_latents(model, tokenizer, label_names, M.PROMPT_TEMPLATES[run.args.template], run.args.max_len, run.device)

    def read(b):  # -> zero-shot logit, shared classifier logit (if there is one); (B, C) each. Logits, not their
        # sigmoids: a float32 sigmoid is exactly 1.0 beyond about 17, and raw dot products go far beyond (evaluate.py)
        with run.autocast():
            img = model.encode_image(b["image"].to(run.device)).float()  # (B, E)
        return M.zero_shot_logits(img, prompts), *(() if model.classifier is None else (model.classifier(img).float(),))
    refs, (zero_shot, *classifier) = common.predict(run, valid_ds, read)
    aucs, macro = metrics.per_label_auc(refs, zero_shot)
    return {"auc": dict(zip(label_names, aucs)), "macro_auc": macro,
            **{"classifier_macro_auc": metrics.per_label_auc(refs, c)[1] for c in classifier}}


if __name__ == "__main__":
    D.run_main(main)
