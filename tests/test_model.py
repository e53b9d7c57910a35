"""model.py and encoders.py: encoder shapes, losses against hand-computed values, text encoders, checkpoints."""
import argparse
import json
import math
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoints
import encoders
import model as M
from benchmarks import memcount
from data import DataError

REPORTS = [
    "Bronchiectasis in both lower lobes, no pleural effusion.",
    "Mild emphysema and interlobular septal thickening; consolidation in the right lung.",
    "Cardiomegaly with pericardial effusion. Coronary artery wall calcification is present.",
    "There is a lung nodule and atelectasis. Mosaic attenuation pattern was not observed.",
] * 50
TINY_VISION = {"in_channels": 1, "stem": 4, "widths": [8, 16, 32, 64]}


def tokenize(tokenizer, texts, max_len):
    """-> input_ids (B, L), attention_mask (B, L), n_truncated; L = longest in the batch, at most max_len
    (what the stage scripts do, with the count pretrain_text.py reports)."""
    lengths = [len(ids) for ids in tokenizer(list(texts), verbose=False)["input_ids"]]  # untruncated, with [CLS]/[SEP]
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], sum(n > max_len for n in lengths)


@pytest.fixture(scope="module")
def scratch_text():
    return M.build_text("scratch", REPORTS, max_len=64)


# ---------------------------------------------------------------------------- vision encoder

@pytest.mark.parametrize("stem", [2, 4])
def test_resnet_shapes_and_size(stem):
    net = M.ResNet3D(stem=stem).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 32, 64, 64))
    assert out.shape == (2, 512) and net.out_dim == 512
    assert 32e6 < sum(p.numel() for p in net.parameters()) < 34e6


def test_resnet_multichannel_input():
    net = M.ResNet3D(in_channels=3, stem=4, widths=(8, 16, 32, 64)).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 16, 32, 32)).shape == (2, 64)


def test_grad_ckpt_same_output_and_grads():
    torch.manual_seed(0)
    plain = M.ResNet3D(stem=2, widths=(8, 16, 32, 64))
    for m in plain.modules():  # varied BN gammas, so a wrong gradient cannot hide behind symmetry
        if isinstance(m, torch.nn.BatchNorm3d):
            torch.nn.init.normal_(m.weight, 1.0, 0.2)
    ckpt = M.ResNet3D(stem=2, widths=(8, 16, 32, 64), grad_ckpt=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 8, 16, 16)
    out_p, out_c = plain(x), ckpt(x)  # training mode: BN uses batch statistics
    torch.testing.assert_close(out_c, out_p)
    out_p.square().sum().backward()
    out_c.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    # The documented side effect: the recomputation updates BN running stats a second time.
    bn_p, bn_c = plain.stages[1][0].bn1, ckpt.stages[1][0].bn1
    assert bn_p.num_batches_tracked.item() == 1 and bn_c.num_batches_tracked.item() == 2


@pytest.mark.parametrize("shape, stride", [((3, 5, 1, 2, 2), 1), ((3, 5, 2, 3, 4), 2), ((2, 5, 1, 1, 1), 1),
                                           ((2, 5, 2, 2, 2), 1), ((2, 5, 3, 4, 4), 1)])
def test_conv3x3x3_matches_conv3d(shape, stride, monkeypatch):
    """The matrix-product path (tiny maps on the CPU) gives nn.Conv3d's output and gradients, odd sizes included;
    the last shape (48 output voxels) takes the ordinary path."""
    torch.manual_seed(0)
    conv = encoders.Conv3x3x3(5, 7, stride)
    x = torch.randn(*shape, requires_grad=True)
    ordinary = []
    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", lambda self, x, w, b: ordinary.append(1) or
                        torch.nn.functional.conv3d(x, w, b, self.stride, self.padding))
    out = conv(x)
    assert len(ordinary) == (shape[2:] == (3, 4, 4))
    ref = torch.nn.functional.conv3d(x, conv.weight, stride=stride, padding=1)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(out, [x, conv.weight], g)
    rx, rw = torch.autograd.grad(ref, [x, conv.weight], g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    assert list(conv.state_dict()) == ["weight"]  # loads the checkpoints written with nn.Conv3d


# ---------------------------------------------------------------------------- losses

def test_clip_loss_identical_embeddings_is_log_b():
    for b in (2, 5, 10):
        e = torch.ones(b, 768)
        assert math.isclose(M.clip_loss(e, e).item(), math.log(b), rel_tol=1e-6)


def test_clip_loss_2x2_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    txt = torch.tensor([[2.0, 1.0], [0.0, -1.0]])
    s = [[2.0, 0.0], [3.0, -2.0]]  # S = img @ txt.T, written out

    def ce(row, target):
        return -row[target] + math.log(sum(math.exp(v) for v in row))

    rows = ce(s[0], 0) + ce(s[1], 1)
    cols = ce([s[0][0], s[1][0]], 0) + ce([s[0][1], s[1][1]], 1)
    expected = (rows / 2 + cols / 2) / 2
    assert math.isclose(M.clip_loss(img, txt).item(), expected, rel_tol=1e-6)


def test_masked_bce_matches_formula_and_ignores_masked_entries():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, requires_grad=True)
    targets = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]])
    mask = torch.tensor([[1.0, 1, 0, 1], [0, 1, 1, 1], [1, 0, 0, 1]])
    manual = 0.0
    for z, t, m in zip(logits.flatten().tolist(), targets.flatten().tolist(), mask.flatten().tolist()):
        p = 1 / (1 + math.exp(-z))
        manual += m * -(t * math.log(p) + (1 - t) * math.log(1 - p))
    manual /= mask.sum().item()
    loss = M.masked_bce(logits, targets, mask)
    assert math.isclose(loss.item(), manual, rel_tol=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)

    # Garbage (uncertain -1, not-mentioned NaN, out-of-range) where mask is 0: same loss, same gradient.
    garbage = targets.clone()
    garbage[mask == 0] = torch.tensor([float("nan"), -1.0, 7.0, float("nan")])
    loss2 = M.masked_bce(logits, garbage, mask)
    (grad2,) = torch.autograd.grad(loss2, logits)
    assert torch.equal(loss2, loss) and torch.equal(grad2, grad)
    assert (grad2[mask == 0] == 0).all()
    # An all-masked batch gives 0, not NaN (denominator clamped to 1).
    assert M.masked_bce(logits, garbage, torch.zeros_like(mask)).item() == 0.0


def test_align_loss_is_clip_plus_mean_bce():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 768), torch.randn(4, 768)
    li, lt = torch.randn(4, 18), torch.randn(4, 18)
    targets, mask = torch.randint(0, 2, (4, 18)).float(), torch.randint(0, 2, (4, 18)).float()
    total, parts = M.align_loss(img, txt, li, lt, targets, mask)
    assert set(parts) == {"clip", "bce_img", "bce_txt"}
    clip, bi, bt = M.clip_loss(img, txt), M.masked_bce(li, targets, mask), M.masked_bce(lt, targets, mask)
    torch.testing.assert_close(total, clip + (bi + bt) / 2)
    torch.testing.assert_close(parts["bce_img"], bi)


class Features(torch.nn.Identity):
    """A stand-in encoder: its input is already the pooled feature (B, out_dim)."""

    def __init__(self, out_dim):
        super().__init__()
        self.out_dim = out_dim


def test_init_shared_heads_shifts_each_heads_logits_by_half_the_bias_difference():
    """--init-shared heads: the weights reproduce each pre-trained head, the one shared bias is the mean of the two, so
    the shared classifier's logits are each head's plus half the other bias minus its own, exactly that and no more
    (the README and the docstring say so; model.py's docstring once said the vision head's read-out came out exactly)."""
    torch.manual_seed(0)
    C, F_img, F_txt, E = 5, 12, 10, 16
    model = M.GreenRFM(Features(F_img), Features(F_txt), C, E).double()
    h_img, h_txt = torch.randn(C, F_img, dtype=torch.float64), torch.randn(C, F_txt, dtype=torch.float64)
    b_img, b_txt = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    M.init_shared_from_heads(model, (h_img, b_img), (h_txt, b_txt), scale=0.1)
    f, h = torch.randn(7, F_img, dtype=torch.float64), torch.randn(7, F_txt, dtype=torch.float64)
    with torch.no_grad():
        shared_img = model.classifier(model.img_proj(f)) - (f @ h_img.T + b_img)  # (7, C) against the vision head
        shared_txt = model.classifier(model.txt_proj(h)) - (h @ h_txt.T + b_txt)  # against the text head
    # The shifts are computed in float32 inside init_shared_from_heads (it casts the heads to float), hence 1e-5.
    torch.testing.assert_close(shared_img, ((b_txt - b_img) / 2).expand(7, C), atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_txt, ((b_img - b_txt) / 2).expand(7, C), atol=1e-5, rtol=0)
    assert (b_txt - b_img).abs().min() > 1e-3  # the shift is not zero here: the vision head's logits are not reproduced


# ---------------------------------------------------------------------------- text encoder

def test_scratch_text_encoder(scratch_text):
    enc, tok, cfg = scratch_text
    assert set(cfg) == {"bert", "vocab", "lowercase", "max_len", "source", "pooling"} and cfg["source"] == "scratch"
    assert cfg["pooling"] == "cls"
    words = tok.tokenize("Bronchiectasis, EMPHYSEMA and interlobular septal thickening; cardiomegaly.")
    assert "[UNK]" not in words and "bronchiectasis" in words and "emphysema" in words
    ids, mask, n_trunc = tokenize(tok, REPORTS[:3], max_len=64)
    assert ids.shape == mask.shape and ids.shape[0] == 3 and n_trunc == 0
    assert (ids[:, 0] == tok.cls_token_id).all()
    enc.eval()
    with torch.no_grad():
        out = enc(ids, mask)
    assert out.shape == (3, 128) and enc.out_dim == 128


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sentence_pooling_is_the_mean_of_sentences_encoded_alone(scratch_text, attn):
    _, tok, cfg = scratch_text
    cfg = dict(cfg, pooling="sentence", bert=dict(cfg["bert"], _attn_implementation=attn))
    torch.manual_seed(0)
    enc = M.TextEncoder(cfg).eval()
    texts = ["Bronchiectasis; there is no pleural effusion. Cardiomegaly.", "Emphysema is present.", ""]
    ids, mask, _ = tokenize(tok, texts, 64)  # padded to the longest text

    def alone(sentence):  # reference: the plain BERT on the sentence's tokens only, positions from 0
        s_ids = torch.tensor([tok.convert_tokens_to_ids(tok.tokenize(sentence))])
        return enc.bert(input_ids=s_ids).last_hidden_state[0].mean(0)  # (H,)
    with torch.no_grad():
        out = enc(ids, mask)  # (3, H)
        ref0 = torch.stack([alone("Bronchiectasis;"), alone("there is no pleural effusion."), alone("Cardiomegaly.")]).mean(0)
        torch.testing.assert_close(out[0], ref0)
        torch.testing.assert_close(out[1], alone("Emphysema is present."))  # a one-sentence prompt
        torch.testing.assert_close(out[2], torch.zeros_like(out[2]))  # no words: the zero vector, not NaN
        # Padding and the other texts of the batch change nothing.
        torch.testing.assert_close(enc(*tokenize(tok, texts[1:2], 64)[:2])[0], out[1])
    # The pooling travels in the config: a rebuilt encoder pools the same way.
    assert M.TextEncoder(cfg).pooling == "sentence" and M.TextEncoder({k: v for k, v in cfg.items() if k != "pooling"}).pooling == "cls"
    with pytest.raises(ValueError, match="pooling 'max'"):  # an unknown pooling is an error, never a fallback
        M.TextEncoder(dict(cfg, pooling="max"))


def test_mean_pooling_averages_every_real_token(scratch_text):
    _, tok, cfg = scratch_text
    torch.manual_seed(0)
    enc = M.TextEncoder(dict(cfg, pooling="mean")).eval()
    texts = ["Emphysema is present.", "Bronchiectasis; there is no pleural effusion. Cardiomegaly."]
    ids, mask, _ = tokenize(tok, texts, 64)  # the first text is padded
    with torch.no_grad():
        out = enc(ids, mask)
        for i, text in enumerate(texts):  # reference: the text alone, its [CLS] ... [SEP] states averaged
            alone = tok([text], return_tensors="pt")["input_ids"]
            torch.testing.assert_close(out[i], enc.bert(input_ids=alone).last_hidden_state[0].mean(0))
        cls = M.TextEncoder(dict(cfg, pooling="cls")).eval()
        cls.load_state_dict(enc.state_dict())
        assert not torch.allclose(cls(ids, mask), out)  # a different embedding from the same weights


def test_tokenize_counts_truncated(scratch_text):
    _, tok, _ = scratch_text
    ids, mask, n_trunc = tokenize(tok, ["no effusion", " ".join(REPORTS[:4])], max_len=16)
    assert ids.shape == (2, 16) and n_trunc == 1
    assert ids[1, -1].item() == tok.sep_token_id  # truncation keeps the final [SEP]
    assert mask[0].sum().item() < 16 and (ids[0][mask[0] == 0] == tok.pad_token_id).all()


def test_tokenizer_from_cfg_roundtrip(scratch_text):
    enc, tok, cfg = scratch_text
    rebuilt = M.tokenizer_from_cfg(cfg)
    assert rebuilt(REPORTS[:4])["input_ids"] == tok(REPORTS[:4])["input_ids"]
    # Encoder rebuilt from the config dict alone has the same parameter shapes.
    again = M.TextEncoder(cfg)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in enc.state_dict().items()}


def sentence_pooling_before_review(enc, input_ids, attention_mask):
    """TextEncoder's "sentence" pooling as it was before issue 24's review, verbatim but for the token ids, which it
    kept as Python lists (copied to the device in every forward), and F.one_hot without num_classes."""
    vocab = {t: i for i, t in enumerate(enc.cfg["vocab"])}
    special_ids, ends = [vocab["[CLS]"], vocab["[SEP]"]], [vocab[t] for t in ".:;" if t in vocab]
    special = torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    stop = special | torch.isin(input_ids, torch.tensor(ends, device=input_ids.device))
    start = special | torch.cat([torch.ones_like(stop[:, :1]), stop[:, :-1]], 1)
    seg, idx = torch.cumsum(start, 1) - 1, torch.arange(input_ids.shape[1], device=input_ids.device)
    pos = idx - torch.cummax(torch.where(start, idx, 0), 1).values
    real, eye = attention_mask.bool(), torch.eye(len(idx), dtype=torch.bool, device=idx.device)
    allow = (((seg[:, :, None] == seg[:, None, :]) & real[:, None, :]) | eye)[:, None]
    hidden = enc.bert(input_ids=input_ids, attention_mask=allow, position_ids=pos).last_hidden_state
    member = F.one_hot(seg).to(hidden.dtype) * (real & ~special)[..., None]
    n = member.sum(1)[..., None]
    sent, has = torch.einsum("bls,blh->bsh", member, hidden) / n.clamp(min=1), (n > 0).to(hidden.dtype)
    return (sent * has).sum(1) / has.sum(1).clamp(min=1)


def test_sentence_pooling_unchanged_by_its_buffers(scratch_text):
    """The sentence pooling's token ids became non-persistent buffers and its one_hot a comparison with every segment
    index (issue 24's review: no host synchronisation in forward): the same embeddings as before, and the same
    state_dict, so every checkpoint loads strictly as before."""
    _, tok, cfg = scratch_text
    torch.manual_seed(0)
    enc = M.TextEncoder(dict(cfg, pooling="sentence")).eval()
    texts = [*REPORTS[:4], "Bronchiectasis; there is no pleural effusion. Cardiomegaly.", "Emphysema is present.", ""]
    ids, mask, _ = tokenize(tok, texts, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(ids, mask), sentence_pooling_before_review(enc, ids, mask), rtol=0, atol=0)
    assert {"special", "ends"} <= {n for n, _ in enc.named_buffers()}
    assert "special" not in enc.state_dict() and "ends" not in enc.state_dict()
    assert set(enc.state_dict()) == set(M.TextEncoder(dict(cfg, pooling="cls")).state_dict())
    M.TextEncoder(dict(cfg, pooling="cls")).load_state_dict(enc.state_dict(), strict=True)  # either way, strictly


class HostReads(TorchDispatchMode):
    """Every read of a tensor's value back to the host: .item(), bool(tensor) and F.one_hot without num_classes all
    dispatch to aten._local_scalar_dense. On a GPU each one waits for the stream to finish; the stack says whose."""

    def __init__(self):
        super().__init__()
        self.stacks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.stacks.append(traceback.extract_stack())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pooling", M.POOLINGS)
def test_align_training_step_reads_nothing_back_to_the_host(scratch_text, pooling):
    """One whole training step of the aligned model as align.py makes it (forward, align loss, backward, clipping,
    fused AdamW step; benchmarks/memcount.py's step) reads no tensor value back to the host from project code
    (issue 24's review: the sentence pooling did twice per step). Known and left alone: transformers' own SDPA mask
    code calls padding_mask.all() once per forward for the cls and mean poolings; that one is transformers', not ours."""
    _, tok, cfg = scratch_text
    text = dict(cfg, pooling=pooling, bert=dict(cfg["bert"], hidden_size=32, intermediate_size=64))  # tiny, fast
    torch.manual_seed(0)
    model = M.build_model({"kind": "align", "num_labels": 3, "embed_dim": 32, "vision": TINY_VISION, "text": text}).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
    ids, att, _ = tokenize(tok, REPORTS[:4], 64)
    batch = {"x": torch.randn(4, 1, 16, 32, 32), "ids": ids, "att": att, "y": torch.randint(0, 2, (4, 3)).float(),
             "m": torch.ones(4, 3)}
    with HostReads() as reads:
        memcount.forward_loss(model, batch, amp=False).backward()
        memcount.optimizer_step(model, opt)  # clip_grad_norm_ at 0.5, opt.step, zero_grad
    ours = [s for s in reads.stacks if not any(f"{os.sep}transformers{os.sep}" in f.filename for f in s)]
    assert not ours, f"{len(ours)} host read-back(s) outside transformers, the first from:\n{''.join(ours[0].format())}"


@pytest.mark.parametrize("pooling", ["cls", "sentence", "mean"])
def test_text_gradient_checkpointing_same_output_and_grads(scratch_text, pooling):
    _, tok, cfg = scratch_text
    cfg = dict(cfg, pooling=pooling, bert=dict(cfg["bert"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    plain, ckpt = M.TextEncoder(cfg), M.TextEncoder(cfg)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing_enable()
    plain.train(), ckpt.train()  # checkpointing is only active in training mode; dropout is off
    ids, mask, _ = tokenize(tok, REPORTS[:2], 64)
    out_p, out_c = plain(ids, mask), ckpt(ids, mask)
    torch.testing.assert_close(out_c, out_p)
    out_p.square().sum().backward()
    out_c.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_build_text_from_local_pretrained_dir(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizer
    words = encoders.SPECIAL_TOKENS + ["there", "is", "no", "pleural", "effusion", "emphysema", ".", "##s", "a"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)  # vocab path positional (transformers 5)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False).eval()
    bert.save_pretrained(tmp_path)
    texts = ["There is no pleural effusion.", "Emphysemas"]
    ref_ids = AutoTokenizer.from_pretrained(tmp_path)(texts)["input_ids"]
    # Mimic CXR-BERT: a custom model type and custom-code classes that must never be executed.
    for name, extra in [("config.json", {"model_type": "cxr-bert", "auto_map": {"AutoModel": "x.CXRBertModel"}}),
                        ("tokenizer_config.json", {"tokenizer_class": "CXRBertTokenizer",
                                                   "auto_map": {"AutoTokenizer": ["x.CXRBertTokenizer", None]}})]:
        (tmp_path / name).write_text(json.dumps({**json.loads((tmp_path / name).read_text()), **extra}))

    enc, tok, cfg = M.build_text(str(tmp_path), max_len=64)
    assert cfg["vocab"] == words and cfg["lowercase"] is True and cfg["bert"]["hidden_size"] == 32
    assert tok(texts)["input_ids"] == ref_ids and "[UNK]" not in tok.tokenize(texts[0])
    assert M.tokenizer_from_cfg(cfg)(texts)["input_ids"] == ref_ids
    ids, mask, _ = tokenize(tok, texts, 64)
    enc.eval()
    with torch.no_grad():  # the pretrained weights were loaded, not re-initialised
        torch.testing.assert_close(enc(ids, mask), bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])
    with pytest.raises(ValueError, match="max_len"):
        M.build_text(str(tmp_path), max_len=65)


# ---------------------------------------------------------------------------- models + checkpoints

def _configs(text_cfg):
    return {
        "vision": {"kind": "vision", "num_labels": 3, "vision": TINY_VISION},
        "text": {"kind": "text", "num_labels": 3, "text": text_cfg},
        "align": {"kind": "align", "num_labels": 3, "vision": TINY_VISION, "text": text_cfg, "embed_dim": 768},
    }


def _inputs(kind, tok):
    torch.manual_seed(1)
    x = torch.randn(2, 1, 16, 32, 32)
    ids, mask, _ = tokenize(tok, REPORTS[:2], 64)
    return {"vision": (x,), "text": (ids, mask), "align": (x, ids, mask)}[kind]


class FakeDDP(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_greenrfm_shapes(scratch_text):
    _, tok, cfg = scratch_text
    net = M.build_model(_configs(cfg)["align"]).eval()
    x, ids, mask = _inputs("align", tok)
    img, txt, li, lt = net(x, ids, mask)
    assert img.shape == txt.shape == (2, 768) and li.shape == lt.shape == (2, 3)
    assert net.img_proj.bias is None and net.txt_proj.bias is None
    torch.testing.assert_close(li, net.classifier(net.encode_image(x)))
    full = M.GreenRFM(M.ResNet3D(), net.text, 18)
    assert tuple(full.img_proj.weight.shape) == (768, 512)


@pytest.mark.parametrize("stage", M.STAGES)
def test_checkpoint_roundtrip(stage, scratch_text, tmp_path):
    _, tok, cfg = scratch_text
    model_config = _configs(cfg)[stage]
    net = M.build_model(model_config)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    out = net(*_inputs(stage, tok))
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    opt.step()
    net.eval()
    with torch.no_grad():
        expected = net(*_inputs(stage, tok))
    args = argparse.Namespace(out=Path("out") / stage, lr=1e-4, crop=(32, 64, 64))
    path = checkpoints.save_checkpoint(tmp_path / "best.pt", stage=stage, model=FakeDDP(net), model_config=model_config,
                             args=args, label_names=["a", "b", "c"], optimizer=opt, step=7, epoch=1,
                             best_metric=0.5, extra={"rng": torch.get_rng_state(), "auc": {"a": 0.7}})
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain values only
    assert set(ckpt) == set(checkpoints.KEYS) | {"extra"}
    assert ckpt["args"] == {"out": str(Path("out") / stage), "lr": 1e-4, "crop": [32, 64, 64]}
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]

    again, ckpt2 = checkpoints.model_from_checkpoint(path, stage=stage, label_names=["a", "b", "c"])
    assert ckpt2["step"] == 7 and ckpt2["best_metric"] == 0.5
    again.eval()
    with torch.no_grad():
        got = again(*_inputs(stage, tok))
    as_tuple = lambda out: out if isinstance(out, tuple) else (out,)  # noqa: E731
    for g, e in zip(as_tuple(got), as_tuple(expected), strict=True):
        assert torch.equal(g, e)
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-4)
    opt2.load_state_dict(ckpt2["optimizer"])


def test_load_encoders_from_pretraining(scratch_text, tmp_path):
    _, tok, cfg = scratch_text
    configs = _configs(cfg)
    paths = {}
    for stage in ("vision", "text"):
        net = M.build_model(configs[stage])
        paths[stage] = checkpoints.save_checkpoint(tmp_path / f"{stage}.pt", stage=stage, model=net,
                                         model_config=configs[stage], args={}, label_names=["a", "b", "c"])
    aligned = M.build_model(configs["align"])
    for stage, path in paths.items():
        ckpt = checkpoints.load_checkpoint(path, stage=stage)
        assert M.load_pretrained_encoder(aligned, ckpt, stage, where=path) == stage
        part = getattr(aligned, stage).state_dict()
        for k, v in part.items():
            assert torch.equal(v, ckpt["model"]["encoder." + k])
    # A vision encoder of another width does not fit: loud DataError naming the file.
    other = dict(configs["align"], vision=dict(TINY_VISION, widths=[8, 16, 32, 32]))
    with pytest.raises(DataError, match="vision.pt: weights do not fit"):
        M.load_pretrained_encoder(M.build_model(other), checkpoints.load_checkpoint(paths["vision"]), where=paths["vision"])
    with pytest.raises(DataError, match="expected a 'text' pre-trained checkpoint, found a 'vision'"):
        M.load_pretrained_encoder(aligned, checkpoints.load_checkpoint(paths["vision"]), "text")


def test_atomic_save_keeps_old_file(scratch_text, tmp_path, monkeypatch):
    net = M.build_model({"kind": "vision", "num_labels": 2, "vision": TINY_VISION})
    kw = dict(stage="vision", model=net, model_config={"kind": "vision", "num_labels": 2, "vision": TINY_VISION},
              args={}, label_names=["a", "b"])
    path = checkpoints.save_checkpoint(tmp_path / "last.pt", step=1, **kw)
    before = path.read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(M.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint(path, step=2, **kw)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert checkpoints.load_checkpoint(path)["step"] == 1


def test_checkpoint_errors_name_the_file(scratch_text, tmp_path):
    net = M.build_model({"kind": "vision", "num_labels": 2, "vision": TINY_VISION})
    path = checkpoints.save_checkpoint(tmp_path / "vision.pt", stage="vision", model=net, args={}, label_names=["a", "b"],
                             model_config={"kind": "vision", "num_labels": 2, "vision": TINY_VISION})
    (tmp_path / "garbage.pt").write_text("not a checkpoint\n")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    cases = [
        (dict(path=path, stage="text"), "vision.pt: expected a 'text' checkpoint, found a 'vision'"),
        (dict(path=path, label_names=["a", "c"]), "vision.pt: label set differs"),
        (dict(path=path, label_names=["a"]), "vision.pt: label set differs"),
        (dict(path=tmp_path / "garbage.pt"), "garbage.pt: not a readable checkpoint"),
        (dict(path=tmp_path / "cut.pt"), "cut.pt: not a readable checkpoint"),
        (dict(path=tmp_path / "other.pt"), "other.pt: not a GreenRFM checkpoint"),
        (dict(path=tmp_path / "missing.pt", stage="align"), "missing.pt: no such file"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message) as err:
            checkpoints.load_checkpoint(**kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="vision.pt"):
        checkpoints.model_from_checkpoint(path, stage="align")
