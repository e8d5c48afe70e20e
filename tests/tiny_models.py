"""Tiny random llama-family models: an HF transformers model and the same weights as a GGUF file
written by our converter. The HF model is then loaded with the weights *read back from the GGUF*
(dequantized by the `gguf` package, Q/K un-permuted), so it is an independent float32 reference
for exactly the numbers our engine sees."""
from __future__ import annotations

import numpy as np

BYTE_VOCAB_SIZE = 256


def byte_level_vocab(vocab_size: int) -> dict:
    """A gpt2-style vocab: the 256 byte tokens (no merges), then control tokens up to vocab_size."""
    from lmengine.tokenizer import _gpt2_byte_to_char  # GPT-2's byte -> printable character table
    byte_chars = _gpt2_byte_to_char()
    tokens = [byte_chars[b] for b in range(min(vocab_size, BYTE_VOCAB_SIZE))]
    types = [1] * len(tokens)
    while len(tokens) < vocab_size:
        tokens.append(f"<|extra_{len(tokens)}|>")
        types.append(3)
    eos = vocab_size - 1 if vocab_size > BYTE_VOCAB_SIZE else None
    return {"model": "gpt2", "pre": "gpt2", "tokens": tokens, "token_types": types, "merges": [],
            "eos_id": eos, "bos_id": eos}


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_tiny_model(path, *, arch="llama", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96,
                    vocab_size=300, tied=False, weight_type="f32", seed=0, rope_base=10000.0, n_ctx=256):
    """Write a random model to `path` (GGUF) and return the HF model holding the GGUF's weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from lmengine.converters.hf import hf_to_gguf_tensors, hparams_from_hf, write_llama_gguf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=dim, intermediate_size=ffn_dim,
                  num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  num_key_value_heads=n_kv_heads, max_position_embeddings=n_ctx,
                  rms_norm_eps=1e-5, rope_theta=rope_base, tie_word_embeddings=tied)
    if arch == "llama":
        config, model_cls = LlamaConfig(**common), LlamaForCausalLM
    else:
        config, model_cls = Qwen2Config(**common), Qwen2ForCausalLM
    model = model_cls(config).eval()
    with torch.no_grad():  # random norms and biases, so that they are really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    cfg = config.to_dict()
    cfg["architectures"] = [model_cls.__name__]
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    gguf_arch, tensors = hf_to_gguf_tensors(cfg, state)
    hparams = hparams_from_hf(cfg)
    hparams["rope_base"] = rope_base
    write_llama_gguf(str(path), gguf_arch, hparams, tensors, weight_type, byte_level_vocab(vocab_size))
    _load_back(model, str(path), arch, n_heads, n_kv_heads, n_layers, tied)
    return model


def _load_back(model, path, arch, n_heads, n_kv_heads, n_layers, tied):
    """Replace the HF weights by the GGUF's, dequantized by the gguf package."""
    import gguf
    import torch

    from lmengine.converters.hf import GLOBAL_NAMES, LAYER_NAMES

    reader = gguf.GGUFReader(path)
    values = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        values[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    sd = {}
    for hf, gg in GLOBAL_NAMES.items():
        if gg in values:
            sd[hf] = values[gg]
    if tied:
        sd["lm_head.weight"] = values["token_embd.weight"]
    for i in range(n_layers):
        for hf, gg in LAYER_NAMES.items():
            key = f"blk.{i}.{gg}"
            if key not in values:
                continue
            w = values[key]
            if arch == "llama" and gg.startswith("attn_q."):
                w = _unpermute_qk(w, n_heads)
            if arch == "llama" and gg.startswith("attn_k."):
                w = _unpermute_qk(w, n_kv_heads)
            sd[f"model.layers.{i}.{hf}"] = w
    with torch.no_grad():
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                                                     for k, v in sd.items()}, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m for m in missing), missing


def hf_logits(model, token_ids) -> np.ndarray:
    """float32 [n, vocab] logits of the HF model at every position."""
    import torch
    with torch.no_grad():
        out = model(torch.tensor([list(token_ids)], dtype=torch.long))
    return out.logits[0].float().numpy()
