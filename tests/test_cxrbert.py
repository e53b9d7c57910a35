"""CXR-BERT (microsoft/BiomedVLP-CXR-BERT-specialized) loads as a plain BERT, offline, without its remote code.

Its hub folder is not a plain BERT folder: config.json has its own model_type ("cxr-bert"), an auto_map to the
repository's Python files and a projection_size; the weights are a masked-LM checkpoint (bert.*, cls.predictions.*)
plus a projection head (cls_projection_head.*); tokenizer_config.json names CXRBertTokenizer. We build a small folder
laid out the same way (random weights, small dimensions) and load it through build_text and pretrain_text.py.
"""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import encoders
import model as M
from conftest import ROOT

WORDS = encoders.SPECIAL_TOKENS + ["there", "is", "no", "pleural", "effusion", "emphysema", "atelectasis", "mild", ".", "##s"]
ONE_LINE = "loaded as a plain BERT, all 37 encoder tensors; ignored cls.predictions.*, cls_projection_head.* (13 tensors)"
REMOTE_CODE = ("configuration_cxrbert.py", "modeling_cxrbert.py")  # what the real repository ships beside its weights


def cxr_bert_folder(d, fmt="safetensors"):
    """A folder laid out like CXR-BERT-specialized's hub repository -> {checkpoint key: tensor} as saved."""
    from transformers import BertConfig, BertForMaskedLM
    d.mkdir()
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    # BertForMaskedLM gives the masked-LM key layout (bert.embeddings..., bert.encoder..., cls.predictions.transform...,
    # cls.predictions.decoder, cls.predictions.bias). Every tensor is then redrawn from randn, so that none equals a
    # fresh initialisation (LayerNorm ones, zero biases): a tensor left at random init cannot pass the comparison.
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) for k, v in BertForMaskedLM(cfg).state_dict().items()}
    P = 16  # projection_size; the head as in the authors' BertProjectionHead (hi-ml, health_multimodal/text/model)
    for name, shape in [("dense_to_hidden.weight", (P, 32)), ("dense_to_hidden.bias", (P,)), ("LayerNorm.weight", (P,)),
                        ("LayerNorm.bias", (P,)), ("dense_to_output.weight", (P, P)), ("dense_to_output.bias", (P,))]:
        state["cls_projection_head." + name] = torch.randn(shape)
    if fmt == "safetensors":
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:  # the real repository's format; transformers 4.x (< 4.31) also saved the position_ids buffer
        torch.save({**state, "bert.embeddings.position_ids": torch.arange(64)[None]}, d / "pytorch_model.bin")
    config = {**cfg.to_dict(), "model_type": "cxr-bert", "architectures": ["CXRBertModel"], "projection_size": P,
              "auto_map": {"AutoConfig": "configuration_cxrbert.CXRBertConfig", "AutoModel": "modeling_cxrbert.CXRBertModel"}}
    (d / "config.json").write_text(json.dumps(config, indent=2))
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CXRBertTokenizer", "do_lower_case": True, "model_max_length": 64,
        "auto_map": {"AutoTokenizer": ["configuration_cxrbert.CXRBertTokenizer", None]}}))
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}))
    for name in REMOTE_CODE:  # a trap: running the repository's own code leaves a mark, then fails
        (d / name).write_text(f"open({str(d / 'REMOTE_CODE_RAN')!r}, 'w').close()\n"
                              "raise RuntimeError('remote code was executed')\n")
    return state


def assert_encoder_is_the_folders(encoder_state, state, prefix=""):
    """Every encoder tensor equals the folder's bert.<name>; none missing, none extra (37 for this size)."""
    got = {k[len(prefix):]: v for k, v in encoder_state.items() if k.startswith(prefix)}
    assert len(got) == 37 and set("bert." + k for k in got) <= set(state)
    for k, v in got.items():
        assert torch.equal(v, state["bert." + k]), f"{k} is not the folder's tensor"


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_build_text_loads_cxr_bert_layout(tmp_path, monkeypatch, capsys, fmt):
    d = tmp_path / "cxr-bert"
    state = cxr_bert_folder(d, fmt)

    def refuse(*a, **k):
        raise AssertionError("asked for input (a trust_remote_code prompt?) or for the network")
    monkeypatch.setattr("builtins.input", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    enc, tok, cfg = M.build_text(str(d), max_len=64)
    out = capsys.readouterr()
    assert_encoder_is_the_folders(enc.bert.state_dict(), state)
    assert not (d / "REMOTE_CODE_RAN").exists()
    assert out.out.strip() == f"text model {d}: {ONE_LINE}"  # one line, and transformers' table is gone
    assert "UNEXPECTED" not in out.out + out.err and "LOAD REPORT" not in out.out + out.err
    assert cfg["vocab"] == WORDS and cfg["lowercase"] is True and cfg["bert"]["hidden_size"] == 32
    assert tok.tokenize("There is no pleural effusions.") == ["there", "is", "no", "pleural", "effusion", "##s", "."]


def test_missing_or_misshapen_encoder_tensor_is_an_error(tmp_path):
    d = tmp_path / "cxr-bert"
    state, where = cxr_bert_folder(d), re.escape(str(d))  # the message begins with the folder
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))  # 2 layers x 3 tensors differ
    with pytest.raises(M.DataError, match=rf"^{where}: 6 BERT encoder tensors are missing"):
        M.build_text(str(d), max_len=64)
    (d / "config.json").write_text(json.dumps(config))
    del state["bert.encoder.layer.1.output.dense.weight"]  # never left at random initialisation
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(M.DataError, match=rf"^{where}: 1 BERT encoder .* encoder\.layer\.1\.output\.dense\.weight$"):
        M.build_text(str(d), max_len=64)


def test_pretrain_text_with_cxr_bert_folder(tmp_path):
    d = tmp_path / "cxr-bert"
    state = cxr_bert_folder(d)
    # A manifest of 8 training reports, 2 labels: the text stage reads no volumes, and without a validation split it
    # skips the evaluation (and its sklearn import), which keeps this test fast.
    reports = ["There is no pleural effusion.", "Mild emphysema.", "Atelectasis. No pleural effusion.", "There is emphysema."]
    rows = [f"r{i},train,{reports[i % 4]},{i % 2},{(i // 2) % 2}" for i in range(8)]
    (tmp_path / "manifest.csv").write_text("\n".join(["id,split,report,Pleural effusion,Emphysema", *rows]) + "\n")
    # One step at --lr 0 (and no weight decay): the saved encoder is exactly what was loaded from the folder.
    cmd = [sys.executable, str(ROOT / "pretrain_text.py"), "--data", str(tmp_path / "manifest.csv"), "--text-model", str(d),
           "--out", str(tmp_path / "out"), "--max-len", "64", "--epochs", "1", "--batch-size", "8", "--lr", "0",
           "--min-lr", "0", "--weight-decay", "0", "--workers", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    both = r.stdout + r.stderr
    assert f"text model {d}: {ONE_LINE}" in r.stdout.splitlines()
    assert "UNEXPECTED" not in both and "LOAD REPORT" not in both and "trust_remote_code" not in both
    assert not (d / "REMOTE_CODE_RAN").exists()
    ck = torch.load(tmp_path / "out" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 1 and ck["model_config"]["text"]["vocab"] == WORDS
    assert_encoder_is_the_folders(ck["model"], state, prefix="encoder.bert.")
