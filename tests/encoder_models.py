"""Tiny random Hugging Face BERT and GPT-2 models saved as model directories (config, weights,
tokenizer.json), for the bert/gpt2 tests: converted with `lmengine convert`, compared with
transformers float32."""
from __future__ import annotations

import json
import os

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "runs", "fast", "hello", "world", "embed", "##s", "##ing",
         "##ed", ".", ",", "!", "?", "a", "b", "c", "d", "e", "f", "g", "h", "i", "##a", "##b", "##c", "##d",
         "##e", "##t", "##o", "##n"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_bert_dir(path, *, n_layers=2, dim=32, n_heads=4, ffn_dim=64, max_pos=64, seed=0, pooling="mean"):
    """A random BertModel + WordPiece tokenizer (+ sentence-transformers pooling files) in `path`.
    Returns the HF model (eval mode, float32)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel

    os.makedirs(path, exist_ok=True)
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                   "mask_token": "[MASK]", "tokenizer_class": "BertTokenizer", "do_lower_case": True}, fh)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=dim, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                        intermediate_size=ffn_dim, max_position_embeddings=max_pos, type_vocab_size=2)
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():       # non-trivial LayerNorm parameters (HF initialises them to 1 and 0)
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    if pooling is not None:
        os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
        with open(os.path.join(path, "1_Pooling", "config.json"), "w") as fh:
            json.dump({"word_embedding_dimension": dim, "pooling_mode_mean_tokens": pooling == "mean",
                       "pooling_mode_cls_token": pooling == "cls"}, fh)
        with open(os.path.join(path, "modules.json"), "w") as fh:
            json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                       {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}], fh)
    return model


def make_gpt2_dir(path, *, n_layers=2, dim=32, n_heads=4, n_positions=128, seed=0):
    """A random GPT2LMHeadModel + byte-level BPE tokenizer (256 byte tokens, a few merges,
    <|endoftext|>) in `path`. Returns the HF model (eval mode, float32)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmengine.tokenizer import _gpt2_byte_to_char

    os.makedirs(path, exist_ok=True)
    chars = _gpt2_byte_to_char()
    vocab = {chars[b]: b for b in range(256)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, fh)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(vocab), n_embd=dim, n_layer=n_layers, n_head=n_heads, n_positions=n_positions,
                        bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def convert(src, dst) -> str:
    """`lmengine convert src dst` through the CLI entry point; returns dst."""
    from lmengine.cli import main
    assert main(["convert", str(src), str(dst)]) == 0
    return str(dst)
