"""Shared model code for GreenRFM: encoders, the pre-training and aligned models, losses, checkpoints, zero-shot.

Everything the stage scripts share about *models* lives here (data handling lives in data.py):

    ResNet3D            3D ResNet-18 vision encoder, (B, C, D, H, W) -> (B, 512)
    TextEncoder         BERT trunk, [CLS] or sentence-averaged embedding, (B, L) token ids -> (B, H)
    build_text          a text encoder + tokenizer + a plain-dict description (text_cfg)
    EncoderClassifier   encoder + linear head to the labels: the model of pre-training (stages 2a and 2b); the
                        image pooling of Fig. 4d (noisy_or_logits, noisy_or_bias)
    GreenRFM            both encoders, projections to a shared 768-d space, shared classifier (stage 3), and
                        align.py's ablation switches (ALIGN_SWITCHES, clip_scale)
    build_model         any of the above from a plain dict (model_config), so checkpoints rebuild themselves
    greenrfm_from_pretrained, init_shared_from_heads   how stage 3 starts from the two pre-trained models
    masked_bce, clip_loss, align_loss
    load_pretrained_encoder, load_state_strict, unwrap   weights into a model (checkpoints.py reads the files)
    PROMPT_TEMPLATES, text_latents, prompt_latents, zero_shot_scores   zero-shot diagnosis from prompt pairs
    sentence_alignment  how well report sentences about the labels, and the others, find their volume (Fig. 3c)

Shapes: B batch, C channels (or labels for logits), D/H/W volume axes, L tokens, H text hidden size.
"""
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data import DataError

STAGES = ("vision", "text", "align")
# align.py's ablation switches as model_config keys, at the recipe's values (what a checkpoint without them means)
ALIGN_SWITCHES = {"shared_classifier": True, "l2_norm": False, "joint_heads": False}
POOLINGS = ("cls", "sentence", "mean")  # TextEncoder report embeddings: the paper's [CLS], sentence by sentence, all tokens
IMAGE_POOLINGS = ("gap", "max", "noisy_or")  # how stage 2a's head reads the feature map: the paper's GAP, or Fig. 4d's others
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ----------------------------------------------------------------------------------------------
# Vision encoder: 3D ResNet-18 with a patchify stem

class Conv3x3x3(nn.Conv3d):
    """A 3x3x3 conv (padding 1), computed as one matrix product over unfolded patches when it runs on the CPU and its
    output map is tiny (<= 8 voxels a sample: the lite model's last stage, 1x2x2 on the demo crop).

    Same weights, outputs and gradients as nn.Conv3d (tests/test_model.py). Why: on such maps the CPU's conv kernel
    (oneDNN) takes 10-15x longer for the backward pass than for the forward, and the last stage's convs cost a third
    of a lite training step; as a matrix product they cost about 40 % of that (docs/speed-demo.md). GPUs and larger
    maps take the ordinary path.
    """

    def __init__(self, c_in, c_out, stride=1):
        super().__init__(c_in, c_out, 3, stride=stride, padding=1, bias=False)  # BN follows: no bias

    def forward(self, x):
        s = self.stride[0]
        out_shape = [(n - 1) // s + 1 for n in x.shape[2:]]  # (d, h, w) after the conv
        if x.device.type != "cpu" or out_shape[0] * out_shape[1] * out_shape[2] > 8:
            return super().forward(x)
        # im2col: every output voxel's 3x3x3 neighbourhood, (B, C, d, h, w, 3, 3, 3) -> (B*d*h*w, C*27)
        cols = F.pad(x, (1,) * 6).unfold(2, 3, s).unfold(3, 3, s).unfold(4, 3, s)
        cols = cols.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, self.weight[0].numel())
        out = cols @ self.weight.flatten(1).T  # (B*d*h*w, C_out)
        return out.view(x.shape[0], *out_shape, -1).permute(0, 4, 1, 2, 3)  # (B, C_out, d, h, w)


class BasicBlock(nn.Module):
    """Two 3x3x3 convs with a residual connection; (B, C_in, D, H, W) -> (B, C_out, D/s, H/s, W/s)."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = Conv3x3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm3d(c_out)
        self.conv2 = Conv3x3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm3d(c_out)
        # When the shape changes, a 1x1x1 strided conv makes the identity path match.
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm3d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet3D(nn.Module):
    """3D ResNet-18: (B, in_channels, D, H, W) -> (B, 512), about 33 M parameters.

    stem=2 is the standard model, stem=4 the lite one (8x fewer voxels after the stem; the only architectural
    difference). grad_ckpt=True recomputes the stem and each block in the backward pass (less memory). Caveat:
    the recomputation runs BatchNorm a second time, so its running statistics are updated twice per step;
    outputs and gradients are unchanged, only the eval-time statistics drift a little faster.
    """

    def __init__(self, in_channels=1, stem=2, widths=(64, 128, 256, 512), grad_ckpt=False):
        super().__init__()
        self.grad_ckpt = grad_ckpt
        self.out_dim = widths[-1]
        # Patchify stem: non-overlapping stem^3 patches, (B, in, D, H, W) -> (B, 64, D/stem, H/stem, W/stem).
        self.stem = nn.Sequential(nn.Conv3d(in_channels, widths[0], stem, stride=stem, bias=False),
                                  nn.BatchNorm3d(widths[0]), nn.ReLU(inplace=True))
        # Four stages of two blocks; stages 2-4 halve every axis: the standard model on a 96x192x192
        # crop goes 48x96x96 -> 24x48x48 -> 12x24x24 -> 6x12x12.
        stages, c_in = [], widths[0]
        for i, c_out in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride=1 if i == 0 else 2), BasicBlock(c_out, c_out)))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        # Kaiming init for convs; BN gamma 1, beta 0. Zeroing each block's last gamma (Goyal et al. 2017) made every
        # block start as the identity and the net learn markedly slower on the demo set (tried and dropped).
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        """The last stage's map before pooling: (B, in_channels, D, H, W) -> (B, 512, d, h, w)."""
        # grad_ckpt keeps only the input of the stem and of each block (not of each stage: a full-resolution stage
        # holds 8 maps the size of the stem's output), and recomputes one block at a time in the backward pass.
        ckpt = self.grad_ckpt and self.training and torch.is_grad_enabled()
        for layer in [self.stem, *(block for stage in self.stages for block in stage)]:
            x = checkpoint(layer, x, use_reentrant=False) if ckpt else layer(x)
        return x

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3, 4))  # global average pooling: (B, 512, d, h, w) -> (B, 512)

    def cells(self, size):
        """d * h * w of the map features() gives for an input of size (D, H, W): the stem divides each axis by its
        stride, stages 2-4 halve it (3x3x3 convs of stride 2 and padding 1 round up: ceil thrice = ceil(n / 8))."""
        s = self.stem[0].stride[0]
        return math.prod(-(-(n // s) // 8) for n in size)


# ----------------------------------------------------------------------------------------------
# Text encoder: a BERT trunk and its WordPiece tokenizer, both rebuildable from a plain dict

# The BertConfig fields that define the architecture; everything else in a config is bookkeeping.
BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
             "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
             "initializer_range", "layer_norm_eps", "pad_token_id")


class TextEncoder(nn.Module):
    """BERT trunk (no pooler): input_ids (B, L), attention_mask (B, L) -> report embedding (B, H). cfg "pooling":
    "cls" (the paper's) = the [CLS] token's last hidden state; "sentence" = each sentence encoded on its own, its
    words averaged, then the sentences averaged: a one-sentence prompt is encoded like the report sentence it echoes;
    "mean" = the mean of every real token's last hidden state, the sentence embedding that sentence-transformers
    models such as all-MiniLM-L6-v2 were trained to give (their [CLS] never was)."""

    def __init__(self, cfg):
        super().__init__()
        from transformers import BertConfig, BertModel
        self.cfg = cfg  # the plain dict it was built from (what a checkpoint stores as model_config["text"])
        self.bert = BertModel(BertConfig(**cfg["bert"]), add_pooling_layer=False)
        self.out_dim, self.pooling = self.bert.config.hidden_size, cfg.get("pooling", "cls")
        if self.pooling not in POOLINGS:  # never a silent fallback to another pooling
            raise ValueError(f"text pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.pooling == "sentence":  # the ids of [CLS], [SEP] and of what ends a sentence (or a heading), as buffers:
            # they move with .to(device) (no host->device copy in forward); non-persistent, so never in a checkpoint
            vocab = {t: i for i, t in enumerate(cfg["vocab"])}
            self.register_buffer("special", torch.tensor([vocab["[CLS]"], vocab["[SEP]"]]), persistent=False)
            self.register_buffer("ends", torch.tensor([vocab[t] for t in ".:;" if t in vocab], dtype=torch.long), persistent=False)

    def gradient_checkpointing_enable(self):
        """Recompute each BERT layer in the backward pass (no BatchNorm here, so no side effects)."""
        kw = {"use_reentrant": False}
        if hasattr(self.bert, "activation_checkpointing_enable"):  # the newer name in transformers 5.x
            self.bert.activation_checkpointing_enable(kw)
        else:
            self.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        self.bert.config.use_cache = False  # BERT keeps no cache anyway; silences a warning

    def forward(self, input_ids, attention_mask):
        if self.pooling == "cls":  # position 0 is [CLS]
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        if self.pooling == "mean":  # padding left out: (B, L, H) -> (B, H)
            hidden, real = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, attention_mask[..., None]
            return (hidden * real).sum(1) / real.sum(1).clamp(min=1)
        # Segments (B, L): a sentence ends at its "." (or ":", ";"); [CLS] and [SEP] stand alone.
        special = torch.isin(input_ids, self.special)
        stop = special | torch.isin(input_ids, self.ends)
        start = special | torch.cat([torch.ones_like(stop[:, :1]), stop[:, :-1]], 1)  # a segment begins after a stop
        seg, idx = torch.cumsum(start, 1) - 1, torch.arange(input_ids.shape[1], device=input_ids.device)
        pos = idx - torch.cummax(torch.where(start, idx, 0), 1).values  # positions restart at 0 in every segment
        real, eye = attention_mask.bool(), torch.eye(len(idx), dtype=torch.bool, device=idx.device)
        # Block-diagonal attention (B, 1, L, L): a token sees the real tokens of its own segment (and itself).
        allow = (((seg[:, :, None] == seg[:, None, :]) & real[:, None, :]) | eye)[:, None]
        if self.bert.config._attn_implementation == "eager":  # eager attention adds the mask to the scores
            allow = torch.zeros(allow.shape, device=allow.device).masked_fill(~allow, torch.finfo(torch.float32).min)
        hidden = self.bert(input_ids=input_ids, attention_mask=allow, position_ids=pos).last_hidden_state  # (B, L, H)
        # Mean over each sentence's words, then over the sentences ([CLS], [SEP] and padding left out). seg == idx is
        # one_hot(seg, L), without F.one_hot's host read-back of seg's range (a wait for the GPU in every forward).
        member = (seg[..., None] == idx).to(hidden.dtype) * (real & ~special)[..., None]  # (B, L, S = L segments)
        n = member.sum(1)[..., None]  # (B, S, 1) words per segment
        sent, has = torch.einsum("bls,blh->bsh", member, hidden) / n.clamp(min=1), (n > 0).to(hidden.dtype)  # (B, S, H)
        return (sent * has).sum(1) / has.sum(1).clamp(min=1)  # (B, H); zeros for a text without words


def tokenizer_from_cfg(text_cfg):
    """A fast BERT tokenizer rebuilt offline from text_cfg's vocabulary (no files, no hub)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(text_cfg["vocab"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=text_cfg["lowercase"])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on whitespace and punctuation
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=text_cfg["max_len"])


def build_text(source, reports=None, max_len=512, vocab_size=4000, pooling="cls"):
    """-> (TextEncoder, tokenizer, text_cfg). Never runs a repository's own code (no trust_remote_code).

    source "scratch": a small BERT (2 layers, 128-d) and a WordPiece vocabulary trained on `reports`
    in about a second; for the demo and for tests. Anything else: a Hugging Face model name or local
    folder (e.g. microsoft/BiomedVLP-CXR-BERT-specialized), loaded as a plain BERT with its weights.
    text_cfg is a plain dict from which TextEncoder and tokenizer_from_cfg rebuild both offline.
    """
    if source == "scratch":
        from collections import Counter
        from tokenizers import normalizers, pre_tokenizers
        if not reports:
            raise ValueError("build_text('scratch') needs reports to train a WordPiece vocabulary on")
        # A deterministic in-domain vocabulary: the most frequent whole words ("bronchiectasis" stays one token) plus
        # every character and its "##" continuation (the `tokenizers` trainer breaks ties in hash order: not stable).
        norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        counts = Counter(w for r in reports for w, _ in pre.pre_tokenize_str(norm.normalize_str(r)))
        chars = sorted({c for w in counts for c in w})
        words = sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size]
        vocab = SPECIAL_TOKENS + chars + ["##" + c for c in chars] + sorted(set(words) - set(chars))
        # No dropout: this small model sees a few thousand steps at most, and dropout's random masks cost a quarter of
        # its CPU step (docs/speed-demo.md); validation AUC stayed 0.9996 without them.
        bert = dict(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=512, max_position_embeddings=max(512, max_len), pad_token_id=0,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        text_cfg = {"bert": bert, "vocab": vocab, "lowercase": True, "max_len": max_len, "source": source, "pooling": pooling}
        return TextEncoder(text_cfg), tokenizer_from_cfg(text_cfg), text_cfg

    # BertTokenizer rather than AutoTokenizer: a BERT trunk always uses WordPiece, and repositories
    # with custom code (CXR-BERT's auto_map) would make AutoTokenizer ask for trust_remote_code.
    from transformers import BertModel, BertTokenizer, logging as hf_logging
    hf_tok = BertTokenizer.from_pretrained(source)
    # Loaded quietly: transformers would log a table row per checkpoint tensor BertModel does not use (CXR-BERT's MLM
    # and projection heads, 13 rows that read like errors) and leave a missing one random with only a warning.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:  # ignore_mismatched_sizes: a shape that differs from the config is raised below, not at the silenced table
        pretrained, info = BertModel.from_pretrained(source, add_pooling_layer=False, output_loading_info=True,
                                                     ignore_mismatched_sizes=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing, unused = sorted({*info["missing_keys"], *(k for k, *_ in info["mismatched_keys"])}), info["unexpected_keys"]
    if missing:  # never left at random initialisation
        raise DataError(f"{source}: {len(missing)} BERT encoder tensors are missing from its weights or shaped unlike its "
                        f"config, e.g. {missing[0]}")
    # The unused tensors named by part: cls.predictions (the MLM head), cls_projection_head, pooler, ...
    parts = sorted({".".join(k.split(".")[:2]) if k.startswith("cls.") else k.split(".")[0] for k in unused})
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"text model {source}: loaded as a plain BERT, all {len(pretrained.state_dict())} encoder tensors; "
              f"ignored {', '.join(p + '.*' for p in parts) or 'nothing'} ({len(unused)} tensors)")
    items = sorted(hf_tok.get_vocab().items(), key=lambda kv: kv[1])
    if [i for _, i in items] != list(range(len(items))):
        raise ValueError(f"{source}: tokenizer vocabulary ids are not 0..N-1; cannot store it as a list")
    bert = {k: v for k, v in pretrained.config.to_dict().items() if k in BERT_KEYS}
    if max_len > bert["max_position_embeddings"]:
        raise ValueError(f"{source}: max_len {max_len} exceeds its {bert['max_position_embeddings']} positions")
    text_cfg = {"bert": bert, "vocab": [t for t, _ in items], "lowercase": bool(getattr(hf_tok, "do_lower_case", True)),
                "max_len": max_len, "source": source, "pooling": pooling}
    # Rebuild from text_cfg and copy the weights in strictly: proves that a checkpoint's text_cfg alone
    # reproduces this architecture, and casts half-precision hub weights to float32.
    encoder = TextEncoder(text_cfg)
    encoder.bert.load_state_dict(pretrained.state_dict(), strict=True)
    return encoder, tokenizer_from_cfg(text_cfg), text_cfg


# ----------------------------------------------------------------------------------------------
# Models: pre-training (one encoder + linear head, stages 2a and 2b) and alignment (GreenRFM, stage 3)

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


class GreenRFM(nn.Module):
    """Both encoders projected to a shared space, one classifier for both latents; no L2 normalisation (raw dot products).
    align.py's ablations (ALIGN_SWITCHES): shared_classifier=False leaves it out (None; Fig. 4a); l2_norm=True makes
    the latents unit length, with CLIP's learnable temperature (Fig. 4e); joint_heads=True adds each encoder's stage-1
    head to the labels, trained in the same step as the alignment (Fig. 3e/f)."""

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
    stage-1 loss in the same step. -> (total, {"clip", "bce_img", "bce_txt", ...}); the parts detached, for logging."""
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


# -----------------------------------------------------------------------------
# Zero-shot pieces (shared by align.py's validation, evaluate.py and scan.py), and Fig. 3c's sentence alignment

# Prompt pairs (positive, negative) per template; "{x}" is the label name, lowercased, "_" -> " ".
# "there_is" is the default; "present" is the CT-CLIP protocol.
PROMPT_TEMPLATES = {
    "not": ("{x}.", "not {x}."),
    "empty": ("{x}.", ""),
    "there_is": ("There is {x}.", "There is no {x}."),
    "present": ("{x} is present.", "{x} is not present."),
    "compatible": ("Findings are compatible with {x}.", "Findings are not compatible with {x}."),
}


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


def prompt_latents(model, tokenizer, label_names, template, max_len, device):
    """Text latents of each label's positive and negative prompt -> (C, 2, 768), once for all volumes; template is
    a PROMPT_TEMPLATES key or a (positive, negative) pair."""
    pos, neg = PROMPT_TEMPLATES[template] if isinstance(template, str) else template
    # "Pleural effusion" -> "There is pleural effusion."; "renal_cyst" -> "There is renal cyst."
    texts = [t.format(x=n.lower().replace("_", " ")) for n in label_names for t in (pos, neg)]  # 2C prompts
    lat = text_latents(model, tokenizer, texts, max_len, device)
    return lat.view(len(label_names), 2, -1)  # (C, 2, 768): [:, 0] positive, [:, 1] negative


def zero_shot_logits(img_lat, prompt_lat):
    """(N, C): img . pos - img . neg, the logit whose sigmoid is zero_shot_scores (temperature scaling divides it)."""
    return torch.einsum("nd,cd->nc", img_lat.float(), (prompt_lat[:, 0] - prompt_lat[:, 1]).float())


def zero_shot_scores(img_lat, prompt_lat):
    """Positive probability per label -> (N, C): softmax over the pair of raw dot products
    [img . pos, img . neg] (= sigmoid of their difference). Raw dot products, as in training."""
    logits = torch.einsum("nd,cpd->ncp", img_lat.float(), prompt_lat.float())  # (N, C, 2)
    return logits.softmax(dim=-1)[..., 0]


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
