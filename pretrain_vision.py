"""
Stage 2a of GreenRFM: supervised pre-training of the 3D vision encoder.

A 3D ResNet-18 reads a CT volume and predicts the distilled labels (present / absent; uncertain and
not-mentioned entries are masked out of the loss). This "semantic-enforcing" supervision gives the
encoder a clinically meaningful feature space before it is aligned with text in align.py (stage 3).

Reads:  a data set: manifest.csv (+ dataset.json) in --data (default data/demo, built on first use);
        volumes from the preprocessed cache (`python data.py preprocess`) when it exists;
        labels from --labels, else out/distill/labels.csv when present (`python distill.py` writes it), else the
        manifest's own (the demo's: so the first command trains on them; it prints which it used).
Writes: <out>/last.pt and <out>/best.pt (self-describing checkpoints), <out>/metrics.jsonl
        (out/vision, or out/vision-lite with --lite).
Flags: the paper's defaults, under those the data set recommends (its dataset.json "train" entry for vision or
        vision-lite; the demo's are demo.DEMO_TRAIN), under the command line; the first line printed names them.

Examples:
  python pretrain_vision.py --lite                               # demo set on a laptop CPU, minutes
  python pretrain_vision.py --data ctrate/manifest.csv --amp bf16 --grad-ckpt     # one GPU
  torchrun --nproc_per_node 4 pretrain_vision.py --data ctrate/manifest.csv --amp bf16
"""
import torch

import checkpoints
import common
import data as D
import devices
import model as M
import volumes as V

STAGE = "vision"


def get_args():
    p = common.parser(__doc__, lr=1e-4, weight_decay=1e-4, clip=0.0)  # the paper's pre-training optimizer
    g = p.add_argument_group("model")
    g.add_argument("--lite", action="store_true", help="lite model: stride-4 patchify stem (the 6 GB configuration); writes out/vision-lite")
    g.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing per ResNet block and of the stem (less memory, ~30%% more compute)")
    g.add_argument("--init", default=None, help="optional external encoder weights (a state dict file) loaded before training")
    g.add_argument("--image-pooling", default="gap", choices=M.IMAGE_POOLINGS, help="how the feature map becomes label logits "
                   "(Fig. 4d): gap (the paper's), or max or noisy_or over each cell's class scores (model.EncoderClassifier); "
                   "align.py always pools by GAP")
    return common.parse(p, STAGE)


def main():
    args = get_args()
    run = devices.setup(args, STAGE)  # processes, device, precision, seed

    # -----------------------------------------------------------------------------
    # data: volumes and their labels (the reports are not read here)
    table, preset, cache = common.load_data(run, images=True, reports=False)
    train_ds = D.VolumeReportDataset(table.subset("train"), preset, train=args.random_crop, cache_dir=cache, seed=args.seed,
                                     uncertain=args.uncertain)
    valid_ds = D.VolumeReportDataset(table.subset("valid"), preset, train=False, cache_dir=cache, uncertain=args.uncertain)

    # -----------------------------------------------------------------------------
    # model: 3D ResNet-18 encoder + a linear head to the C labels
    model_config = {"kind": STAGE, "num_labels": len(table.label_names),
                    "vision": {"in_channels": V.input_channels(preset),  # one per intensity window of the preset
                               "stem": 4 if args.lite else 2, "widths": [64, 128, 256, 512]},
                    "image_pooling": args.image_pooling}
    model = M.build_model(model_config)
    # --image-pooling (Fig. 4d). Alignment (align.py) needs one embedding per volume and takes it by GAP. We read the
    # paper's "architectural consistency" as: pre-training (2a) should pool as alignment (3) will: only GAP, the recipe, does.
    if args.image_pooling == "noisy_or":  # P_c starts at 1/2 over this crop's cells, not saturated at 1
        torch.nn.init.constant_(model.head.bias, M.noisy_or_bias(model.encoder.cells(V.get_preset(preset)["crop"])))
    if args.init:
        load_init(model, args.init, run.log)
    model.encoder.grad_ckpt = args.grad_ckpt
    model.to(run.device)
    run.log(f"model: 3D ResNet-18, {model_config['vision']['in_channels']} input channel(s), stem {model_config['vision']['stem']}, "
            f"{args.image_pooling} pooling, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")

    # -----------------------------------------------------------------------------
    # optimizer (cosine schedule, stepped per iteration: common.optimizer_step), then resume if asked
    # fused: one kernel updates every tensor; the default per-tensor loop takes 7x longer on a CPU (100 ms a lite step).
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    train_model = common.start(run, model, opt, train_ds, model_config, table.label_names, extra={"preset": preset})

    def head_logits(b):  # (B, C): the head's logits for validation volumes, for the AUC at each epoch's end
        with run.autocast():
            return model(b["image"].to(run.device)).float()  # logits: a float32 sigmoid saturates, and AUC needs only the order

    # -----------------------------------------------------------------------------
    # training loop
    for epoch, batches in common.epochs(run, train_ds):
        for b, last_micro in batches:
            x = b["image"].to(run.device, non_blocking=True)  # (B, K windows, D, H, W)
            y, m = (b[k].to(run.device, non_blocking=True) for k in ("targets", "mask"))  # (B, C) each; m = 0: unknown
            with common.forward_context(run, last_micro):
                loss = M.masked_bce(train_model(x).float(), y, m)  # uncertain and unmentioned labels masked out
            common.backward(run, loss, b)  # a non-finite loss stops the run naming the batch (or is skipped)
            if last_micro:
                common.optimizer_step(run, loss)  # learning rate, clipping, step, log
        common.end_of_epoch(run, common.validate(run, valid_ds, head_logits, table.label_names))

    # -----------------------------------------------------------------------------
    # summary
    common.finish(run, "validation AUC per label (last epoch):")


def load_init(model, path, log):
    """--init: external encoder weights (e.g. converted from a video model), or the encoder of one of our vision
    checkpoints, loaded non-strictly but said aloud: the counts of missing and unexpected keys are printed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise D.DataError(f"{path}: not a readable state dict ({type(e).__name__})") from None
    if isinstance(state, dict) and "stage" in state:  # one of ours: a vision checkpoint's encoder, nothing else
        state = checkpoints.load_checkpoint(path, stage=STAGE)["model"]
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    try:
        missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong shapes, or not a dict of tensors
        raise D.DataError(f"{path}: does not fit the encoder ({str(e).strip().splitlines()[-1][:200]})") from None
    if not set(state) & set(model.encoder.state_dict()):
        raise D.DataError(f"{path}: none of its {len(state)} keys is an encoder weight (e.g. {list(state)[:2]})")
    log(f"init: {path} ({len(missing)} missing, {len(unexpected)} unexpected keys)")


if __name__ == "__main__":
    D.run_main(main)
