"""
bench.py's memory count: the training step of align.py at paper scale, and every tensor storage it creates.

The step (build, make_batch, forward_loss, optimizer_step) makes the same calls as align.py's training loop; bench.py
also times it and counts its FLOPs. count_step runs it under a StorageCounter, a TorchDispatchMode that adds the bytes
of each storage an op creates and subtracts them when the storage is freed; under FakeTensorMode (shapes and dtypes
only) nothing of that size is allocated, so a 24 GB step is counted on a laptop. tests/test_bench.py checks the count
against a hand count and against a real run.

Not a script: `python bench.py --only memory` prints the table.
"""
import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import model as M

# CXR-BERT (microsoft/BiomedVLP-CXR-BERT-specialized) is a BERT-base: the same sizes, random weights, no download.
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)


# -----------------------------------------------------------------------------
# the measured step: the same calls as align.py's training loop

def build(stem, ckpt, text_ckpt=None, num_labels=18, bert=BERT_BASE, widths=(64, 128, 256, 512)):
    """GreenRFM as align.py builds it: ResNet3D + BERT trunk, projections, shared classifier. As in align.py, the
    text encoder is checkpointed with --grad-ckpt and always in the lite configuration (text_ckpt overrides)."""
    model = M.build_model({"kind": "align", "num_labels": num_labels, "embed_dim": 768, "text": {"bert": bert},
                           "vision": {"in_channels": 1, "stem": stem, "widths": list(widths), "grad_ckpt": ckpt}})
    if (ckpt or stem == 4) if text_ckpt is None else text_ckpt:
        model.text.gradient_checkpointing_enable()
    return model.train()


def make_batch(batch, crop, tokens, num_labels=18, vocab=BERT_BASE["vocab_size"], device="cpu"):
    """Random inputs of the real shapes: volume (B, 1, D, H, W), token ids and mask (B, L), targets and mask (B, C).
    The first report fills all L tokens, the others are padded from 3/4 on, so BERT uses its attention mask."""
    att = torch.ones(batch, tokens, dtype=torch.long, device=device)
    att[1:, tokens * 3 // 4:] = 0
    return {"x": torch.randn(batch, 1, *crop, device=device),
            "ids": torch.randint(0, vocab, (batch, tokens), device=device), "att": att,
            "y": torch.randint(0, 2, (batch, num_labels), device=device).float(),
            "m": torch.ones(batch, num_labels, device=device)}


def forward_loss(model, b, amp):
    """align.py: autocast forward, then the loss on float32 latents and logits."""
    with torch.autocast(b["x"].device.type, dtype=torch.bfloat16, enabled=amp):
        img, txt, img_logits, txt_logits = model(b["x"], b["ids"], b["att"])
        loss, _ = M.align_loss(img.float(), txt.float(), img_logits.float(), txt_logits.float(), b["y"], b["m"])
    return loss


def optimizer_step(model, opt):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # align.py clips at 0.5
    opt.step()
    opt.zero_grad(set_to_none=True)


def new_optimizer(model):
    # foreach=True is what AdamW picks on a GPU (its intermediates are part of the peak); lr and decay as align.py.
    return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, foreach=True)


@contextlib.contextmanager
def gpu_kernels():
    """Within the CPU count, run the kernels a CUDA GPU picks, so that the count is the GPU's: memory-efficient
    attention (keeps q, k, v, output and a log-sum-exp; the CPU's math path would keep every B x heads x L x L
    attention matrix) and fused dropout (a 1-byte mask; the CPU keeps a float32 one). Functions are swapped, not
    hooked, because the recomputation of --grad-ckpt runs in the backward pass, outside any mode."""
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # as SDPA does: True = attend
            attn_mask = torch.where(attn_mask, 0.0, float("-inf")).to(q.dtype)
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, True, dropout_p, is_causal,
                                                                      scale=scale)[0]

    def dropout(x, p=0.5, training=True, inplace=False):
        return torch.native_dropout(x, p, True)[0] if training and p > 0 else x
    saved = F.scaled_dot_product_attention, F.dropout
    F.scaled_dot_product_attention, F.dropout = sdpa, dropout
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout = saved


# -----------------------------------------------------------------------------
# memory: every tensor storage an op creates, counted from its creation until it is freed

class StorageCounter(TorchDispatchMode):
    """Live bytes of tensor storage: each storage an op returns is added once (views share it) and removed
    by a weakref finalizer when it dies. Works on real and on fake tensors. peak and the phase it fell in
    are kept. What it cannot see: memory inside a kernel (cuDNN workspaces), the CUDA context, and the
    allocator's rounding and fragmentation."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.phase, self.peak_phase, self.seen = 0, 0, "", "", {}

    def reset_peak(self):
        self.peak, self.peak_phase = self.live, self.phase

    def _add(self, t):
        st = t.untyped_storage()
        key = id(st)  # torch keeps one Python object per live storage, so its id is stable while it lives
        if key in self.seen:
            return
        nbytes = st.nbytes()

        def freed(_, key=key, nbytes=nbytes):
            self.seen.pop(key, None)
            self.live -= nbytes
        self.seen[key] = weakref.ref(st, freed)
        self.live += nbytes
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self.phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def storage_bytes(tensors):
    """Bytes of the distinct storages behind some tensors."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
    return sum(seen.values())


def count_step(make_model, make_inputs, amp, fake=True, gpu_like=None):
    """Run two training steps (the first creates the AdamW state) under a StorageCounter and describe the second:
    {weights, grads, adam, batch, activations (kept for backward at the end of forward), peak, phase, end_fwd,
    end_bwd, transient (how far the peak rises above the larger of the two plateaus)}, in bytes. fake=True runs
    under FakeTensorMode (no real memory is used); gpu_like (default: = fake) swaps in the GPU's attention and
    dropout kernels."""
    gpu_like = fake if gpu_like is None else gpu_like
    fake_mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with fake_mode, (gpu_kernels() if gpu_like else contextlib.nullcontext()):
        counter = StorageCounter()
        with counter:
            model = make_model()
            opt = new_optimizer(model)
            b = make_inputs()
            for _ in range(2):
                start = counter.live
                counter.phase = "forward"
                counter.reset_peak()
                loss = forward_loss(model, b, amp)
                end_fwd = counter.live
                counter.phase = "backward"
                loss.backward()
                end_bwd = counter.live
                grads = storage_bytes(p.grad for p in model.parameters())
                counter.phase = "optimizer"
                optimizer_step(model, opt)
                del loss
            weights = storage_bytes([*model.parameters(), *model.buffers()])
            adam = storage_bytes(v for s in opt.state.values() for v in s.values())
            batch = storage_bytes(b.values())
    return dict(weights=weights, grads=grads, adam=adam, batch=batch, activations=end_fwd - start, peak=counter.peak,
                phase=counter.peak_phase, end_fwd=end_fwd, end_bwd=end_bwd,
                transient=counter.peak - max(end_fwd, end_bwd))
