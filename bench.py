"""
Speed and memory of GreenRFM at paper scale: does the recipe fit a 24 GB / 6 GB / 8 GB card, how many
FLOPs is it, how fast is preprocessing, and how long would the paper's schedule take?

Four sections, each printed as a table (--only picks some):
  memory      peak training memory of align.py (the largest stage) at batch 10, crop 96 x 192 x 192, a
              BERT-base text encoder (CXR-BERT's size, random weights) and AdamW, for the standard and the
              lite model, each with and without --amp bf16 and --grad-ckpt. On a CPU the step runs under
              FakeTensorMode (shapes and dtypes only, no real memory) and every tensor storage an op creates
              is counted until it is freed: weights, gradients, AdamW state, the activations kept for the
              backward pass, transients. On a GPU it is also run for real (torch.cuda.max_memory_allocated).
  flops       FLOPs per training sample (torch.utils.flop_counter: matmuls, convolutions, attention; forward,
              backward and the recomputation of --grad-ckpt), and measured samples/s on this machine.
  preprocess  a CT-RATE-sized volume (512 x 512 x 300 int16, 0.7 x 0.7 x 1 mm, .nii.gz, generated here) to the
              cached tensor with volumes.py, against MONAI's transform chain on the same file (one core each);
              then random training crops read from the cache, per core.
  schedule    the paper's recipe on CT-RATE (47,149 volumes; vision, text, alignment, 5 epochs each) on a
              24 GB-class GPU, estimated from the FLOPs and a stated efficiency, next to the paper's 24 GPU-hours.

MONAI is needed only for the comparison (`pip install monai`; not in requirements.txt); without it that row
is skipped with a one-line message.

Examples:
  python bench.py                          # everything, CPU, about 5-8 minutes on 2 cores
  python bench.py --only memory            # the memory counts alone, about a minute
  python bench.py --device cuda            # on a GPU: real peak memory, samples/s and TFLOP/s at paper scale
"""
import argparse
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import data as D
import volumes as V
from benchmarks.memcount import build, count_step, forward_loss, gpu_kernels, make_batch, optimizer_step

GiB = 2 ** 30
# (name, stem, --amp bf16, --grad-ckpt, memory target in GiB or None): the configurations the issue asks for.
CONFIGS = [("standard", 2, False, False, 24), ("standard", 2, True, False, None), ("standard", 2, False, True, None),
           ("standard", 2, True, True, 8), ("lite", 4, False, False, 6), ("lite", 4, True, False, None),
           ("lite", 4, False, True, None), ("lite", 4, True, True, 4)]
# Dense bf16 tensor-core peaks (TFLOP/s, fp32 accumulation) from the vendors' data sheets, for --device cuda.
PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "RTX 4090": 165, "RTX 3090": 71}


def flag(amp, ckpt):
    return " ".join(f for f, on in (("--amp", amp), ("--grad-ckpt", ckpt)) if on) or "(default)"


# -----------------------------------------------------------------------------
# memory: the align step counted storage by storage (benchmarks/memcount.py), and run for real on a GPU

def gpu_peak(stem, amp, ckpt, args):
    """--device cuda: the real step at paper scale, torch.cuda.max_memory_allocated of the second step (bytes)."""
    torch.cuda.empty_cache()
    model = build(stem, ckpt).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    b = make_batch(args.batch, args.crop, args.tokens[0], device="cuda")
    try:
        for i in range(2):
            if i == 1:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            forward_loss(model, b, amp).backward()
            optimizer_step(model, opt)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del model, opt, b
        torch.cuda.empty_cache()


def section_memory(args):
    print(f"\n## Peak training memory of align.py: batch {args.batch}, crop {'x'.join(map(str, args.crop))}, "
          "BERT-base, AdamW")
    print("Counted exactly under FakeTensorMode (no real memory): bytes of every tensor storage from its creation to "
          "its release, with the GPU's attention and dropout kernels; GiB = 2^30 bytes. activations: kept for the "
          "backward pass at the end of the forward; transient: how far the peak rises above that plateau or the end of "
          "the backward (recomputation, gradient buffers, temporaries). A real GPU adds the CUDA context "
          "(~0.3-0.5 GiB, outside max_memory_allocated), cuDNN workspaces and allocator fragmentation (~0.5-1 GiB).")
    results = {}
    for tokens in args.tokens:
        print(f"\ntext: {tokens} tokens per report" + ("  (align.py's default --max-len)" if tokens == 512 else
                                                       "  (the authors' cap)" if tokens == 128 else ""))
        head = "| model | flags | weights | grads | AdamW | batch | activations | transient | peak (phase) | target | |"
        if args.device == "cuda":
            head = head[:-4] + "| GPU max_memory_allocated | target | |"
        print(head)
        print("|" + " --- |" * (head.count("|") - 1))
        for name, stem, amp, ckpt, target in CONFIGS:
            t0 = time.time()
            r = count_step(lambda: build(stem, ckpt), lambda: make_batch(args.batch, args.crop, tokens), amp)
            results[(stem, amp, ckpt, tokens)] = r
            g = lambda k: f"{r[k] / GiB:.2f}"  # noqa: E731
            row = (f"| {name} | {flag(amp, ckpt)} | {g('weights')} | {g('grads')} | {g('adam')} | {g('batch')} | "
                   f"{g('activations')} | {g('transient')} | **{g('peak')}** ({r['phase']}) |")
            peak = r["peak"]
            if args.device == "cuda" and tokens == args.tokens[0]:
                real = gpu_peak(stem, amp, ckpt, args)
                row += f" {'OOM' if real is None else f'{real / GiB:.2f}'} |"
                peak = max(peak, real if real is not None else math.inf)
            elif args.device == "cuda":
                row += " |"
            ok = "" if target is None else ("holds" if peak <= target * GiB else "MISSED")
            print(f"{row} {'' if target is None else f'<= {target}'} | {ok} |  [{time.time() - t0:.0f} s]", flush=True)
        r = count_step(lambda: build(4, False, text_ckpt=False), lambda: make_batch(args.batch, args.crop, tokens),
                       False)
        print(f"(lite (default) without the text-encoder checkpointing that align.py --lite turns on: "
              f"{r['activations'] / GiB:.2f} GiB of activations, peak {r['peak'] / GiB:.2f} GiB)")
    return results


# -----------------------------------------------------------------------------
# compute: FLOPs per training sample, and measured speed

def step_flops(stem, ckpt, batch, crop, tokens):
    """FLOPs per sample of one align.py forward + backward (with any --grad-ckpt recomputation), counted on fake
    tensors -> {"align", "vision": the ResNet's share = stage 2a, "text": the rest = stage 2b}. The rest also holds
    the projections and the classifier (< 0.01%); pre-training heads differ from them by as little."""
    with FakeTensorMode(), gpu_kernels():
        model, b = build(stem, ckpt), make_batch(batch, crop, tokens)
        with FlopCounterMode(display=False) as counter:
            forward_loss(model, b, False).backward()
    total, vision = counter.get_total_flops(), sum(counter.get_flop_counts()["GreenRFM.vision"].values())
    return {"align": total / batch, "vision": vision / batch, "text": (total - vision) / batch}


def all_flops(args):
    return {(stem, ckpt): step_flops(stem, ckpt, args.batch, args.crop, args.tokens[0])
            for stem in (2, 4) for ckpt in (False, True)}


def time_steps(model, b, amp, steps, device):
    """Seconds per training step (forward, loss, backward, clip, AdamW), after one warm-up step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        forward_loss(model, b, amp).backward()
        optimizer_step(model, opt)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def section_flops(args):
    print("\n## Compute: FLOPs per training sample (align.py step; matmuls, convolutions, attention; forward + backward"
          " + --grad-ckpt recomputation; --amp does not change the count)")
    flops = all_flops(args)
    on_gpu = args.device == "cuda"
    # On a CPU the paper-scale step takes minutes (and bf16 Conv3d has no fast CPU kernel), so the measured rate is
    # for a reduced shape; its achieved GFLOP/s carries over to the paper-scale FLOPs as an estimate.
    batch, crop, tokens = (args.batch, args.crop, args.tokens[0]) if on_gpu else (2, (32, 64, 64), 64)
    small = {} if on_gpu else {(stem, ckpt): step_flops(stem, ckpt, batch, crop, tokens)["align"]
                               for stem in (2, 4) for ckpt in (False, True)}
    where = (f"{torch.cuda.get_device_name()}, paper scale" if on_gpu else
             f"this CPU ({torch.get_num_threads()} threads), measured at batch {batch}, crop "
             f"{'x'.join(map(str, crop))}, {tokens} tokens, {args.steps} step(s) after a warm-up")
    print(f"GFLOP per sample at batch {args.batch}, crop {'x'.join(map(str, args.crop))}, {args.tokens[0]} tokens; "
          f"speed on {where}")
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if on_gpu and k in torch.cuda.get_device_name()),
                                    None)
    print("| model | flags | GFLOP/sample | of which vision | of which text | samples/s | achieved TFLOP/s |"
          + (" of peak |" if on_gpu else " est. paper-scale samples/s here |"))
    print("|" + " --- |" * 8)
    speed = {}
    for name, stem, amp, ckpt, _ in CONFIGS:
        f = flops[(stem, ckpt)]
        cells = (f"| {name} | {flag(amp, ckpt)} | {f['align'] / 1e9:,.0f} | {f['vision'] / 1e9:,.0f} | "
                 f"{f['text'] / 1e9:,.0f} |")
        if (amp and not on_gpu) or (args.quick and ckpt and not on_gpu):
            why = "bf16 Conv3d has no fast CPU kernel: ~25x slower than fp32 here" if amp else "--quick"
            print(f"{cells} not measured ({why}) | | |", flush=True)
            continue
        torch.manual_seed(0)
        model = build(stem, ckpt).to(args.device)
        sec = time_steps(model, make_batch(batch, crop, tokens, device=args.device), amp, args.steps, args.device)
        del model
        rate = speed[(stem, amp, ckpt)] = batch / sec
        achieved = rate * (f["align"] if on_gpu else small[(stem, ckpt)]) / 1e12  # TFLOP/s
        extra = (f"{achieved / peak:.0%} of {peak}" if peak else "peak unknown (--peak-tflops)") if on_gpu else \
            f"{achieved * 1e12 / f['align']:.3f}"
        print(f"{cells} {rate:.3f} | {achieved:.3f} | {extra} |", flush=True)
    return flops, speed


# -----------------------------------------------------------------------------
# preprocessing: volumes.py against MONAI on one CT-RATE-sized volume, one core each; then cache reads

def make_ct(path, shape=(512, 512, 300), spacing=(0.7, 0.7, 1.0), seed=0):
    """A chest-like int16 phantom of CT-RATE's size: air, an elliptic body (40 HU), two lungs (-850 HU), noise."""
    import nibabel as nib
    rng = np.random.default_rng(seed)
    x, y = [(np.arange(n) - n / 2) * s for n, s in zip(shape[:2], spacing[:2])]  # mm from the centre
    xx, yy = np.meshgrid(x, y, indexing="ij")
    axial = np.full(shape[:2], V.AIR_HU, np.int16)
    axial[(xx / 170) ** 2 + (yy / 120) ** 2 < 1] = 40
    axial[((np.abs(xx) - 70) / 55) ** 2 + (yy / 80) ** 2 < 1] = -850
    vol = np.repeat(axial[:, :, None], shape[2], axis=2)
    vol += rng.integers(-20, 21, size=shape, dtype=np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-n * s / 2 for n, s in zip(shape, spacing)]
    img = nib.Nifti1Image(vol, affine)  # stored (x, y, z), x fastest, like CT-RATE's files
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def monai_chain(preset):
    """MONAI's equivalent of volumes.py's chain: RAS, the preset spacing with the full-extent grid (scale_extent, as
    volumes.py scales to the rounded size), the HU window, and pad (with air: -1) or crop to the stored size."""
    from monai.transforms import Compose, LoadImage, Orientation, ResizeWithPadOrCrop, ScaleIntensityRange, Spacing
    p = V.get_preset(preset)
    return Compose([LoadImage(image_only=True, ensure_channel_first=True), Orientation(axcodes="RAS"),
                    Spacing(pixdim=p["spacing"], mode="bilinear", scale_extent=True),
                    ScaleIntensityRange(a_min=-1000, a_max=200, b_min=-1, b_max=1, clip=True),
                    ResizeWithPadOrCrop(p["size"][::-1], value=-1)])  # MONAI's axes are (x, y, z)


def section_preprocess(args, consumers):
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "ctrate_like.nii.gz"
    if not path.is_file():
        t0 = time.time()
        make_ct(path)
        print(f"\n(wrote {path}: {path.stat().st_size / 1e6:.0f} MB, {time.time() - t0:.0f} s)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core, for both
    try:
        print(f"\n## Preprocessing one CT-RATE-sized volume (512 x 512 x 300 int16, 0.7 x 0.7 x 1 mm, "
              f"{path.stat().st_size / 1e6:.0f} MB .nii.gz) to the chest preset, one core")
        try:
            import monai  # noqa: F401
            warnings.filterwarnings("ignore", module="monai")
            chain = monai_chain("chest")
        except ImportError:
            chain = None
            print("MONAI comparison skipped: monai is not installed (pip install monai; a benchmark-only dependency)")
        ours, theirs = [], []
        for _ in range(args.repeats):  # interleaved, so that load from other processes hits both alike
            t0 = time.perf_counter()
            stored = V.preprocess_volume(str(path), "chest")  # the cached int16 (D, H, W); windowed when read
            ours.append(time.perf_counter() - t0)
            if chain is not None:
                t0 = time.perf_counter()
                out = chain(str(path))
                theirs.append(time.perf_counter() - t0)
        a = statistics.median(ours)
        print("| pipeline | seconds per volume per core (median of %d) | speed-up |" % args.repeats)
        print("| --- | --- | --- |")
        print(f"| volumes.py preprocess_volume (nibabel + torch trilinear) | {a:.2f} | |")
        if chain is not None:
            m = statistics.median(theirs)
            print(f"| MONAI {monai.__version__}: LoadImage, Orientation, Spacing, ScaleIntensityRange, "
                  "ResizeWithPadOrCrop "
                  f"| {m:.2f} | ours {m / a:.1f}x faster ({'holds' if m / a >= 2 else 'MISSED'}: target >= 2x) |")
            # Same window on both: ours (D, H, W) int16 HU -> [-1, 1]; MONAI's is (1, x, y, z).
            diff = np.abs(V.normalize(stored, "chest") - np.asarray(out)[0].transpose(2, 1, 0)) * 600  # in HU
            tol_mean, tol_p99 = 2.0, 10.0
            ok = diff.mean() <= tol_mean and np.percentile(diff, 99) <= tol_p99
            print(f"Outputs compared voxel by voxel in HU (both windowed to [-1000, 200]): mean |diff| "
                  f"{diff.mean():.2f}, 99th percentile {np.percentile(diff, 99):.1f}, max {diff.max():.0f} (at edges: "
                  f"volumes.py spans the input extent with the rounded size, MONAI keeps exactly 1.5 mm, a shift of up to "
                  f"0.1 voxel), "
                  f"{(diff <= 10).mean():.2%} within 10 HU; tolerance mean <= {tol_mean}, p99 <= {tol_p99}: "
                  f"{'equal within it' if ok else 'NOT EQUAL'}")
        # Reading: random training crops from the cache, as VolumeReportDataset does for every sample.
        cache = work / "cache"
        cache.mkdir(exist_ok=True)
        D.check_cache(cache, "chest", create=True)
        n = 4
        for i in range(n):
            np.save(D.cache_file(cache, f"v{i}"), stored)
        table = D.Table([f"v{i}" for i in range(n)], [str(path)] * n, [""] * n, ["train"] * n, ["A"],
                        np.zeros((n, 1), np.float32), [{}] * n)
        ds = D.VolumeReportDataset(table, "chest", train=True, cache_dir=cache)
        ds[0]
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3 or k < 20:
            ds.set_epoch(k // n)
            ds[k % n]
            k += 1
        rate = k / (time.perf_counter() - t0)
        print(f"\nReading from the cache (.npy, memory-mapped, page cache warm; random 96x192x192 crop, windowed): "
              f"{rate:.0f} volumes/s per core, against what one GPU trains at (the scripts read with --workers 2):")
        for what, need in consumers:  # (description, samples/s)
            print(f"- {what}: {need:.0f} samples/s -> one core {'keeps up' if rate > need else 'does NOT keep up'} "
                  f"({rate / need:.1f}x{'' if rate > need else f'; it takes {math.ceil(need / rate)} loader workers'})")
    finally:
        torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# the paper's schedule on a 24 GB-class GPU, from FLOPs

def stage_flops(flops, stem, ckpt):
    """FLOPs per sample of each training stage (2a, 2b, 3) with these flags: pretrain_vision.py (the align step's vision share),
    pretrain_text.py (the text share without the checkpointing align.py --lite adds) and align.py."""
    return {"vision": flops[(stem, ckpt)]["vision"], "text": flops[(2, ckpt)]["text"],
            "align": flops[(stem, ckpt)]["align"]}


def gpu_rates(flops, args):
    """Estimated samples/s on the reference GPU: its peak x the stated efficiency / FLOPs per sample."""
    return {k: args.ref_tflops * 1e12 * args.efficiency / v for k, v in flops.items()}


def section_schedule(args, flops):
    n, epochs = 47149, 5
    print(f"\n## The paper's schedule on CT-RATE ({n:,} training volumes; vision, text, alignment, {epochs} epochs "
          f"each) on a 24 GB-class GPU: {args.ref_tflops:g} TFLOP/s bf16 peak (RTX 3090) x {args.efficiency:.0%} "
          f"assumed efficiency, {args.tokens[0]} tokens; estimated from the FLOPs, not measured")
    print("| model | flags | vision 2a (h) | text 2b (h) | alignment (h) | total GPU-hours | paper |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, stem, amp, ckpt, _ in CONFIGS:
        if not amp:  # fp32 runs at the TF32 rate, not this bf16 peak: the schedule is given for --amp
            continue
        hours = {k: n * epochs / r / 3600 for k, r in gpu_rates(stage_flops(flops, stem, ckpt), args).items()}
        paper = "24 (standard, one 24 GB GPU)" if stem == 2 else "about 4 (lite, 6 GB)"
        print(f"| {name} | {flag(amp, ckpt)} | {hours['vision']:.1f} | {hours['text']:.1f} | {hours['align']:.1f} | "
              f"**{sum(hours.values()):.1f}** | {paper} |")


# -----------------------------------------------------------------------------
# main

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=D.HelpFormatter)
    p.add_argument("--only", nargs="+", choices=["memory", "flops", "preprocess", "schedule"],
                   help="run only these sections (default: all; schedule needs the FLOPs, which it counts itself)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: real peak memory and speed at paper scale")
    p.add_argument("--quick", action="store_true",
                   help="fewer timed runs (no --grad-ckpt speed rows on CPU, one repeat)")
    p.add_argument("--batch", type=int, default=10, help="batch size (the paper's: 10)")
    p.add_argument("--crop", type=int, nargs=3, default=[96, 192, 192], help="training crop D H W (the chest preset's)")
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 128],
                   help="report lengths in tokens to count memory at (the first is used for FLOPs and the schedule)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps per configuration, after one warm-up (default: 1 on CPU, 5 on a GPU)")
    p.add_argument("--repeats", type=int, default=3, help="preprocessing runs per pipeline (median)")
    p.add_argument("--workdir", default="out/bench", help="where the generated volume and the test cache go")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="--device cuda: the card's bf16 dense peak, if not in the table")
    p.add_argument("--ref-tflops", type=float, default=71.0,
                   help="schedule: reference 24 GB GPU's bf16 dense peak (RTX 3090: 71)")
    p.add_argument("--efficiency", type=float, default=0.3, help="schedule: assumed fraction of that peak achieved")
    args = p.parse_args()
    args.crop = tuple(args.crop)
    args.steps = args.steps or (5 if args.device == "cuda" else 1)
    if args.quick:
        args.repeats = 1
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA GPU")
    only = set(args.only or ["memory", "flops", "preprocess", "schedule"])

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none used"
    print(f"# bench.py: torch {torch.__version__}, CPU {cpu} ({os.cpu_count()} cores), GPU {gpu}")
    t_start = time.time()
    if "memory" in only:
        section_memory(args)
    flops, speed = None, {}
    if "flops" in only:
        flops, speed = section_flops(args)
    elif "schedule" in only or "preprocess" in only:
        flops = all_flops(args)
    if "preprocess" in only:
        # What one GPU consumes: the fastest align.py configuration (the target), and vision pre-training lite, the
        # fastest stage; measured with --device cuda, else estimated from the FLOPs.
        if args.device == "cuda" and speed:
            (s, a, c), r = max(speed.items(), key=lambda kv: kv[1])
            rates = [(f"align.py {'lite' if s == 4 else 'standard'} {flag(a, c)}, measured", r)]
        else:
            est = f"estimated at {args.ref_tflops:g} TFLOP/s x {args.efficiency:.0%}"
            lite = gpu_rates(flops[(4, False)], args)
            rates = [(f"align.py --lite --amp (the fastest align configuration), {est}", lite["align"]),
                     (f"pretrain_vision.py --lite --amp (the fastest stage), {est}", lite["vision"])]
        section_preprocess(args, rates)
    if "schedule" in only:
        section_schedule(args, flops)
    print(f"\nbench.py: done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
