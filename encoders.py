"""The two encoders GreenRFM aligns, and how each is built: the machinery under model.py's method.

    ResNet3D            3D ResNet-18 vision encoder, (B, C, D, H, W) -> (B, 512), in BasicBlocks of 3x3x3 convs
                        (Conv3x3x3: on a CPU, a tiny output map is one matrix product over unfolded patches)
    TextEncoder         BERT trunk, [CLS], sentence-averaged or mean embedding, (B, L) token ids -> (B, H)
    build_text          a text encoder + tokenizer + a plain-dict description (text_cfg): a scratch BERT with a
                        vocabulary of its own, or a Hugging Face model or folder loaded as a plain BERT
    tokenizer_from_cfg  the WordPiece tokenizer rebuilt offline from text_cfg

Both rebuild from plain dicts (a checkpoint's model_config["vision"] and ["text"]). Nothing here knows labels, losses
or the shared space: that is model.py, which imports this module (and re-exports its names for the stage scripts).

Shapes: B batch, C channels, D/H/W volume axes, L tokens, H text hidden size.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data import DataError

POOLINGS = ("cls", "sentence", "mean")  # TextEncoder report embeddings: the paper's [CLS], sentence by sentence, all tokens
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ----------------------------------------------------------------------------------------------
# Vision encoder: 3D ResNet-18 with a patchify stem

class Conv3x3x3(nn.Conv3d):
    """A 3x3x3 conv (padding 1), computed as one matrix product over unfolded patches when it runs on the CPU and its
    output map is tiny (<= 8 voxels a sample: the lite model's last ResNet stage, 1x2x2 on the demo crop).

    Same weights, outputs and gradients as nn.Conv3d (tests/test_model.py). Why: on such maps the CPU's conv kernel
    (oneDNN) takes 10-15x longer for the backward pass than for the forward, and the last ResNet stage's convs cost a third
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
        # Four ResNet stages of two blocks; ResNet stages 2-4 halve every axis: the standard model on a 96x192x192
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
        """The last ResNet stage's map before pooling: (B, in_channels, D, H, W) -> (B, 512, d, h, w)."""
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
        stride, ResNet stages 2-4 halve it (3x3x3 convs of stride 2 and padding 1 round up: ceil thrice = ceil(n / 8))."""
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
