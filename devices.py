"""Processes, devices and precision for the training scripts: what depends on where a run executes, kept apart from
the training plumbing of common.py, which is the same everywhere.

    setup               torchrun processes (NCCL on GPUs, gloo on CPUs), device, autocast and GradScaler, seed -> `run`,
                        the plain namespace common.py's functions read and update
    cuda_speed_flags    GPU training: cuDNN benchmark mode and TF32 matmuls
    keep_freed_memory   CPU training on Linux: glibc keeps freed blocks instead of page-faulting them in every step
    sync_batchnorm      under torchrun on GPUs, BatchNorm statistics over every process's samples
    random_and_scale, restore_random_and_scale   the RNG states and the fp16 loss scale an exact --resume needs
"""
import ctypes
import os
from contextlib import nullcontext
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data as D


def setup(args, stage):
    """Processes, device, precision and seed of a training run -> `run`, the one plain namespace (a SimpleNamespace)
    that a stage script and common.py's functions share. Every field it ever holds, and where each is set:

    here, once:
      args, stage, out      the parsed flags, "vision" / "text" / "align", the output folder (args.out)
      ddp, rank, world      launched by torchrun?, this process's rank, the number of processes
      master, device        rank 0 (it validates, saves and prints), the torch.device this process computes on
      log                   print on rank 0, silent on the others
      autocast, scaler      autocast() -> a context manager (--amp, or nullcontext); the GradScaler (fp16 only)
      micro                 samples per forward pass on one process: --batch-size / (world x --accum)
    common.start (between building the model and its first step):
      model, opt            the plain module (unwrapped) and its optimizer
      model_config, label_names, extra   what every checkpoint records (extra: the stage's own keys)
      train_model           the module the loop calls: model, wrapped by DDP and/or torch.compile
      sampler, steps_per_epoch, total_steps   the training split's shuffle (a shard per process) and step counts
      step, epoch           optimizer steps done, the current epoch (common.epochs advances it)
      best, history, metrics   best validation metric (-inf before any), log and epoch records (metrics.jsonl),
                            the last validation's result (common.end_of_epoch sets it; common.finish prints it)
      seen, skipped, dropped, saved   training samples so far, non-finite batches skipped, whether this step's
                            batch was one of them, the buffers kept to undo it (common.forward_context, backward)
      t0                    the training loop's start time
    common.resume (--resume) sets step, best and history again from <out>/last.pt; nothing else adds a field."""
    # Launched by torchrun (it sets both), even with one process: `--nproc_per_node 1` then runs the DDP path, so one
    # GPU can exercise it. One process per GPU (or per CPU slot with gloo). Rank 0 validates alone while the others
    # wait at a barrier: NCCL's default 10-minute timeout would end a long CT-RATE validation, so 2 hours.
    ddp = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu")
    else:
        rank, world = 0, 1
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        cuda_speed_flags()
    else:
        keep_freed_memory()
    log = print if rank == 0 else (lambda *a, **k: None)
    # bf16 autocast works on CPU and GPU; fp16 needs CUDA and a GradScaler against underflow.
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if amp_dtype == torch.float16 and device.type != "cuda":
        log("note: --amp fp16 needs CUDA; running in fp32")
        amp_dtype = None
    # bf16 Conv3d on a CPU has no fast kernel (about 25x slower than fp32) and, in torch 2.13 (oneDNN 3.12) on AVX-512
    # CPUs, gives wrong weight gradients for maps two voxels deep (found by benchmarks/gpu_check.py; docs/benchmarks.md
    # says which kernels). So the stages with 3D convolutions train in fp32 on a CPU; the text stage (BERT alone) keeps
    # bf16.
    if amp_dtype == torch.bfloat16 and device.type != "cuda" and stage != "text":
        log("note: --amp bf16 on a CPU: its 3D convolutions are slow and their weight gradients unreliable; running in fp32")
        amp_dtype = None
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    if args.batch_size % (world * args.accum):
        raise D.UsageError(f"--batch-size {args.batch_size} is not divisible by processes x --accum = {world * args.accum}")
    return SimpleNamespace(
        args=args, stage=stage, out=args.out, ddp=ddp, rank=rank, world=world, master=rank == 0, device=device, log=log,
        autocast=(lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext,
        scaler=torch.amp.GradScaler(enabled=amp_dtype == torch.float16),
        micro=args.batch_size // (world * args.accum))  # samples per forward pass on one process


def cuda_speed_flags():
    """Training on a GPU: every batch has the preset's crop size, so cuDNN may time its 3D convolution algorithms once
    and keep the fastest (benchmark mode; off by default); fp32 matmuls (BERT, the projections) may use TF32 on Ampere
    and later, as fp32 convolutions already do by default. Both trade bit-exactness between runs for speed; evaluation
    and scan.py turn TF32 off instead (checkpoints.exact_fp32)."""
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")


def keep_freed_memory():
    """CPU runs on Linux: glibc hands large freed blocks back to the kernel, so each step page-faults its buffers in
    again. Kept in the process instead, a lite vision step runs 12-25 % faster, numerics unchanged (docs/speed-demo.md).
    The same as setting MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ in the environment."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to tune
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MB come from the heap, not from fresh mappings
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: give the heap's free top back to the system only beyond 1 GB


def sync_batchnorm(model):
    """Under torchrun on GPUs each process's BatchNorm would see only batch/world samples, not the paper's single-GPU
    batch of 10: SyncBatchNorm takes the statistics over every process's samples. The model's BatchNorm layers are
    replaced in place by SyncBatchNorm layers holding the same Parameter and buffer objects, so the optimizer built
    before keeps working and the state_dict keys are unchanged (tests/test_stages.py) -> how many were converted."""
    n = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the top module is no BatchNorm: changed in place
    return n


def random_and_scale(run):
    """The state an exact --resume needs beyond weights and optimizer -> a dict for the checkpoint's extra: the global
    CPU RNG (dropout in a CPU run); on a GPU the device's RNG too (BERT's dropout draws from it there); and under --amp
    fp16 the GradScaler's loss scale and growth count (else a resumed run starts again at 65536 and skips steps
    until it has found its scale again)."""
    state = {"rng": torch.get_rng_state()}
    if run.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(run.device)
    if run.scaler.is_enabled():
        state["scaler"] = run.scaler.state_dict()
    return state


def restore_random_and_scale(run, extra):
    """The inverse of random_and_scale, for what this run has: a CPU run ignores a saved GPU RNG state, and a run
    without fp16 a saved loss scale (checkpoints saved before either was kept have neither)."""
    torch.set_rng_state(extra["rng"])
    if "cuda_rng" in extra and run.device.type == "cuda":
        torch.cuda.set_rng_state(extra["cuda_rng"], run.device)
    if "scaler" in extra and run.scaler.is_enabled():
        run.scaler.load_state_dict(extra["scaler"])
