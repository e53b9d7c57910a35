"""Issue 29's switches (the paper's ablations), each checked to do what it says, against hand-computed values where
there is a formula: the shared classifier left out (Fig. 4a), L2-normalised latents (Fig. 4e), Noisy-OR and max pooling
(Fig. 4d), joint training (Fig. 3e/f), a fraction of the training split (Fig. 3a), encoders from an aligned checkpoint
(Fig. 4c), the sentence alignment measure (Fig. 3c); that the defaults build the recipe, old checkpoints included; and
one toy align.py run with the switches on, then evaluated and scanned, where the model has no shared classifier."""
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import checkpoints
import common
import data as D
import model as M
from conftest import run_script

REPORTS = ["Pleural effusion is present. The spine is unremarkable.", "No emphysema. Axillary regions are unremarkable."] * 20
TINY_VISION = {"in_channels": 1, "stem": 4, "widths": [8, 8, 8, 8]}


@pytest.fixture(scope="module")
def text_cfg():
    _, _, cfg = M.build_text("scratch", REPORTS, max_len=32)
    return dict(cfg, bert=dict(cfg["bert"], hidden_size=16, intermediate_size=32))  # tiny, fast


def align_config(text_cfg, **switches):
    return {"kind": "align", "num_labels": 3, "embed_dim": 8, "vision": TINY_VISION, "text": text_cfg, **switches}


def inputs(text_cfg, b=2):
    tok = M.tokenizer_from_cfg(text_cfg)
    enc = tok(REPORTS[:b], padding=True, return_tensors="pt")
    return torch.randn(b, 1, 16, 16, 16), enc["input_ids"], enc["attention_mask"]


def hand_ce(row, target):
    """-log softmax(row)[target], in plain Python."""
    return -(row[target] - math.log(sum(math.exp(v) for v in row)))


def hand_clip(img, txt, scale=1.0):
    sim = [[scale * sum(a * b for a, b in zip(i, t)) for t in txt] for i in img]
    n = len(sim)
    return (sum(hand_ce(sim[i], i) for i in range(n)) / n + sum(hand_ce([sim[j][i] for j in range(n)], i) for i in range(n)) / n) / 2


# ---------------------------------------------------------------------------- the recipe is the default

def test_defaults_build_the_recipe_and_old_checkpoints_still_mean_it(text_cfg):
    """No switch in model_config (a checkpoint from before them) and every switch at its default give the same
    parameters, created in the same order from the same random numbers: the first command's figures cannot move."""
    torch.manual_seed(0)
    old = M.build_model(align_config(text_cfg))
    torch.manual_seed(0)
    new = M.build_model(align_config(text_cfg, **M.ALIGN_SWITCHES))
    names = [n for n, _ in old.named_parameters()]
    assert names == [n for n, _ in new.named_parameters()]
    assert names[-4:] == ["img_proj.weight", "txt_proj.weight", "classifier.weight", "classifier.bias"]
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    assert M.clip_scale(old) is None and not hasattr(old, "logit_scale") and not old.joint_heads
    assert M.build_model({"kind": "vision", "num_labels": 3, "vision": TINY_VISION}).image_pooling == "gap"
    # greenrfm_from_pretrained writes the switches into model_config, at the recipe's values unless told otherwise
    _, cfg = M.greenrfm_from_pretrained(3, 8, vision_cfg=TINY_VISION, text_encoder=M.TextEncoder(text_cfg))
    assert {k: cfg[k] for k in M.ALIGN_SWITCHES} == M.ALIGN_SWITCHES


def test_switched_models_rebuild_from_their_checkpoint(text_cfg, tmp_path):
    """Each switch that changes the architecture is in model_config: the file alone rebuilds the model (strict load)."""
    for cfg in (align_config(text_cfg, shared_classifier=False, l2_norm=True, joint_heads=True),
                {"kind": "vision", "num_labels": 3, "vision": TINY_VISION, "image_pooling": "noisy_or"}):
        net = M.build_model(cfg)
        path = checkpoints.save_checkpoint(tmp_path / f"{cfg['kind']}.pt", stage=cfg["kind"], model=net, model_config=cfg,
                                           args={}, label_names=["a", "b", "c"])
        back, _ = checkpoints.model_from_checkpoint(path)
        assert list(back.state_dict()) == list(net.state_dict())
    assert back.image_pooling == "noisy_or"


# ---------------------------------------------------------------------------- Fig. 4a: no shared classifier

def test_without_the_shared_classifier_there_is_none_and_the_loss_is_clip(text_cfg):
    with_clf = M.build_model(align_config(text_cfg))
    net = M.build_model(align_config(text_cfg, shared_classifier=False))
    assert net.classifier is None and not any("classifier" in n for n, _ in net.named_parameters())
    assert sum(p.numel() for p in with_clf.parameters()) - sum(p.numel() for p in net.parameters()) == 8 * 3 + 3
    img, txt, li, lt = net(*inputs(text_cfg))
    assert li is None and lt is None and img.shape == (2, 8)
    # On hand values: the total is the CLIP loss alone, and only the CLIP part is logged.
    i, t = [[1.0, 0.0], [0.5, 2.0]], [[2.0, 1.0], [0.0, 1.0]]
    y, m = torch.ones(2, 3), torch.ones(2, 3)
    total, parts = M.align_loss(torch.tensor(i), torch.tensor(t), None, None, y, m)
    assert math.isclose(total.item(), hand_clip(i, t), rel_tol=1e-6) and list(parts) == ["clip"]


# ---------------------------------------------------------------------------- Fig. 4e: L2-normalised latents

def test_l2_normalised_latents_have_unit_norm_and_clips_temperature(text_cfg):
    net = M.build_model(align_config(text_cfg, l2_norm=True)).eval()
    x, ids, att = inputs(text_cfg)
    img, txt, _, _ = net(x, ids, att)
    for z in (img, txt, net.encode_image(x), net.encode_text(ids, att)):
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(2))
    assert math.isclose(M.clip_scale(net).item(), 1 / 0.07, rel_tol=1e-5)  # CLIP's start
    assert M.build_model(align_config(text_cfg)).encode_image(x).norm(dim=-1).sub(1).abs().max() > 1e-3  # the recipe's are not
    # The loss multiplies the dot products by the scale, on hand values; the scale is capped at 100 as in CLIP.
    i, t = [[0.6, 0.8], [1.0, 0.0]], [[0.0, 1.0], [0.8, 0.6]]
    total, _ = M.align_loss(torch.tensor(i), torch.tensor(t), None, None, None, None, scale=torch.tensor(1 / 0.07))
    assert math.isclose(total.item(), hand_clip(i, t, 1 / 0.07), rel_tol=1e-5)
    with torch.no_grad():
        net.logit_scale.fill_(10.0)
    assert M.clip_scale(net).item() == 100.0
    # Zero-shot uses the normalised latents at the same scale: prompt latents come multiplied by it.
    tok = M.tokenizer_from_cfg(text_cfg)
    prompts = M.prompt_latents(net, tok, ["effusion"], "there_is", 32, "cpu")  # (1, 2, 8)
    torch.testing.assert_close(prompts.norm(dim=-1), torch.full((1, 2), 100.0))


# ---------------------------------------------------------------------------- Fig. 4d: image pooling

class MapEncoder(nn.Module):
    """A stand-in encoder whose feature map is given: features() (B, F, 2, 2, 2), forward its average."""

    def __init__(self, fmap):
        super().__init__()
        self.fmap, self.out_dim = fmap, fmap.shape[1]

    def features(self, x):
        return self.fmap

    def forward(self, x):
        return self.fmap.mean(dim=(2, 3, 4))


def test_noisy_or_and_max_match_a_hand_computation_on_a_2x2x2_map():
    fmap = torch.tensor([0.5, -1.0, 2.0, 0.0, -3.0, 1.5, 0.25, -0.5]).view(1, 1, 2, 2, 2)  # one channel, 8 cells
    w, b = [2.0, -1.0], [-1.0, 0.5]  # head: two labels, score_c = w_c f + b_c
    cells = fmap.flatten().tolist()
    for pooling in M.IMAGE_POOLINGS:
        net = M.EncoderClassifier(MapEncoder(fmap), 2, pooling)
        with torch.no_grad():
            net.head.weight.copy_(torch.tensor(w)[:, None])
            net.head.bias.copy_(torch.tensor(b))
        got = net(None)[0]  # (2,)
        for c in range(2):
            s = [w[c] * f + b[c] for f in cells]
            if pooling == "noisy_or":
                p = 1 - math.prod(1 - 1 / (1 + math.exp(-v)) for v in s)
                assert math.isclose(torch.sigmoid(got[c]).item(), p, rel_tol=1e-5)
            else:  # gap: the mean of the per-cell scores (the head is affine); max: their maximum
                assert math.isclose(got[c].item(), (sum(s) / 8) if pooling == "gap" else max(s), rel_tol=1e-5, abs_tol=1e-6)


def test_noisy_or_does_not_saturate_at_initialisation():
    """Over hundreds of cells a bias near 0 starts every label at P ~ 1 (BCE of the negatives huge); the bias that
    pretrain_vision.py sets starts it near 1/2. The log-space form stays finite either way."""
    torch.manual_seed(0)
    enc = M.ResNet3D(in_channels=1, stem=1, widths=(8, 8, 8, 8))
    x = torch.randn(2, 1, 48, 48, 48)
    assert enc.cells((48, 48, 48)) == 216 == math.prod(enc.features(x).shape[2:])  # 6 x 6 x 6 cells
    assert [M.ResNet3D(stem=s, widths=(8, 8, 8, 8)).cells(c) for s, c in ((4, (24, 48, 48)), (2, (96, 192, 192)))] == [4, 864]
    net = M.EncoderClassifier(enc, 3, "noisy_or").eval()
    with torch.no_grad():
        net.head.bias.zero_()
        assert torch.sigmoid(net(x)).min() > 0.999 and torch.isfinite(net(x)).all()  # saturated
        nn.init.constant_(net.head.bias, M.noisy_or_bias(enc.cells((48, 48, 48))))
        p = torch.sigmoid(net(x))
    assert ((p > 0.2) & (p < 0.9)).all(), p
    # By construction: every one of N cells scoring the bias gives P = 1/2 exactly, and the logit is finite far out.
    for n in (4, 216, 864):
        assert math.isclose(torch.sigmoid(M.noisy_or_logits(torch.full((n,), M.noisy_or_bias(n)), 0)).item(), 0.5, rel_tol=1e-4)
    assert torch.isfinite(M.noisy_or_logits(torch.tensor([[-200.0, -150.0], [60.0, 80.0]]), 1)).all()


# ---------------------------------------------------------------------------- Fig. 3e/f: joint training

def test_joint_training_adds_each_encoders_head_to_the_loss(text_cfg):
    net = M.build_model(align_config(text_cfg, joint_heads=True)).eval()
    x, ids, att = inputs(text_cfg)
    img, txt, li, lt, hv, ht = net(x, ids, att)
    torch.testing.assert_close(hv, net.vision_head(net.vision(x)))  # the encoders' own features, before projection
    torch.testing.assert_close(ht, net.text_head(net.text(ids, att)))
    # loss = clip + (BCE(shared, image) + BCE(shared, text)) / 2 + (BCE(vision head) + BCE(text head)) / 2, by hand
    y, m = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logits = [torch.tensor([[0.5, -1.0, 9.0], [2.0, 0.0, -0.5]]) * k for k in (1, 2, -1, 3)]

    def bce(z):  # masked mean over the 5 known entries
        return sum(math.log1p(math.exp(-z[r][c])) if y[r][c] == 1 else math.log1p(math.exp(z[r][c]))
                   for r in range(2) for c in range(3) if m[r][c]) / 5
    i, t = [[1.0, 0.0], [0.5, 2.0]], [[2.0, 1.0], [0.0, 1.0]]
    total, parts = M.align_loss(torch.tensor(i), torch.tensor(t), *logits[:2], y, m, heads=logits[2:])
    b = [bce(z.tolist()) for z in logits]
    assert math.isclose(total.item(), hand_clip(i, t) + (b[0] + b[1]) / 2 + (b[2] + b[3]) / 2, rel_tol=1e-6)
    assert list(parts) == ["clip", "bce_img", "bce_txt", "bce_vision_head", "bce_text_head"]


# ---------------------------------------------------------------------------- Fig. 4c: encoders from an aligned run

def test_encoders_load_from_an_aligned_checkpoint(text_cfg, tmp_path):
    """The 'visual descriptions' arm: pre-training is a CLIP-only alignment run, whose encoders the recipe's stage 3
    starts from (align.py --encoders-from); a pre-training checkpoint of the other encoder is still refused."""
    cfg = align_config(text_cfg, shared_classifier=False)
    first = M.build_model(cfg)
    path = checkpoints.save_checkpoint(tmp_path / "clip.pt", stage="align", model=first, model_config=cfg, args={},
                                       label_names=["a", "b", "c"])
    ck = checkpoints.load_checkpoint(path)
    second, _ = M.greenrfm_from_pretrained(3, 8, ck, ck)
    for part in ("vision", "text"):
        for k, v in getattr(second, part).state_dict().items():
            assert torch.equal(v, first.state_dict()[f"{part}.{k}"])
    assert second.classifier is not None  # the recipe's stage 3, with its classifier
    text = checkpoints.save_checkpoint(tmp_path / "text.pt", stage="text", model=M.build_model(
        {"kind": "text", "num_labels": 3, "text": text_cfg}), model_config={"kind": "text", "num_labels": 3, "text": text_cfg},
        args={}, label_names=["a", "b", "c"])
    with pytest.raises(D.DataError, match="expected a 'vision' pre-trained checkpoint, found a 'text'"):
        M.load_pretrained_encoder(second, checkpoints.load_checkpoint(text), "vision")


# ---------------------------------------------------------------------------- Fig. 3a: a fraction of the training split

def toy_table(n_train=16, n_valid=4):
    n = n_train + n_valid
    return D.Table(ids=[f"v{i}" for i in range(n)], images=[None] * n, reports=["r"] * n,
                   splits=["train"] * n_train + ["valid"] * n_valid, label_names=["a"], labels=np.zeros((n, 1), np.float32),
                   meta=[{}] * n, source="toy")


def test_train_fraction_takes_its_share_seeded_and_nested():
    said = []
    take = lambda f, seed: common.take_train_fraction(toy_table(), f, seed, said.append)  # noqa: E731
    quarter = take(0.25, 0)
    assert quarter.splits.count("train") == 4 and quarter.subset("valid").ids == ["v16", "v17", "v18", "v19"]
    assert said[-1] == "train fraction 0.25 (--seed 0): 4 of 16 training rows"
    assert take(0.25, 0).ids == quarter.ids  # the same rows again
    assert take(0.25, 1).subset("train").ids != quarter.subset("train").ids  # another seed, other rows
    ids = {f: set(take(f, 0).subset("train").ids) for f in (0.125, 0.25, 0.5, 1.0)}
    assert [len(v) for v in ids.values()] == [2, 4, 8, 16]
    assert ids[0.125] <= ids[0.25] <= ids[0.5] <= ids[1.0]  # nested
    for bad in (0.0, 1.5, -0.25):
        with pytest.raises(D.UsageError, match="--train-fraction"):
            take(bad, 0)


# ---------------------------------------------------------------------------- Fig. 3c: sentence alignment

class LookupModel(nn.Module):
    """encode_text = a fixed latent per sentence (the tokenizer below gives each sentence its index)."""

    def __init__(self, latents):
        super().__init__()
        self.latents = latents

    def encode_text(self, ids, mask):
        return self.latents[ids[:, 0]]


def test_sentence_alignment_on_hand_values():
    sentences = ["Pleural effusion is present.", "The spine is unremarkable.", "No emphysema.", "Comparison: none."]
    latents = torch.tensor([[2.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])
    tok = lambda texts, **kw: {"input_ids": torch.tensor([[sentences.index(t)] for t in texts]),  # noqa: E731
                               "attention_mask": torch.ones(len(texts), 1)}
    img = [[1.0, 0.0], [0.0, 1.0]]
    reports = [" ".join(sentences[:2]), "\n".join(sentences[2:])]
    got = M.sentence_alignment(LookupModel(latents), tok, torch.tensor(img), reports, lambda s: "emphysema" in s or "effusion" in s,
                               32, "cpu")
    def losses(t):
        return [hand_ce([t * sum(a * b for a, b in zip(latents[k].tolist(), im)) for im in img], owner)
                for k, owner in enumerate([0, 0, 1, 1])]
    raw = losses(1.0)
    assert math.isclose(got["raw_related"], (raw[0] + raw[2]) / 2, rel_tol=1e-6)
    assert math.isclose(got["raw_unrelated"], (raw[1] + raw[3]) / 2, rel_tol=1e-6)
    assert (got["n_related"], got["n_unrelated"], got["chance"]) == (2, 2, math.log(2))
    # the fitted t: the best of the grid, reported at that t, and no worse than t = 1 or chance (t -> 0)
    fit = losses(got["t"])
    assert math.isclose(got["related"], (fit[0] + fit[2]) / 2, rel_tol=1e-6)
    assert math.isclose(got["unrelated"], (fit[1] + fit[3]) / 2, rel_tol=1e-6)
    mean = lambda t: sum(losses(t)) / 4  # noqa: E731
    assert mean(got["t"]) <= min(mean(1.0), mean(1e-6), mean(got["t"] * 1.05), mean(got["t"] / 1.05)) + 1e-9
    assert 0.1 < got["t"] < 1.0  # "Comparison: none." points at the other volume: at t = 1 it costs more than the rest gain


# ---------------------------------------------------------------------------- the scripts, at toy size

def test_help_names_the_figures(monkeypatch, capsys):
    import align
    import pretrain_text
    import pretrain_vision
    for script, figures in ((align, ["Fig. 4a", "Fig. 4b", "Fig. 4c", "Fig. 4e", "Fig. 3e/f", "Fig. 3a"]),
                            (pretrain_vision, ["Fig. 4d", "Fig. 3a"]), (pretrain_text, ["Fig. 4b", "Fig. 3a"])):
        monkeypatch.setattr(sys, "argv", [script.__name__ + ".py", "--help"])
        with pytest.raises(SystemExit):
            script.get_args()
        text = " ".join(capsys.readouterr().out.split())
        assert all(f in text for f in figures), (script.__name__, [f for f in figures if f not in text])


def test_align_with_the_switches_on_then_evaluate_and_scan(tmp_path):
    """One toy run with every align.py switch that changes the model, on half the training split: the checkpoint says
    what it is (no classifier tensors, a CLIP scale, the two heads), and evaluate.py and scan.py read a model without a
    shared classifier, saying so instead of failing."""
    from demo import make_demo
    make_demo(tmp_path / "demo", n_train=8, n_valid=4, n_test=4, seed=0)
    code, out, err = run_script("align.py", "--lite", "--data", tmp_path / "demo", "--epochs", "1", "--batch-size", "4",
                                "--workers", "0", "--out", tmp_path / "out", "--joint", "--l2-norm", "--no-shared-classifier",
                                "--train-fraction", "0.5", cwd=tmp_path)  # align.py's command line, in this process
    assert code == 0, out[-2000:] + err[-2000:]
    r = SimpleNamespace(stdout=out)
    assert "train fraction 0.5 (--seed 0): 4 of 8 training rows" in r.stdout and "training: 1 epochs x 1 steps" in r.stdout
    assert "vision encoder: not pre-trained (--joint)" in r.stdout and "WARNING" not in r.stdout
    assert "ablation, not the recipe: shared_classifier False, l2_norm True, joint_heads True" in r.stdout
    assert "'bce_vision_head'" in r.stdout and "'bce_img'" not in r.stdout  # the logged loss parts
    ck = torch.load(tmp_path / "out/best.pt", weights_only=True)
    assert {k: ck["model_config"][k] for k in M.ALIGN_SWITCHES} == {"shared_classifier": False, "l2_norm": True, "joint_heads": True}
    assert not any(k.startswith("classifier.") for k in ck["model"]) and "logit_scale" in ck["model"]
    assert {"vision_head.weight", "text_head.weight"} <= set(ck["model"]) and ck["extra"]["data"]["train_volumes"] == 4

    rc, out, err = run_script("evaluate.py", "--ckpt", tmp_path / "out/best.pt", "--data", tmp_path / "demo", "--bootstrap", "0",
                              "--workers", "0", "--out", tmp_path / "eval", "--threshold-split", "none", cwd=tmp_path)
    assert rc == 0, err
    assert "no shared classifier" in out and "no classifier" in out.split("operating points on")[1]
    rc, out, err = run_script("scan.py", tmp_path / "demo/volumes/demo_test_0001.nii.gz", "--ckpt", tmp_path / "out/best.pt",
                              "--device", "cpu", cwd=tmp_path)
    assert rc == 0, err
    assert "classifier none" in out and "no shared classifier" in out and "Traceback" not in err
