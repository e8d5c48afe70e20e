"""Tiny random Hugging Face models of the llama family's newer architectures and RoPE scalings,
made from their transformers configs and saved as model directories that `lmengine convert`
reads (tests/engine/test_architectures.py, tests/converters/test_onnx_qwen3.py)."""
from __future__ import annotations

import json
import os

import numpy as np

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.1, max_position_embeddings=256,
              bos_token_id=None, eos_token_id=VOCAB - 1, pad_token_id=None)

# name -> (transformers config class, model class name, config keywords)
MODELS = {
    # Llama 3 scaling past a 32-token original context (factors precomputed into rope_freqs.weight)
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=2, rope_parameters={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                              "rope_theta": 10000.0})),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    # head_dim 32 != 64 / 4 heads: key_length is stated; q/k norms per head
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_hidden_layers=2, head_dim=32)),
    "qwen3-yarn": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_hidden_layers=2, head_dim=32, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                           "original_max_position_embeddings": 64})),
    # small caps so that the soft-capping changes the numbers; a 16-token window on layers 0 and 2
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
        attn_logit_softcapping=1.0, final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh")),
    # layers 0-4 local (base 10000), layer 5 global (base 1e6, linear scaling 2)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    # fused qkv and gate|up, half the head rotated
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5}, sliding_window=None)),
}


def _longrope_phi3():
    half = 4   # rope_dim 8 (head_dim 64 / 4 = 16, half of it rotated): 4 pairs
    rng = np.random.default_rng(7)
    return ("Phi3Config", "Phi3ForCausalLM", dict(
        num_hidden_layers=2, original_max_position_embeddings=32, sliding_window=None,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "original_max_position_embeddings": 32,
                         "short_factor": (1.0 + rng.random(half)).tolist(),
                         "long_factor": (2.0 + 4 * rng.random(half)).tolist()}))


EXTRA_MODELS = {"phi3-longrope": _longrope_phi3()}   # its own test: the factors depend on the context


def _write_tokenizer(folder: str) -> None:
    """A byte-level BPE tokenizer.json (the 256 byte tokens, two merges, then special tokens up to
    VOCAB) and its tokenizer_config.json, so that the converted file carries a vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from lmengine.tokenizer import _gpt2_byte_to_char
    chars = _gpt2_byte_to_char()
    vocab = {chars[b]: b for b in range(256)}
    merges = [(chars[32], "t"), ("h", "e")]           # "Ġt" (256), "he" (257)
    vocab.update({a + b: 256 + i for i, (a, b) in enumerate(merges)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([f"<|extra_{i}|>" for i in range(256 + len(merges), VOCAB)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump({"eos_token": f"<|extra_{VOCAB - 1}|>"}, fh)


def make_hf_model(name: str, folder: str, seed: int = 0):
    """The tiny random HF model `name` of MODELS, saved (weights, config, tokenizer) to `folder`."""
    config_cls, model_cls, kwargs = {**MODELS, **EXTRA_MODELS}[name]
    torch = _torch()
    torch.manual_seed(seed)
    config = getattr(_transformers(), config_cls)(**{**COMMON, **kwargs})
    model = getattr(_transformers(), model_cls)(config).eval()
    with torch.no_grad():    # norms away from 1 (gemma: away from 0, it adds 1), so they are tested
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_((0.0 if "gemma" in name else 1.0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    _write_tokenizer(folder)
    return model


def hf_logits(model, ids) -> np.ndarray:
    """float32 [n, vocab]: transformers' logits at every position."""
    torch = _torch()
    with torch.no_grad():
        return model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].float().numpy()


def _torch():
    import torch
    return torch


def _transformers():
    import transformers
    return transformers
