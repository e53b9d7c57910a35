"""The GreenRFM method: the aligned model, its losses and the zero-shot score first; then the pre-training model, and
how models are built from plain dicts and loaded.

    GreenRFM            both encoders, a projection each (no bias) into one 768-d space, and ONE classifier shared by
                        the image and the text latents (stage 3); align.py's ablation switches (ALIGN_SWITCHES, clip_scale)
    masked_bce, clip_loss, align_loss   the losses: BCE without the uncertain and unmentioned labels; CLIP on raw dot
                        products at temperature 1; stage 3's sum of the two
    PROMPT_TEMPLATES, zero_shot_scores   zero-shot diagnosis: softmax over the dot products with a positive and a
                        negative prompt (zero_shot_logits, prompt_latents, text_latents); AUCs rank the logits, since a
                        float32 sigmoid is exactly 1.0 beyond a logit of about 17
    EncoderClassifier   encoder + linear head to the labels: the model of pre-training (stages 2a and 2b); the
                        image pooling of Fig. 4d (noisy_or_logits, noisy_or_bias)
    build_model         any of the above from a plain dict (model_config), so checkpoints rebuild themselves
    greenrfm_from_pretrained, init_shared_from_heads   how stage 3 starts from the two pre-trained models
    load_pretrained_encoder, load_state_strict, unwrap   weights into a model (checkpoints.py reads the files)
    sentence_alignment  how well report sentences about the labels, and the others, find their volume (Fig. 3c)

The encoders themselves (ResNet3D, TextEncoder, build_text, tokenizer_from_cfg) are encoders.py's; they are imported
here, so a stage script needs `import model as M` alone.

Shapes: B batch, C labels (of logits), E the shared space's size, D/H/W volume axes, L tokens, H text hidden size.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import DataError
from encoders import POOLINGS, ResNet3D, TextEncoder, build_text, tokenizer_from_cfg  # noqa: F401 (M.build_text etc.)

STAGES = ("vision", "text", "align")
# align.py's ablation switches as model_config keys, at the recipe's values (what a checkpoint without them means)
ALIGN_SWITCHES = {"shared_classifier": True, "l2_norm": False, "joint_heads": False}
IMAGE_POOLINGS = ("gap", "max", "noisy_or")  # how stage 2a's head reads the feature map: the paper's GAP, or Fig. 4d's others


# ----------------------------------------------------------------------------------------------
# The method (stage 3): both encoders in one space, read by one shared classifier

class GreenRFM(nn.Module):
    """Both encoders projected to a shared space, one classifier for both latents; no L2 normalisation (raw dot products).
    align.py's ablations (ALIGN_SWITCHES): shared_classifier=False leaves it out (None; Fig. 4a); l2_norm=True makes
    the latents unit length, with CLIP's learnable temperature (Fig. 4e); joint_heads=True adds each encoder's
    pre-training head (2a, 2b) to the labels, trained in the same step as the alignment (Fig. 3e/f)."""

    def __init__(self, vision, text, num_labels, embed_dim=768, shared_classifier=True, l2_norm=False, joint_heads=False):
        super().__init__()
        self.vision, self.text, self.l2_norm, self.joint_heads = vision, text, l2_norm, joint_heads
        self.img_proj = nn.Linear(vision.out_dim, embed_dim, bias=False)
        self.txt_proj = nn.Linear(text.out_dim, embed_dim, bias=False)
        self.classifier = nn.Linear(embed_dim, num_labels) if shared_classifier else None  # same label semantics in both
        if l2_norm:  # a cosine lies in [-1, 1]: at temperature 1 the CLIP softmax could hardly tell pairs apart
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if joint_heads:
            self.vision_head, self.text_head = nn.Linear(vision.out_dim, num_labels), nn.Linear(text.out_dim, num_labels)

    def image_latent(self, feature):
        return self.unit(self.img_proj(feature))  # the pooled feature (B, 512) -> (B, 768)

    def unit(self, z):
        return F.normalize(z, dim=-1) if self.l2_norm else z

    def encode_image(self, x):
        return self.image_latent(self.vision(x))  # (B, K windows, D, H, W) -> (B, 512) -> (B, 768)

    def encode_text(self, input_ids, attention_mask):
        return self.unit(self.txt_proj(self.text(input_ids, attention_mask)))  # (B, L) -> (B, H) -> (B, 768)

    def forward(self, x, input_ids, attention_mask):
        """-> (img, txt, img_logits, txt_logits) for align_loss (the logits None without the shared classifier), then
        with joint heads the vision and text heads' logits (B, C); one call for both towers keeps DDP's hooks simple."""
        feat = self.vision(x)  # (B, 512)
        img = self.image_latent(feat)  # (B, 768)
        hid = self.text(input_ids, attention_mask)  # (B, H)
        txt = self.unit(self.txt_proj(hid))  # (B, 768)
        out = (img, txt, *((self.classifier(img), self.classifier(txt)) if self.classifier is not None else (None, None)))
        return out + ((self.vision_head(feat), self.text_head(hid)) if self.joint_heads else ())


def clip_scale(model):
    """What multiplies the latents' dot products in clip_loss: None (1) in the recipe; with --l2-norm, exp(logit_scale)
    capped at 100, as in CLIP."""
    return model.logit_scale.exp().clamp(max=100) if getattr(model, "l2_norm", False) else None


# ----------------------------------------------------------------------------------------------
# Losses

def masked_bce(logits, targets, mask):
    """Mean BCE-with-logits over the entries where mask is 1; logits, targets, mask all (B, C).

    Masked entries (uncertain -1 or not mentioned NaN) are replaced by 0 before the BCE, so whatever
    they hold cannot change the loss or any gradient (NaN * 0 would still be NaN)."""
    targets = torch.where(mask > 0, targets, torch.zeros_like(targets))
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (bce * mask).sum() / mask.sum().clamp(min=1)


def clip_loss(img, txt, scale=None):
    """Symmetric InfoNCE on raw dot products, temperature 1: img, txt (B, E); pair i matches pair i. scale (a tensor):
    the dot products multiplied by it first (CLIP's learnable 1 / temperature: --l2-norm's, clip_scale)."""
    # Unnormalised 768-d latents give large dot products: compute them in float32 even under autocast.
    with torch.autocast(device_type=img.device.type, enabled=False):
        sim = img.float() @ txt.float().T  # (B, B): row i = image i against every report
        if scale is not None:
            sim = scale.float() * sim
        labels = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2


def align_loss(img, txt, img_logits, txt_logits, targets, mask, scale=None, heads=()):
    """Stage-3 loss: clip + (masked BCE of the image logits + of the text logits) / 2. align.py's switches:
    img_logits = txt_logits = None without the shared classifier (Fig. 4a): the CLIP loss alone; scale: see clip_loss
    (Fig. 4e); heads = (vision head logits, text head logits) of --joint (Fig. 3e/f): + (BCE + BCE) / 2, each encoder's
    pre-training loss in the same step. -> (total, {"clip", "bce_img", "bce_txt", ...}); the parts detached, for logging."""
    parts = {"clip": clip_loss(img, txt, scale)}
    total = parts["clip"]
    if img_logits is not None:
        parts |= {"bce_img": masked_bce(img_logits.float(), targets, mask), "bce_txt": masked_bce(txt_logits.float(), targets, mask)}
        total = total + (parts["bce_img"] + parts["bce_txt"]) / 2
    if heads:
        parts |= {f"bce_{k}_head": masked_bce(h.float(), targets, mask) for k, h in zip(("vision", "text"), heads)}
        total = total + (parts["bce_vision_head"] + parts["bce_text_head"]) / 2
    return total, {k: v.detach() for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------
# Zero-shot diagnosis (align.py's validation, evaluate.py and scan.py)

# Prompt pairs (positive, negative) per template; "{x}" is the label name, lowercased, "_" -> " ".
# "there_is" is the default; "present" is the CT-CLIP protocol.
PROMPT_TEMPLATES = {
    "not": ("{x}.", "not {x}."),
    "empty": ("{x}.", ""),
    "there_is": ("There is {x}.", "There is no {x}."),
    "present": ("{x} is present.", "{x} is not present."),
    "compatible": ("Findings are compatible with {x}.", "Findings are not compatible with {x}."),
}


def zero_shot_scores(img_lat, prompt_lat):
    """Positive probability per label -> (N, C): softmax over the pair of raw dot products
    [img . pos, img . neg] (= sigmoid of their difference). Raw dot products, as in training. A probability to show,
    not to rank by: in float32 it is exactly 1.0 beyond a difference of about 17, so rank by zero_shot_logits."""
    logits = torch.einsum("nd,cpd->ncp", img_lat.float(), prompt_lat.float())  # (N, C, 2)
    return logits.softmax(dim=-1)[..., 0]


def zero_shot_logits(img_lat, prompt_lat):
    """(N, C): img . pos - img . neg, the logit whose sigmoid is zero_shot_scores (temperature scaling divides it)."""
    return torch.einsum("nd,cd->nc", img_lat.float(), (prompt_lat[:, 0] - prompt_lat[:, 1]).float())


def prompt_latents(model, tokenizer, label_names, template, max_len, device):
    """Text latents of each label's positive and negative prompt -> (C, 2, 768), once for all volumes; template is
    a PROMPT_TEMPLATES key or a (positive, negative) pair."""
    pos, neg = PROMPT_TEMPLATES[template] if isinstance(template, str) else template
    # "Pleural effusion" -> "There is pleural effusion."; "renal_cyst" -> "There is renal cyst."
    texts = [t.format(x=n.lower().replace("_", " ")) for n in label_names for t in (pos, neg)]  # 2C prompts
    lat = text_latents(model, tokenizer, texts, max_len, device)
    return lat.view(len(label_names), 2, -1)  # (C, 2, 768): [:, 0] positive, [:, 1] negative


@torch.no_grad()
def text_latents(model, tokenizer, texts, max_len, device, batch=256):
    """Latents of a list of texts -> (N, 768), `batch` at a time, in eval mode so dropout does not perturb them. An
    L2-normalised model's (--l2-norm) come multiplied by its CLIP scale: img . latent is then the logit it trained on."""
    was_training, scale = model.training, clip_scale(model)
    model.eval()
    out = []
    for k in range(0, len(texts), batch):
        enc = tokenizer(texts[k:k + batch], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        lat = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float()
        out.append(lat if scale is None else lat * scale)
    model.train(was_training)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Pre-training (stages 2a and 2b): one encoder + a linear head to the labels

class EncoderClassifier(nn.Module):
    """Encoder + Linear(out_dim, C): forward(*inputs) -> logits (B, C). Inputs: a volume, or (ids, mask).
    image_pooling (Fig. 4d): the head read at each cell v of a ResNet3D's map gives class scores s_{c,v}; "gap" (the
    recipe; the head is affine) is their mean, "max" their maximum (scores, not features: one set of scores pooled three
    ways), "noisy_or" P_c = 1 - prod_v (1 - sigmoid(s_{c,v})): present unless every cell says absent."""

    def __init__(self, encoder, num_labels, image_pooling="gap"):
        super().__init__()
        self.encoder, self.image_pooling = encoder, image_pooling
        self.head = nn.Linear(encoder.out_dim, num_labels)
        if image_pooling not in IMAGE_POOLINGS:
            raise ValueError(f"image pooling {image_pooling!r} is not one of {IMAGE_POOLINGS}")

    def forward(self, *inputs):
        if self.image_pooling == "gap":
            return self.head(self.encoder(*inputs))
        s = self.head(self.encoder.features(*inputs).flatten(2).transpose(1, 2))  # (B, N cells, C) per-cell scores
        return s.amax(dim=1) if self.image_pooling == "max" else noisy_or_logits(s, dim=1)


def noisy_or_logits(scores, dim):
    """The logit of P = 1 - prod_v (1 - sigmoid(s_v)) over `dim`, in log space: log(1 - P) = -sum_v softplus(s_v) =: -L,
    so logit(P) = log(P) - log(1 - P) = log(1 - e^-L) + L. A product of hundreds of factors would round to 0 or 1."""
    L = F.softplus(scores.float()).sum(dim).clamp(min=torch.finfo(torch.float32).tiny)  # all cells far below 0: P -> 0
    return torch.log(-torch.expm1(-L)) + L


def noisy_or_bias(cells, start=0.5):
    """The head bias at which Noisy-OR over `cells` cells scoring it starts at P = start: sigmoid(b) = 1 - (1 - start)^(1/N).
    A bias near 0 would start every label at P = 1 - 2^-N, saturated for hundreds of cells (864 on the chest model)."""
    q = -math.expm1(math.log1p(-start) / cells)
    return math.log(q) - math.log1p(-q)


# ----------------------------------------------------------------------------------------------
# Models from plain dicts (checkpoints rebuild themselves), and how stage 3 starts from the pre-trained models

def build_model(model_config):
    """Build a model from its plain-dict description (what every checkpoint stores as "model_config")."""
    kind, num_labels = model_config["kind"], model_config["num_labels"]
    if kind == "vision":  # (checkpoints older than the pooling switch pooled by GAP)
        return EncoderClassifier(ResNet3D(**model_config["vision"]), num_labels, model_config.get("image_pooling", "gap"))
    if kind == "text":
        return EncoderClassifier(TextEncoder(model_config["text"]), num_labels)
    if kind == "align":
        return GreenRFM(ResNet3D(**model_config["vision"]), TextEncoder(model_config["text"]), num_labels,
                        model_config.get("embed_dim", 768), **{k: model_config.get(k, v) for k, v in ALIGN_SWITCHES.items()})
    raise ValueError(f"unknown model kind {kind!r}; expected one of {STAGES}")


def greenrfm_from_pretrained(num_labels, embed_dim, vision_ckpt=None, text_ckpt=None, vision_cfg=None, text_encoder=None,
                             switches=None):
    """Stage 3 starts from the two pre-trained models -> (GreenRFM, model_config). vision_ckpt / text_ckpt: the
    checkpoints of stages 2a / 2b (checkpoints.load_checkpoint's dicts): the architecture is rebuilt from each one's
    model_config and its encoder copied in strictly (its head is not: see init_shared_from_heads). Without a
    checkpoint, vision_cfg (a ResNet3D config: random weights) or text_encoder (from build_text) is the start.
    switches: align.py's ablations (ALIGN_SWITCHES' keys), recorded in model_config."""
    model_config = {"kind": "align", "num_labels": num_labels, "embed_dim": embed_dim,
                    "vision": vision_ckpt["model_config"]["vision"] if vision_ckpt else vision_cfg,
                    "text": text_ckpt["model_config"]["text"] if text_ckpt else text_encoder.cfg,
                    **ALIGN_SWITCHES, **(switches or {})}
    model = build_model(model_config)
    if text_ckpt is None:  # e.g. CXR-BERT's own weights, or a scratch BERT
        model.text.load_state_dict(text_encoder.state_dict())
    for part, ckpt in (("vision", vision_ckpt), ("text", text_ckpt)):
        if ckpt is not None:
            load_pretrained_encoder(model, ckpt, part, where=ckpt.get("path"))
    return model, model_config


@torch.no_grad()
def init_shared_from_heads(model, vision_head, text_head, scale=0.1, seed=0):
    """--init-shared heads: start the projections and the shared classifier from the two pre-trained heads, given as
    (weight, bias) pairs: (H_img (C, 512), b_img (C,)) and (H_txt (C, H), b_txt (C,)). With A (E, C) orthonormal
    columns and a = scale:
        img_proj = a A H_img,  txt_proj = a A H_txt,  classifier = A^T / a,  bias = (b_img + b_txt) / 2
    The weights give back each head's (A^T A = I), but one bias cannot be both heads' biases, so
        classifier(img_proj(f)) = H_img f + b_img + (b_txt - b_img) / 2    (the text side: swap img and txt)
    each head's logits shifted by half the difference of the two biases: a constant per label, so every label ranks
    the volumes as the vision head did (tests/test_model.py checks the shift). An image-text dot product starts as
    a^2 (H_img f) . (H_txt h): zero-shot begins from what both heads know. A small a keeps those products moderate
    for the temperature-1 CLIP loss; its gradient then widens the rank-C space. Needs E >= C."""
    (h_img, b_img), (h_txt, b_txt) = vision_head, text_head
    E, C = model.img_proj.out_features, h_img.shape[0]
    if C > E:
        raise ValueError(f"--init-shared heads needs --embed-dim >= the {C} labels")
    A = torch.linalg.qr(torch.randn(E, C, generator=torch.Generator().manual_seed(seed)))[0]  # (E, C)
    model.img_proj.weight.copy_(scale * A @ h_img.float())  # (E, 512)
    model.txt_proj.weight.copy_(scale * A @ h_txt.float())  # (E, H)
    if model.classifier is not None:  # (--no-shared-classifier: the projections alone)
        model.classifier.weight.copy_(A.T / scale)  # (C, E)
        model.classifier.bias.copy_((b_img + b_txt).float() / 2)


# ----------------------------------------------------------------------------------------------
# Weights into a model, strictly (checkpoints.py writes and reads the files that hold them)

def unwrap(model):
    """The plain module inside DistributedDataParallel (.module) and/or torch.compile (._orig_mod)."""
    while hasattr(model, "_orig_mod") or isinstance(getattr(model, "module", None), nn.Module):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def load_state_strict(module, state, where):
    """module.load_state_dict(state, strict=True); a key or shape that does not fit is one line naming `where`."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise DataError(f"{where}: weights do not fit the model ({' '.join(lines[1:3])[:300]})") from None


def load_pretrained_encoder(model, ckpt, part=None, where=None):
    """Copy a pre-trained encoder (ckpt["model"]["encoder.*"]) into GreenRFM's .vision or .text, strictly; part defaults
    to the checkpoint's stage, `where` (the file) names it in errors. The head is dropped (stage 3 has its own). An
    aligned checkpoint gives its ["vision.*"] or ["text.*"] (encoders trained on reports alone: align.py, Fig. 4c)."""
    part = part or ckpt["stage"]
    where = where or f"pre-trained {part} checkpoint"
    if part not in ("vision", "text") or ckpt["stage"] not in (part, "align"):
        raise DataError(f"{where}: expected a {part!r} pre-trained checkpoint, found a {ckpt['stage']!r} checkpoint")
    prefix = f"{part}." if ckpt["stage"] == "align" else "encoder."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    load_state_strict(getattr(unwrap(model), part), state, where)
    return part


# ----------------------------------------------------------------------------------------------
# Fig. 3c's sentence alignment

def sentence_alignment(model, tokenizer, img_lat, reports, related, max_len, device):
    """Alignment selectivity (Fig. 3c): the alignment loss of report sentences about the labels against the others (the
    spine, "Comparison: none."). img_lat (N, E): image latents of the N volumes of `reports`; related(sentence) -> bool
    (e.g. rules.py's labeler finds a label in it). Sentence s of report i: -log softmax_j(t * s . img_j)[i], the text ->
    image half of clip_loss; chance is log N.

    Why a fitted t: a single sentence is not what alignment trained on (whole reports), and raw dot products put its
    logits at whatever scale its latent has, so at t = 1 a confident wrong match costs tens of nats and the scale, not
    the alignment, decides the mean. One t > 0 per model, the one that minimises the mean loss over all its sentences
    together (the loss is convex in t; a grid over log t), puts models on one footing and never rises above chance
    (t -> 0 gives log N). The t = 1 losses are kept as raw_related / raw_unrelated.
    -> {"related", "unrelated" (mean at the fitted t, or None), "raw_related", "raw_unrelated", "t", "n_related",
    "n_unrelated", "chance"}."""
    sents = [(i, t) for i, r in enumerate(reports) for t in re.split(r"(?<=[.!?])\s+|\n+", r) if t.strip()]
    sim = text_latents(model, tokenizer, [t for _, t in sents], max_len, device) @ img_lat.float().to(device).T  # (S, N)
    own = torch.tensor([i for i, _ in sents], device=sim.device)
    grid = torch.logspace(-6, 2, 801, dtype=torch.float64).tolist()  # t from 1e-6 to 100, 100 steps a decade
    t = min(grid, key=lambda g: F.cross_entropy(sim.double() * g, own).item())
    about = torch.tensor([bool(related(s)) for _, s in sents])
    out = {"chance": math.log(len(reports)), "t": t}
    for prefix, scale in (("", t), ("raw_", 1.0)):
        loss = F.cross_entropy(sim.double() * scale, own, reduction="none").cpu()  # (S,)
        for key, pick in (("related", about), ("unrelated", ~about)):
            out[prefix + key] = loss[pick].mean().item() if pick.any() else None
    return out | {"n_related": int(about.sum()), "n_unrelated": int((~about).sum())}
