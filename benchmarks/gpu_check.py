"""
The device check: what a GPU does with GreenRFM, measured in one prepared command of under 8 minutes.

A GPU is lent to this project rarely and for minutes, so everything is measured at once, each part within its own
time budget (BUDGET_S, 460 s in all), and written to a JSON file after every part (a run cut short keeps what it had):
  env          the card, driver, torch, CUDA and cuDNN versions
  correctness  one training step of each stage (vision 2a, text 2b, align 3) on the same weights and batch: the CPU in
               fp32 against the GPU in fp32 (TF32 off, and on as training runs), bf16 and fp16 (with a GradScaler);
               loss, gradient norm, gradient direction and the loss after the AdamW step, within stated tolerances.
               Also: the CPU-only Conv3x3x3 path is off on the GPU; the host synchronisations of one step and of
               the tokenisation of a batch
  memory       peak memory of an align.py step at paper scale (batch 10, 96 x 192 x 192, BERT-base built from its
               config, nothing downloaded), standard and lite, each without and with --amp bf16 --grad-ckpt: it must
               fit the card each is meant for (24, 8, 6, 4 GiB), shown next to bench.py's count as a ratio
  speed        samples/s of each stage at paper scale with the training flags (cuDNN benchmark, TF32); align.py with
               each flag off; the cost of one host sync per step; achieved TFLOP/s, efficiency, the paper's schedule
  loader       samples/s from the int16 cache with N workers against what the GPU consumes: which bounds an epoch
  scripts      the real scripts under torchrun (NCCL, every GPU), and a --resume that must give the same weights
  recipe       the bare first command, python align.py --lite, then python evaluate.py: wall time and AUCs
  compile      torch.compile on the lite align step: compile time and whether it is faster
--device cpu --tiny runs every part at toy size on the CPU (tests/test_gpu_check.py), so the check cannot rot between
the days a GPU is lent; the parts that need a GPU say "skip" with the reason. Verdicts: ok, FAIL, skip, info; the exit
code is 1 when any check FAILs.

On this workplace's lent GPUs nibabel and pydicom travel as wheels: the command is in docs/benchmarks.md.

Examples:
  python benchmarks/gpu_check.py                                   # on a CUDA machine: about 8 minutes
  python benchmarks/gpu_check.py --only env correctness            # some parts
  python benchmarks/gpu_check.py --device cpu --tiny               # the toy run of the test suite, under a minute
Figures and what they mean: docs/benchmarks.md.
"""
import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The GPU machines' image has torch and transformers but neither nibabel nor pydicom, and nothing can be fetched there:
# they travel as wheels (docs/benchmarks.md gives the command). Said in one line, not a traceback from data.py.
_missing = [m for m in ("nibabel", "pydicom", "transformers", "sklearn") if importlib.util.find_spec(m) is None]
if _missing:
    raise SystemExit(f"error: {', '.join(_missing)} not installed; the check imports the project (on a lent GPU: carry "
                     f"the wheels, docs/benchmarks.md#the-device-check-benchmarksgpu_checkpy)")
import data as D  # noqa: E402
import model as M  # noqa: E402
import volumes as V  # noqa: E402
from benchmarks import memcount  # noqa: E402

GiB = 2 ** 30
# Seconds per part on one GPU: 460 in all, and about 10 s of start-up, under the 8 minutes a lent device leaves for the
# check. Estimated from the CPU's times (the demo builds in 21 s on 2 cores, the bare first command takes 3:40-3:55
# there) and the FLOPs, not yet measured.
BUDGET_S = {"env": 5, "correctness": 30, "memory": 45, "speed": 90, "loader": 25, "scripts": 75, "recipe": 115,
            "compile": 75}
PAPER = dict(batch=10, crop=(96, 192, 192), tokens=512, bert=memcount.BERT_BASE, widths=(64, 128, 256, 512), labels=18,
             embed=768)
TINY_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
TINY = dict(batch=2, crop=(16, 32, 32), tokens=16, bert=TINY_BERT, widths=(8, 16, 32, 64), labels=4, embed=32)
# Correctness runs a reduced size on both sides: the CPU must do the fp32 reference in seconds.
CHECK = dict(PAPER, batch=4, crop=(32, 64, 64), tokens=64)
# Relative differences against the CPU's fp32 step (and the cosine of the two gradients) that pass. First estimates
# from each format's mantissa (fp32 24 bits, TF32 and fp16 11, bf16 8) over a few hundred accumulated operations;
# the JSON keeps every measured value, so the tolerances can be tightened once a card has been measured.
TOL = {"fp32": dict(loss=1e-4, norm=1e-3, cos=0.99999), "fp32 + TF32": dict(loss=1e-2, norm=3e-2, cos=0.999),
       "bf16": dict(loss=3e-2, norm=1e-1, cos=0.99), "fp16": dict(loss=1e-2, norm=5e-2, cos=0.999)}
# Dense bf16 / TF32 tensor-core peaks in TFLOP/s from the vendors' data sheets; the first name the card's contains wins.
PEAKS = [("H100 PCIe", 756, 378), ("H100 NVL", 835, 418), ("H100", 989, 494), ("H200", 989, 494), ("A100", 312, 156),
         ("L40S", 362, 181), ("RTX 4090", 165, 83), ("RTX 3090", 71, 36)]
CTRATE_TRAIN, EPOCHS, REF_3090 = 47149, 5, 71  # the paper's schedule: volumes, epochs per stage; RTX 3090 bf16 peak


# -----------------------------------------------------------------------------
# plumbing: rows, verdicts, parts within budgets, the JSON written after each part

def verdict(ok):
    return "ok" if ok else "FAIL"


def add(ctx, part, check, value, expect="", result="info"):
    """One row of the table: printed at once (a run cut short still shows it) and kept for the JSON."""
    row = {"part": part["name"], "check": check, "value": value, "expect": expect, "verdict": result}
    part["rows"].append(row)
    print(f"| {row['part']} | {check} | {value} | {expect} | {result} |", flush=True)


def left(ctx):
    return ctx.deadline - time.time()


def enough(ctx, part, what, need_s):
    """Whether need_s seconds remain in the part's budget; if not, a skip row says what was left out."""
    if left(ctx) >= need_s:
        return True
    add(ctx, part, what, f"not run: {left(ctx):.0f} s of the part's budget left, about {need_s} s needed", "", "skip")
    return False


def run_part(ctx, name, fn):
    budget = BUDGET_S[name] * ctx.budget_scale
    part = {"name": name, "budget_s": budget, "rows": []}
    ctx.report["parts"][name] = part
    t0 = time.time()
    ctx.deadline = t0 + budget
    try:
        fn(ctx, part)
    except Exception as e:  # one broken part must not cost the others: said in one row, the traceback on stderr
        traceback.print_exc()
        add(ctx, part, "error", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}",
            "", "FAIL")
    part["elapsed_s"] = round(time.time() - t0, 1)
    if part["elapsed_s"] > budget * 1.1:  # the budgets are estimates: an overrun is news, not a wrong result
        add(ctx, part, "time", f"{part['elapsed_s']:.0f} s: over its budget", f"<= {budget} s", "info")
    D.write_atomic(ctx.json_path, json.dumps(ctx.report, indent=1, default=str))
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def run_group(cmd, timeout, **kw):
    """subprocess.run with output captured, but a timeout kills the whole process group: torchrun's workers and the
    pre-training runs align.py starts would otherwise go on holding the GPU."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kw) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_flags(benchmark, tf32):
    """cuDNN benchmark mode and TF32 (convolutions and matmuls); devices.cuda_speed_flags sets both on for training."""
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


# -----------------------------------------------------------------------------
# the training step of each stage, as the scripts make it

def build(stage, size, stem=4, ckpt=False, dropout=True, pooling="cls"):
    """The model a stage trains: "vision" ResNet3D + head (pretrain_vision.py), "text" BERT + head (pretrain_text.py),
    "align" both + projections + shared classifier (align.py, which checkpoints BERT in the lite configuration).
    dropout=False: BERT without dropout, so that two devices, whose random streams differ, compute the same step."""
    bert = size["bert"] if dropout else {**size["bert"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    text = {"bert": bert, "pooling": pooling}
    if pooling == "sentence":  # a vocabulary with the tokens that end a sentence, the rest filler
        text["vocab"] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ":", ";"] + [
            f"w{i}" for i in range(bert["vocab_size"] - 8)]
    model = M.build_model({"kind": stage, "num_labels": size["labels"], "embed_dim": size["embed"], "text": text,
                           "vision": {"in_channels": 1, "stem": stem, "widths": list(size["widths"]), "grad_ckpt": ckpt}})
    if stage == "text" and ckpt:
        model.encoder.gradient_checkpointing_enable()
    if stage == "align" and (ckpt or stem == 4):
        model.text.gradient_checkpointing_enable()
    return model.train()


def batch_for(size, device="cpu", seed=0):
    """(B, 1, D, H, W) volume, token ids and mask (B, L), targets and mask (B, C); the same on every device."""
    torch.manual_seed(seed)
    b = memcount.make_batch(size["batch"], size["crop"], size["tokens"], size["labels"], size["bert"]["vocab_size"])
    return {k: v.to(device) for k, v in b.items()}


def stage_loss(stage, model, b, dtype):
    """The loss each script computes: masked BCE on the head's logits, or align.py's CLIP + shared-classifier loss,
    under autocast and with the losses in fp32."""
    with torch.autocast(b["x"].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        if stage == "vision":
            return M.masked_bce(model(b["x"]).float(), b["y"], b["m"])
        if stage == "text":
            return M.masked_bce(model(b["ids"], b["att"]).float(), b["y"], b["m"])
        img, txt, img_logits, txt_logits = model(b["x"], b["ids"], b["att"])
        return M.align_loss(img.float(), txt.float(), img_logits.float(), txt_logits.float(), b["y"], b["m"])[0]


CLIP = {"vision": 0.0, "text": 0.0, "align": 0.5}  # the scripts' --clip defaults


def train_step(stage, model, opt, scaler, b, dtype, host_sync=False, keep_grads=False):
    """One step in the order of common.backward and common.optimizer_step: scaled backward, unscale, clip (at
    infinity when the stage does not clip, to read the norm), GradScaler step and update. -> (loss, grad norm), both
    still on the device, and with keep_grads the unscaled gradients flattened (float64, CPU; else None).
    host_sync: read the loss's finiteness back, as common.backward does."""
    loss = stage_loss(stage, model, b, dtype)
    if host_sync:
        bool(torch.isfinite(loss))
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP[stage] or math.inf)
    grads = torch.cat([p.grad.double().flatten().cpu() for p in model.parameters() if p.grad is not None]) \
        if keep_grads else None
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), norm, grads


def optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, fused=True)  # as the scripts


def flops_per_sample(stage, size, stem, ckpt):
    """FLOPs of one forward + backward (with any recomputation) per sample, counted on fake tensors with the GPU's
    attention kernel, as bench.py counts them."""
    with FakeTensorMode(), memcount.gpu_kernels():
        model, b = build(stage, size, stem, ckpt), batch_for(size)
        with FlopCounterMode(display=False) as counter:
            stage_loss(stage, model, b, None).backward()
    return counter.get_total_flops() / size["batch"]


# -----------------------------------------------------------------------------
# env

def part_env(ctx, part):
    dev = ctx.device
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                        platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        smi = shutil.which("nvidia-smi")
        driver = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=10).stdout.split("\n")[0].strip() if smi else "unknown (no nvidia-smi)"
        info.update(card=p.name, gpus=torch.cuda.device_count(), memory_gib=round(p.total_memory / GiB, 1),
                    capability=f"{p.major}.{p.minor}", driver=driver, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
    ctx.report["env"] = info
    for k, v in info.items():
        add(ctx, part, k, v)
    if dev.type != "cuda":
        add(ctx, part, "GPU", "no GPU: this is the CPU toy run", "", "skip")


# -----------------------------------------------------------------------------
# correctness: the same step on the CPU in fp32 and on the device in each precision

def reference_step(stage, model, b, dtype, device, scaler):
    """loss, gradient norm, flattened gradient (float64, CPU) and the loss after one AdamW step. A fp16 GradScaler may
    find inf gradients at its first scale and skip the step (as in training): the step is retried at the lower scale."""
    model, b = model.to(device), {k: v.to(device) for k, v in b.items()}
    opt = optimizer(model)
    for _ in range(8):
        loss, norm, g = train_step(stage, model, opt, scaler, b, dtype, keep_grads=True)
        if torch.isfinite(norm) or not scaler.is_enabled():
            break
    with torch.no_grad():
        after = stage_loss(stage, model, b, dtype)
    return {"loss": loss.item(), "norm": norm.item(), "grad": g, "after": after.item()}


def compare(ref, got, tol):
    """-> ({loss, norm, after: relative differences; cos: of the two gradients}, passed)."""
    rel = lambda a, b: abs(a - b) / max(abs(a), 1e-12)  # noqa: E731
    d = {"loss": rel(ref["loss"], got["loss"]), "norm": rel(ref["norm"], got["norm"]),
         "after": rel(ref["after"], got["after"]),
         "cos": float(torch.nn.functional.cosine_similarity(ref["grad"], got["grad"], dim=0))}
    ok = d["loss"] <= tol["loss"] and d["after"] <= tol["loss"] and d["norm"] <= tol["norm"] and d["cos"] >= tol["cos"]
    return d, ok


def cpu_skip(device, stage, dtype, tf32):
    """Why a precision is not compared in the CPU toy run, or None."""
    if device.type != "cpu":
        return None
    if dtype == torch.float16:
        return "fp16 needs CUDA (the scripts run it in fp32 on a CPU)"
    if tf32 and dtype is None:
        return "TF32 exists on GPUs only"
    if dtype == torch.bfloat16 and stage != "text":  # found by this check's first toy run (docs/benchmarks.md)
        return ("bf16 Conv3d weight gradients came out wrong on a CPU (oneDNN; docs/benchmarks.md): the scripts run "
                "these stages in fp32 there")
    return None


def part_correctness(ctx, part):
    dev, size = ctx.device, TINY if ctx.tiny else CHECK
    b = batch_for(size)
    precisions = [("fp32", None, False), ("fp32 + TF32", None, True), ("bf16", torch.bfloat16, True),
                  ("fp16", torch.float16, True)]
    for stage in ("vision", "text", "align"):
        if not enough(ctx, part, f"{stage} step", 5):
            continue
        torch.manual_seed(0)
        model = build(stage, size, stem=2, dropout=False)  # standard stem: the larger maps
        set_flags(False, False)
        ref = reference_step(stage, copy.deepcopy(model), b, None, torch.device("cpu"),
                             torch.amp.GradScaler("cpu", enabled=False))
        for name, dtype, tf32 in precisions:
            why = cpu_skip(dev, stage, dtype, tf32)
            if why:
                add(ctx, part, f"{stage} step, {name} vs CPU fp32", why, "", "skip")
                continue
            set_flags(False, tf32)
            scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
            got = reference_step(stage, copy.deepcopy(model), b, dtype, dev, scaler)
            d, ok = compare(ref, got, TOL[name])
            t = TOL[name]
            add(ctx, part, f"{stage} step, {name} vs CPU fp32",
                f"loss {d['loss']:.1e}, grad norm {d['norm']:.1e}, after step {d['after']:.1e}, cos {d['cos']:.6f}",
                f"rel. <= {t['loss']:g} / {t['norm']:g} / {t['loss']:g}, cos >= {t['cos']}", verdict(ok))
            part.setdefault("data", {})[f"{stage} {name}"] = d
    set_flags(True, True)  # what training on a GPU runs with
    conv_path(ctx, part)
    host_syncs(ctx, part)


class OpLog(TorchDispatchMode):
    """Counts the aten ops a computation dispatches."""

    def __init__(self):
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def conv_path(ctx, part):
    """encoders.Conv3x3x3 computes tiny maps as a matrix product over unfolded patches on the CPU only. The lite encoder on
    the demo crop has a 1 x 2 x 2 last ResNet stage: on the CPU it must unfold, on a GPU never."""
    torch.manual_seed(0)
    enc = M.ResNet3D(1, stem=4, widths=list(TINY["widths"])).to(ctx.device)
    with OpLog() as log:
        enc(torch.randn(2, 1, *V.get_preset("demo")["crop"], device=ctx.device)).sum().backward()
    unfolds = log.ops.get("aten.unfold.default", 0)
    on_cpu = ctx.device.type == "cpu"
    add(ctx, part, "Conv3x3x3 im2col path", f"{unfolds} unfold ops in one lite step on the demo crop",
        "> 0 on a CPU" if on_cpu else "0 on a GPU", verdict(unfolds > 0 if on_cpu else unfolds == 0))


def synced_lines(fn):
    """Run fn() under torch.cuda.set_sync_debug_mode("warn"), which warns at every operation that makes the host wait
    for the GPU -> the "file:line" of each warning's Python caller (backward-pass ones name torch's autograd)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})


def host_syncs(ctx, part):
    """One align step, and the tokenisation of a batch, should make the host wait for the GPU nowhere in the project's
    code (transformers' own mask check, masking_utils.py, makes one per forward with cls pooling)."""
    if ctx.device.type != "cuda":
        add(ctx, part, "host syncs in one align step", "CUDA only (tests/test_model.py holds the CPU proxy)", "", "skip")
        return
    ours = lambda lines: [ln for ln in lines if (ROOT / ln.split(":")[0]).is_file()]  # noqa: E731  (model.py, common.py)
    for pooling in ("cls", "sentence"):
        torch.manual_seed(0)
        model = build("align", TINY, stem=4, pooling=pooling).to(ctx.device)
        opt, b = optimizer(model), batch_for(TINY, ctx.device)
        step = lambda: train_step("align", model, opt, torch.amp.GradScaler("cuda", enabled=False), b,  # noqa: E731
                                  torch.bfloat16)
        step()  # warm-up: first-call allocations are not what a training step does
        sync(ctx.device)
        where = synced_lines(step)
        add(ctx, part, f"host syncs in one align step ({pooling} pooling)", ", ".join(where) or "none",
            "none in the project's files", verdict(not ours(where)))
    # common.tokenize copies the token ids through pinned memory: a pageable copy would make the host wait
    import common  # (here, not at the top: common.py imports the whole training plumbing)
    tokenizer = M.tokenizer_from_cfg({"vocab": model.text.cfg["vocab"], "lowercase": True, "max_len": 64})
    where = synced_lines(lambda: common.tokenize(tokenizer, ["No pleural effusion.", "A small nodule."], 64, ctx.device))
    add(ctx, part, "host syncs of common.tokenize", ", ".join(where) or "none", "none", verdict(not where))


# -----------------------------------------------------------------------------
# memory: align.py at paper scale, counted and run

# (model, stem, --amp bf16, --grad-ckpt, the card it must fit in GiB: bench.py's targets)
MEMORY = [("standard", 2, False, False, 24), ("standard", 2, True, True, 8), ("lite", 4, False, False, 6),
          ("lite", 4, True, True, 4)]


def real_peak(stem, amp, ckpt, size, device):
    """Two real align steps (the first creates the AdamW state) -> peak allocated, peak reserved, and what the whole
    device has in use (CUDA context included), in bytes; None on out-of-memory."""
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = build("align", size, stem, ckpt).to(device)
    opt, b = optimizer(model), batch_for(size, device)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    try:
        for i in range(2):
            if i == 1:
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
            train_step("align", model, opt, scaler, b, torch.bfloat16 if amp else None)
        sync(device)
        free, total = torch.cuda.mem_get_info(device)
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device), total - free
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del model, opt, b


def part_memory(ctx, part):
    size = TINY if ctx.tiny else PAPER
    for name, stem, amp, ckpt, target in MEMORY:
        flags = " ".join(f for f, on in (("--amp bf16", amp), ("--grad-ckpt", ckpt)) if on) or "(default)"
        if not enough(ctx, part, f"{name} {flags}", 12):
            continue
        counted = memcount.count_step(lambda: build("align", size, stem, ckpt), lambda: batch_for(size), amp)["peak"]
        if ctx.device.type != "cuda":
            add(ctx, part, f"align {name} {flags}", f"counted {counted / GiB:.4f} GiB; real peak on a GPU only", "", "skip")
            continue
        set_flags(True, True)
        real = real_peak(stem, amp, ckpt, size, ctx.device)
        if real is None:
            add(ctx, part, f"align {name} {flags}", f"out of memory (counted {counted / GiB:.2f} GiB)", "", "FAIL")
            continue
        alloc, reserved, used = real
        part.setdefault("data", {})[f"{name} {flags}"] = dict(counted=counted, allocated=alloc, reserved=reserved,
                                                               device_used=used)
        # The verdict is the claim users rely on, that the step fits its card. Reserved and device-wide memory (CUDA
        # context, cuBLAS and cuDNN workspaces, the trial allocations of cuDNN's benchmark mode) are shown beside it.
        add(ctx, part, f"align {name} {flags}", f"allocated {alloc / GiB:.2f} GiB, reserved {reserved / GiB:.2f}, device "
            f"in use {used / GiB:.2f}; counted {counted / GiB:.2f} (allocated / counted {alloc / counted:.2f})",
            f"allocated <= {target} GiB", verdict(alloc <= target * GiB))


# -----------------------------------------------------------------------------
# speed: samples/s at paper scale

# (stage, model, stem, amp, --grad-ckpt, cuDNN benchmark, TF32, host sync per step): the training flags first.
SPEED = [("vision", "standard", 2, True, False, True, True, False),
         ("vision", "lite", 4, True, False, True, True, False),
         ("text", "BERT-base", 2, True, False, True, True, False),
         ("align", "standard", 2, True, False, True, True, False),
         ("align", "standard", 2, True, True, True, True, False),
         ("align", "lite", 4, True, False, True, True, False),
         ("align", "standard", 2, True, False, False, True, False),  # cuDNN benchmark off
         ("align", "standard", 2, False, False, True, True, False),  # fp32 with TF32
         ("align", "standard", 2, False, False, True, False, False),  # fp32 without
         ("align", "lite", 4, True, False, True, True, True)]  # one host read-back per step, as common.backward's


def peak_of(ctx):
    """(bf16, TF32) dense peak TFLOP/s of this card, or None."""
    if ctx.args.peak_tflops:
        return ctx.args.peak_tflops, ctx.args.peak_tflops / 2
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else ""
    return next(((bf, tf) for key, bf, tf in PEAKS if key in name), (None, None))


def time_steps(stage, model, b, amp, device, steps, host_sync=False, cap_s=15.0):
    """Median seconds per training step after two warm-up steps (cuDNN benchmark mode times its algorithms in the
    first); at most `steps` timed steps or cap_s seconds."""
    opt, scaler = optimizer(model), torch.amp.GradScaler(device.type, enabled=False)
    times, t_start = [], time.time()
    for i in range(steps + 2):
        sync(device)
        t0 = time.perf_counter()
        train_step(stage, model, opt, scaler, b, torch.bfloat16 if amp else None, host_sync)
        sync(device)
        times.append(time.perf_counter() - t0)
        if i >= 2 and time.time() - t_start > cap_s:
            break
    return float(np.median(times[2:] if len(times) > 2 else times))


def part_speed(ctx, part):
    size = TINY if ctx.tiny else PAPER
    peaks, flops = peak_of(ctx), {}
    for row in SPEED:
        stage, name, stem, amp, ckpt, bench, tf32, hsync = row
        flags = " ".join(f for f, on in (("--amp bf16", amp), ("--grad-ckpt", ckpt), ("cuDNN benchmark off", not bench),
                                         ("TF32 off", not tf32), ("+ one host sync per step", hsync)) if on) or "fp32"
        what = f"{stage} {name} {flags}"
        if not enough(ctx, part, what, 4 if ctx.tiny else 12):
            continue
        try:  # one row that fails (out of memory, a kernel missing) must not cost the others and the schedule
            speed_row(ctx, part, what, size, flops, peaks, row)
        except Exception as e:
            add(ctx, part, what, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}", "", "FAIL")
        finally:
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    set_flags(True, True)
    schedule(ctx, part, flops, peaks[0])


def speed_row(ctx, part, what, size, flops, peaks, row):
    """samples/s of one configuration, its TFLOP/s and share of the card's peak; kept for the loader and compile parts."""
    stage, name, stem, amp, ckpt, bench, tf32, hsync = row
    dev, key = ctx.device, (stage, stem, ckpt)
    if key not in flops:
        flops[key] = flops_per_sample(stage, size, stem, ckpt)
    set_flags(bench, tf32)
    torch.manual_seed(0)
    model = build(stage, size, stem, ckpt).to(dev)
    rate = size["batch"] / time_steps(stage, model, batch_for(size, dev), amp, dev, 1 if ctx.tiny else 5, hsync)
    tflops = rate * flops[key] / 1e12
    peak = (peaks[0] if amp else peaks[1] if tf32 else None) if dev.type == "cuda" else None
    eff = f", {tflops / peak:.0%} of the {peak:g} TFLOP/s {'bf16' if amp else 'TF32'} peak" if peak else ""
    ctx.rates[what] = rate
    part.setdefault("data", {})[what] = dict(samples_per_s=rate, tflops=tflops, gflop_per_sample=flops[key] / 1e9,
                                              efficiency=tflops / peak if peak else None)
    add(ctx, part, what, f"{rate:.2f} samples/s, {tflops:.1f} TFLOP/s{eff}")


def schedule(ctx, part, flops, peak):
    """The paper's recipe on CT-RATE (47,149 volumes, 5 epochs per stage) at the measured rates of the standard model
    with --amp bf16, and the efficiency that replaces bench.py's assumed 30% for a 24 GB-class card."""
    d = ctx.report["parts"]["speed"].get("data", {})
    keys = {"vision 2a": "vision standard --amp bf16", "text 2b": "text BERT-base --amp bf16",
            "align 3": "align standard --amp bf16"}
    if ctx.device.type != "cuda" or not all(k in d for k in keys.values()):
        add(ctx, part, "CT-RATE schedule", "measured on a GPU only", "", "skip")
        return
    hours = {s: CTRATE_TRAIN * EPOCHS / d[k]["samples_per_s"] / 3600 for s, k in keys.items()}
    add(ctx, part, "CT-RATE schedule on this card, standard --amp bf16",
        ", ".join(f"{s} {h:.1f} h" for s, h in hours.items()) + f"; total {sum(hours.values()):.1f} GPU-hours", "paper 24")
    if peak:
        tflop = {s: d[k]["gflop_per_sample"] / 1e3 * CTRATE_TRAIN * EPOCHS for s, k in keys.items()}
        eff = sum(tflop.values()) / (sum(hours.values()) * 3600) / peak  # the whole schedule's achieved share of peak
        ctx.report["efficiency"] = eff
        add(ctx, part, "measured efficiency (whole schedule)", f"{eff:.0%} of peak; at it an RTX 3090 ({REF_3090} "
            f"TFLOP/s) would take {sum(tflop.values()) / (REF_3090 * eff) / 3600:.1f} GPU-hours (a bound: a smaller "
            f"card is usually kept busier by batch 10)", "bench.py assumed 30%")


# -----------------------------------------------------------------------------
# loader: int16 cache -> batches, against what the GPU consumes

def part_loader(ctx, part):
    preset = "demo" if ctx.tiny else "chest"
    shape, n = V.get_preset(preset)["size"], 8 if ctx.tiny else 40
    cache = ctx.work / f"loader-cache-{preset}"
    D.check_cache(cache, preset, create=True)
    rng = np.random.default_rng(0)
    for i in range(n):  # cached volumes as data.py stores them: int16 HU (D, H, W)
        if not D.cache_file(cache, f"v{i}").is_file():
            np.save(D.cache_file(cache, f"v{i}"), rng.integers(-1000, 400, size=shape, dtype=np.int16))
    table = D.Table([f"v{i}" for i in range(n)], [str(cache / "none.nii.gz")] * n, [""] * n, ["train"] * n, ["A"],
                    np.zeros((n, 1), np.float32), [{}] * n)
    ds = D.VolumeReportDataset(table, preset, train=True, cache_dir=cache)
    mb = D.cache_file(cache, "v0").stat().st_size / 1e6
    workers = [0, 2] if ctx.tiny else [w for w in (2, 4, 8, 16) if w <= (os.cpu_count() or 2)]
    rates = {}
    for w in workers:
        if not enough(ctx, part, f"{w} workers", 3 if ctx.tiny else 6):
            continue
        # One long epoch of random draws: every worker stays busy (a short epoch would restart the pipeline every few
        # batches and cap the rate at the batches per epoch), stopped after a few seconds.
        bs = TINY["batch"] if ctx.tiny else 10
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=bs * 1000)
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=w, drop_last=True,
                                             pin_memory=ctx.device.type == "cuda")
        seen, t0 = 0, None
        for bt in loader:
            x = bt["image"].to(ctx.device, non_blocking=True)
            if t0 is None:  # the workers' start-up is not throughput
                t0 = time.time()
                continue
            seen += len(x)
            if time.time() - t0 > (1 if ctx.tiny else 4):
                break
        sync(ctx.device)
        del loader
        rates[w] = seen / (time.time() - t0)
        add(ctx, part, f"{w} workers", f"{rates[w]:.0f} samples/s (page cache warm), {rates[w] * mb:.0f} MB/s of cache")
    part["data"] = {"samples_per_s": rates, "mb_per_volume": mb}
    need = {k: v for k, v in ctx.rates.items() if "host sync" not in k and "off" not in k}
    if not rates or not need:
        add(ctx, part, "which bounds an epoch", "needs the speed part's rates", "", "skip")
        return
    what, gpu = max(need.items(), key=lambda kv: kv[1])  # the fastest consumer is the hardest to feed
    w2 = rates.get(2, max(rates.values()))
    best_w, best = max(rates.items(), key=lambda kv: kv[1])
    bound = "the loader" if w2 < gpu else "the GPU"
    add(ctx, part, "which bounds an epoch", f"{bound} at --workers 2 ({w2:.0f} loaded vs {gpu:.0f} consumed by {what}); "
        f"best {best:.0f} with {best_w} workers; CT-RATE's cache is {CTRATE_TRAIN * mb / 1e3:.0f} GB, beyond any page "
        f"cache: the disk must read {gpu * mb:.0f} MB/s")


# -----------------------------------------------------------------------------
# the scripts: torchrun, --resume, and the whole demo recipe

def script(ctx, args, cwd, what, part, launcher=None):
    """A project script in a subprocess, within what is left of the part's budget -> CompletedProcess or None."""
    cmd = [*(launcher or [sys.executable]), str(ROOT / args[0]), *args[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if ctx.tiny else {})}
    t0 = time.time()
    try:
        r = run_group(cmd, max(left(ctx), 1), cwd=cwd, env=env)
    except subprocess.TimeoutExpired:
        add(ctx, part, what, f"not finished within the part's budget ({time.time() - t0:.0f} s)", "", "FAIL")
        return None
    r.seconds = time.time() - t0
    if r.returncode:
        tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or [""]
        add(ctx, part, what, f"exit code {r.returncode}: {tail[0][:200]}", "exit 0", "FAIL")
        return None
    return r


def small_demo(ctx, part):
    """A small demo set (32 train / 8 valid / 8 test) built by demo.py, once."""
    d = ctx.work / "small-demo"
    if not (d / "manifest.csv").is_file():
        script(ctx, ["demo.py", "--out", str(d), "--n-train", "32", "--n-valid", "8", "--n-test", "8"], ctx.work,
               "demo.py (small set)", part)
    return d


def part_scripts(ctx, part):
    data, cuda = small_demo(ctx, part), ctx.device.type == "cuda"
    nproc = torch.cuda.device_count() if cuda else 1
    backend = "nccl" if cuda else "gloo"
    # torchrun as this interpreter's module (the image's venv need not be on PATH); --grad-ckpt: on GPUs SyncBatchNorm
    # then also exchanges statistics in the backward pass's recomputation.
    what = f"torchrun, {nproc} process(es), align.py --lite --grad-ckpt"
    r = script(ctx, ["align.py", "--lite", "--data", str(data), "--out", str(ctx.work / "ddp"), "--max-steps", "3",
                     "--batch-size", str(2 * nproc), "--workers", "0", "--log-every", "1", "--grad-ckpt",
                     *(["--amp", "bf16"] if cuda else [])], ctx.work, what, part,
               launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)])
    if r:
        logged = f"backend {backend}" in r.stdout
        add(ctx, part, what, f"{r.seconds:.0f} s; 'backend {backend}' {'logged' if logged else 'NOT logged'}",
            f"3 steps on {backend}", verdict(logged and "done: 3 steps" in r.stdout))
    # --resume must continue exactly: fp16 on a GPU (the GradScaler's state and the CUDA RNG must come back), fp32 here
    amp = ["--amp", "fp16"] if cuda else []
    base = ["pretrain_text.py", "--data", str(data), "--batch-size", "4", "--workers", "0", "--max-len", "64", *amp]
    full = script(ctx, [*base, "--out", str(ctx.work / "full"), "--max-steps", "4"], ctx.work, "pretrain_text full", part)
    cut = full and script(ctx, [*base, "--out", str(ctx.work / "cut"), "--max-steps", "2", "--save-every", "1"], ctx.work,
                          "pretrain_text cut at step 2", part)
    again = cut and script(ctx, [*base, "--out", str(ctx.work / "cut"), "--max-steps", "4", "--resume"], ctx.work,
                           "pretrain_text --resume", part)
    if again:
        a, b = (torch.load(ctx.work / f / "last.pt", map_location="cpu", weights_only=True) for f in ("full", "cut"))
        diff = max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in a["model"])
        scale = [ck["extra"].get("scaler", {}).get("scale") for ck in (a, b)]
        ok = diff <= (1e-6 if cuda else 0) and scale[0] == scale[1]
        add(ctx, part, f"--resume {'fp16 ' if cuda else ''}= uninterrupted", f"max |weight diff| {diff:.1e}; loss scale "
            f"{scale[0]} vs {scale[1]}", "0 on a CPU; <= 1e-6 on a GPU", verdict(ok))


def part_recipe(ctx, part):
    """On a GPU the bare first command, in a fresh folder (it builds the demo set and trains stages 2a and 2b first);
    on the CPU its toy version on the small set. Then evaluate.py on the test split."""
    work = ctx.work / "recipe"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    toy = ["--data", str(small_demo(ctx, part)), "--epochs", "1", "--batch-size", "4", "--workers", "0"] if ctx.tiny else []
    r = script(ctx, ["align.py", "--lite", *toy], work, "python align.py --lite", part)
    if not r:
        return
    jsonl = [json.loads(ln) for ln in (work / "out/align-lite/metrics.jsonl").read_text().splitlines()]
    valid = max((h["macro_auc"] for h in jsonl if h.get("macro_auc") is not None), default=None)
    add(ctx, part, "python align.py --lite", f"{r.seconds:.0f} s, best validation zero-shot AUC {valid}",
        "CPU, 2 cores: 3:55 and 0.970" if not ctx.tiny else "")
    toy = ["--data", str(small_demo(ctx, part))] if ctx.tiny else []
    e = script(ctx, ["evaluate.py", *toy], work, "python evaluate.py", part)
    if e:
        s = json.loads((work / "out/eval/summary.json").read_text())
        add(ctx, part, "python evaluate.py", f"{e.seconds:.0f} s, test zero-shot AUC {s['macro']['auc']}",
            "CPU: 0.947" if not ctx.tiny else "")


def part_compile(ctx, part):
    """torch.compile on the lite align step at paper scale, in a subprocess: a compilation that runs long is stopped at
    the part's budget instead of holding up the whole check."""
    if ctx.device.type != "cuda":
        add(ctx, part, "torch.compile", "measured on a GPU only (on a CPU, inductor compiles C++ for minutes)", "", "skip")
        return
    t0 = time.time()
    try:
        r = run_group([sys.executable, __file__, "--compile-probe", "--device", str(ctx.device)], max(left(ctx), 1))
    except subprocess.TimeoutExpired:
        add(ctx, part, "align lite --amp bf16 compiled", f"not compiled within {time.time() - t0:.0f} s", "", "info")
        return
    if r.returncode:
        add(ctx, part, "torch.compile", f"failed: {(r.stderr.strip().splitlines() or [''])[-1][:200]}", "", "FAIL")
        return
    got = json.loads(r.stdout.strip().splitlines()[-1])
    eager = ctx.rates.get("align lite --amp bf16")
    part["data"] = dict(got, eager=eager)
    gain = f"{got['samples_per_s'] / eager:.2f}x eager ({eager:.2f})" if eager else "eager rate not measured"
    add(ctx, part, "align lite --amp bf16 compiled", f"first step (compiling) {got['first_s']:.0f} s; then "
        f"{got['samples_per_s']:.2f} samples/s, {gain}", "worth --compile when >= 1.05x")


def compile_probe(device):
    """--compile-probe: the compiled lite align step -> one JSON line {first_s, samples_per_s}."""
    set_flags(True, True)
    torch.manual_seed(0)
    model = build("align", PAPER, 4, False).to(device)
    compiled, b = torch.compile(model), batch_for(PAPER, device)
    t0 = time.time()
    train_step("align", compiled, optimizer(model), torch.amp.GradScaler("cuda", enabled=False), b, torch.bfloat16)
    sync(device)
    first = time.time() - t0
    rate = PAPER["batch"] / time_steps("align", compiled, b, True, device, 5)
    print(json.dumps({"first_s": first, "samples_per_s": rate}))


PARTS = {"env": part_env, "correctness": part_correctness, "memory": part_memory, "speed": part_speed,
         "loader": part_loader, "scripts": part_scripts, "recipe": part_recipe, "compile": part_compile}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=D.HelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda, cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="toy sizes everywhere: the CPU run of the test suite")
    p.add_argument("--only", nargs="+", choices=list(PARTS), help="run only these parts (default: all, in this order)")
    p.add_argument("--work", default="out/gpu_check", help="scratch folder: caches, data sets, checkpoints of the runs")
    p.add_argument("--out", default=None, help="the JSON report (default: <work>/gpu_check.json)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not in the table")
    p.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)  # the compile part's subprocess
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}, but torch {torch.__version__} sees no CUDA GPU")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("error: without a GPU the check runs at toy size only: add --tiny (paper scale on a CPU takes "
                         "hours; bench.py counts its memory and FLOPs)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.compile_probe:
        return compile_probe(device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # The budgets are a GPU's; the toy run on a shared CPU gets 4x each, so that a loaded machine never cuts it short.
    ctx = SimpleNamespace(args=args, device=device, tiny=args.tiny, work=work.resolve(), rates={}, deadline=0.0,
                          budget_scale=4 if args.tiny else 1,
                          json_path=Path(args.out or work / "gpu_check.json"),
                          report={"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(device),
                                  "tiny": args.tiny, "budgets_s": BUDGET_S, "parts": {}})
    ctx.json_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"# GreenRFM device check on {device}{' (toy sizes)' if args.tiny else ''}; budgets {BUDGET_S} s\n")
    print("| part | check | value | expected | verdict |\n| --- | --- | --- | --- | --- |", flush=True)
    t0 = time.time()
    for name in [n for n in PARTS if n in (args.only or PARTS)]:  # in PARTS' order: loader reads speed's rates
        run_part(ctx, name, PARTS[name])
    rows = [r for part in ctx.report["parts"].values() for r in part["rows"]]
    failed = [f"{r['part']}: {r['check']}" for r in rows if r["verdict"] == "FAIL"]
    ctx.report["seconds"] = round(time.time() - t0)
    D.write_atomic(ctx.json_path, json.dumps(ctx.report, indent=1, default=str))
    print(f"\ndevice check: {len(rows)} rows, {len(failed)} FAIL{': ' + '; '.join(failed) if failed else ''}; "
          f"{ctx.report['seconds']} s; wrote {ctx.json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
