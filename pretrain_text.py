"""
Stage 2b of GreenRFM: supervised pre-training of the text encoder.

A BERT text encoder (CXR-BERT for real data) reads a report (findings + impression) and predicts the
distilled labels (uncertain and not-mentioned entries are masked out of the loss), so that its report
embedding already separates the findings before alignment in align.py (stage 3). It reads no volumes.

Reads:  a data set: manifest.csv (+ dataset.json) in --data (default data/demo, built on first use);
        labels from --labels, else out/distill/labels.csv when present (`python distill.py` writes it), else the
        manifest's own (the demo's: so the first command trains on them; it prints which it used).
Writes: <out>/last.pt and <out>/best.pt (self-describing checkpoints, tokenizer vocabulary included),
        <out>/metrics.jsonl (default out/text).
Flags: the paper's defaults, under those the data set recommends (its dataset.json "train" entry for text; the
        demo's are demo.DEMO_TRAIN), under the command line; the first line printed names them.

Examples:
  python pretrain_text.py                                        # demo set on a laptop CPU, a minute
  python pretrain_text.py --data ctrate/manifest.csv --amp bf16  # one GPU, CXR-BERT
  torchrun --nproc_per_node 4 pretrain_text.py --data ctrate/manifest.csv --amp bf16
"""
import numpy as np
import torch

import checkpoints
import common
import data as D
import devices
import model as M

STAGE = "text"
CXR_BERT = "microsoft/BiomedVLP-CXR-BERT-specialized"


def get_args():
    p = common.parser(__doc__, images=False, lr=1e-4, weight_decay=1e-4, clip=0.0, workers=0)  # the paper's; reports load cheaply
    g = p.add_argument_group("model")
    g.add_argument("--text-model", default=None, help=f"Hugging Face name or local folder of a BERT model, or 'scratch' (a small BERT with a "
                   f"vocabulary trained on the training reports); default: the data set's dataset.json, else {CXR_BERT}. "
                   f"The text encoder ablation (Fig. 4b): e.g. scratch, a general-English MiniLM folder, CXR-BERT")
    g.add_argument("--pooling", default="cls", choices=M.POOLINGS,
                   help="report embedding: 'cls' = the [CLS] token's (the paper's); 'sentence' = each sentence encoded alone, "
                        "token-averaged, then sentences averaged (prompts are single sentences; see model.TextEncoder); "
                        "'mean' = all tokens averaged (how sentence-transformers models such as MiniLM were trained)")
    g.add_argument("--max-len", type=int, default=512, help="maximum tokens per report (CT reports often exceed 128); longer ones are cut")
    g.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of the BERT layers")
    g.add_argument("--head-lr", type=float, default=None, help="peak learning rate of the linear head, which starts random while "
                   "a pretrained encoder does not; default: --lr, one rate for everything as in the paper")
    return common.parse(p, STAGE)


def main():
    args = get_args()
    run = devices.setup(args, STAGE)  # processes, device, precision, seed

    # -----------------------------------------------------------------------------
    # data: reports and their labels (no volumes)
    table, _, _ = common.load_data(run, images=False, reports=True)
    train_t = table.subset("train")
    train_ds = D.VolumeReportDataset(train_t, None, train=True, images=False, seed=args.seed, uncertain=args.uncertain)
    valid_ds = D.VolumeReportDataset(table.subset("valid"), None, train=False, images=False, uncertain=args.uncertain)

    # -----------------------------------------------------------------------------
    # model: BERT encoder ([CLS] or sentence-averaged embedding, --pooling) + a linear head to the C labels
    source = args.text_model or D.dataset_defaults(args.data).get("text_model", CXR_BERT)
    if args.resume and (args.out / "last.pt").exists():  # the same vocabulary and architecture as the run being resumed
        text_cfg = checkpoints.load_checkpoint(args.out / "last.pt", stage=STAGE, label_names=table.label_names)["model_config"]["text"]
        encoder, tokenizer = M.TextEncoder(text_cfg), M.tokenizer_from_cfg(text_cfg)
    else:  # "scratch" learns its WordPiece vocabulary from the training reports only (no peeking at valid)
        encoder, tokenizer, text_cfg = M.build_text(source, reports=train_t.reports, max_len=args.max_len, pooling=args.pooling)
    model_config = {"kind": STAGE, "num_labels": len(table.label_names), "text": text_cfg}
    model = M.EncoderClassifier(encoder, len(table.label_names))
    if args.grad_ckpt:
        model.encoder.gradient_checkpointing_enable()
    model.to(run.device)
    run.log(f"model: {source}, {text_cfg.get('pooling', 'cls')} pooling, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
            f"parameters, max {args.max_len} tokens")
    # How many reports does the token cap cut short? (the authors' 128 would cut most CT reports)
    lengths = [len(ids) for ids in tokenizer(list(train_t.reports), truncation=False)["input_ids"]]
    run.log(f"tokens per training report: median {int(np.median(lengths))}, {sum(n > args.max_len for n in lengths)} of "
            f"{len(lengths)} truncated at {args.max_len}")

    # -----------------------------------------------------------------------------
    # optimizer: the encoder at --lr, the new head at --head-lr (both on one cosine curve), then resume if asked
    if args.lr < 0 or (args.head_lr is not None and (args.head_lr <= 0 or args.lr <= 0)):
        raise D.UsageError(f"--lr {args.lr} / --head-lr {args.head_lr}: learning rates must be positive")
    head_scale = args.head_lr / args.lr if args.head_lr else 1.0  # (--lr 0 freezes everything: a test's check)
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr_scale": 1.0},
                             {"params": model.head.parameters(), "lr_scale": head_scale}],
                            lr=args.lr, weight_decay=args.weight_decay, fused=True)
    train_model = common.start(run, model, opt, train_ds, model_config, table.label_names)

    def head_logits(b):  # (B, C): the head's logits for validation reports, for the AUC at each epoch's end
        ids, att = common.tokenize(tokenizer, b["report"], args.max_len, run.device)
        with run.autocast():
            return model(ids, att).float()  # logits: a float32 sigmoid saturates, and AUC needs only the order

    # -----------------------------------------------------------------------------
    # training loop
    for epoch, batches in common.epochs(run, train_ds):
        for b, last_micro in batches:
            y, m = (b[k].to(run.device, non_blocking=True) for k in ("targets", "mask"))  # (B, C) each; m = 0: unknown
            ids, att = common.tokenize(tokenizer, b["report"], args.max_len, run.device)  # (B, L) each
            with common.forward_context(run, last_micro):
                logits = train_model(ids, att).float()  # (B, C): the head on each report's embedding
                loss = M.masked_bce(logits, y, m)
            common.backward(run, loss, b)
            if last_micro:
                common.optimizer_step(run, loss)
        common.end_of_epoch(run, common.validate(run, valid_ds, head_logits, table.label_names))

    # -----------------------------------------------------------------------------
    # summary
    common.finish(run, "validation AUC per label (last epoch):")


if __name__ == "__main__":
    D.run_main(main)
