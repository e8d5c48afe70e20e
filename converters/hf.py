"""Hugging Face llama-family checkpoints -> GGUF (the layout llama.cpp's converter writes).

Input: a model directory (config.json + *.safetensors or pytorch_model.bin, optional
tokenizer.json), or an in-memory (config dict, state_dict) pair. Output: a GGUF v3 file with
`general.architecture` llama, qwen2, qwen3, gemma2, gemma3 or phi3, tensors named as ggml names
them (`blk.{i}.attn_q.weight`, by the `gguf` package's TensorNameMap of the architecture),
matrices stored as F32, F16, Q8_0, Q4_0 or Q4_1 blocks, vectors as F32.

What llama.cpp's converter does beyond renaming, and so do we:
- gemma2 / gemma3: HF's RMSNorm multiplies by (1 + weight); the file stores 1 + weight.
- Llama 3 RoPE scaling: the per-pair frequency divisors are precomputed into `rope_freqs.weight`.
- phi3 long-rope: the long and short factors become `rope_factors_long/short.weight`.

The one subtle step: for llama, ggml's rope rotates adjacent pairs (2i, 2i+1) while HF's
`rotate_half` rotates (i, i + head_dim/2). llama.cpp's converter therefore permutes the rows of
attn_q and attn_k inside each head (`_permute_qk`) so both compute the same thing; we do the same,
so our files run in llama.cpp and theirs run here. qwen2 keeps HF's order (ggml uses NEOX rope).
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable

import numpy as np

from lmengine.kernels.quant import quantize

from .errors import ConversionError

# the matrix types convert_hf writes itself (others: `lmengine convert ... --weights Q4_K_M` quantizes
# an F32 file afterwards, engine/convert.py)
WEIGHT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")

HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
            "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3"}
NORM_SHIFT_ARCHS = ("gemma2", "gemma3")   # HF norms scale by (1 + w): the file stores 1 + w
SWA_PERIOD = {"gemma2": 2, "gemma3": 6}   # llama.cpp's fixed sliding-window layer pattern

# HF parameter name (per layer, after "model.layers.{i}.") -> GGUF name (after "blk.{i}.")
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def _permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder rows within each head from HF's (i, i+half) pairing to ggml's (2i, 2i+1).

    w: [n_heads * head_dim, ...] -> same shape; row (h, j, i) of view [n_heads, 2, half] moves to
    (h, i, j)."""
    head_dim = w.shape[0] // n_heads
    return (w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))


def hf_arch(config: dict) -> str:
    """The GGUF architecture of an HF config.json (its `architectures[0]`)."""
    arch = HF_ARCHS.get((config.get("architectures") or ["LlamaForCausalLM"])[0])
    if arch is None:
        raise ConversionError(f"unsupported HF architecture {config.get('architectures')} "
                              f"(supported: {', '.join(HF_ARCHS)})")
    return arch


def hf_to_gguf_tensors(config: dict, state_dict: dict) -> tuple[str, dict]:
    """Rename (and for llama permute) HF tensors. Returns (arch, {gguf_name: float32 array})."""
    arch = hf_arch(config)
    if arch != "llama" and arch != "qwen2":
        return arch, _mapped_tensors(arch, config, state_dict)
    n_heads = config["num_attention_heads"]
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    out = {}
    for name, value in state_dict.items():
        value = np.asarray(value, dtype=np.float32)
        if name in GLOBAL_NAMES:
            out[GLOBAL_NAMES[name]] = value
            continue
        parts = name.split(".")
        if len(parts) < 4 or parts[:2] != ["model", "layers"]:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ConversionError(f"unexpected tensor {name!r} in the checkpoint")
        layer, rest = int(parts[2]), ".".join(parts[3:])
        if rest not in LAYER_NAMES:
            if rest.endswith("rotary_emb.inv_freq"):
                continue
            raise ConversionError(f"unexpected tensor {name!r} in the checkpoint")
        gname = LAYER_NAMES[rest]
        if arch == "llama" and gname.startswith("attn_q."):
            value = _permute_qk(value, n_heads)
        elif arch == "llama" and gname.startswith("attn_k."):
            value = _permute_qk(value, n_kv_heads)
        out[f"blk.{layer}.{gname}"] = value
    if config.get("tie_word_embeddings") and "output.weight" in out:
        if np.array_equal(out["output.weight"], out["token_embd.weight"]):
            del out["output.weight"]  # tied: llama.cpp reuses token_embd
    out.update(_rope_tensors(arch, config))
    return arch, out


def _mapped_tensors(arch: str, config: dict, state_dict: dict) -> dict:
    """{gguf_name: float32 array} of the newer architectures, named by gguf's TensorNameMap."""
    import gguf

    n_layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    out = {}
    for name, value in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ConversionError(f"unexpected tensor {name!r} in the {arch} checkpoint")
        value = np.asarray(value, dtype=np.float32)
        if arch in NORM_SHIFT_ARCHS and gname.endswith("norm.weight"):
            value = value + np.float32(1.0)
        out[gname] = value
    if "output.weight" in out and (config.get("tie_word_embeddings", arch in NORM_SHIFT_ARCHS)
                                   and np.array_equal(out["output.weight"], out["token_embd.weight"])):
        del out["output.weight"]  # tied: llama.cpp reuses token_embd
    out.update(_rope_tensors(arch, config))
    return out


def _rope_params(config: dict, layer_type: str = "full_attention") -> dict:
    """The RoPE parameters of an HF config: `rope_parameters` (transformers 5, per layer type for
    gemma3) or the older `rope_scaling` + `rope_theta`."""
    params = config.get("rope_parameters") or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    params = dict(params)
    old = config.get("rope_scaling")
    if isinstance(old, dict):
        params = {**old, **params}
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    if config.get("rope_theta") is not None and "rope_theta" not in params:
        params["rope_theta"] = config["rope_theta"]
    return params


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope_dim(config: dict) -> int:
    partial = _rope_params(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return int(_head_dim(config) * partial)


def _rope_tensors(arch: str, config: dict) -> dict:
    """rope_freqs.weight (Llama 3 scaling) or rope_factors_long/short.weight (phi3 long-rope), as
    llama.cpp's converter computes them; {} for plain RoPE."""
    params = _rope_params(config)
    kind = params.get("rope_type", "default")
    half = _rope_dim(config) // 2
    if kind == "llama3":
        base = float(params.get("rope_theta", 10000.0))
        factor = float(params.get("factor", 8.0))
        low_freq_factor = float(params.get("low_freq_factor", 1.0))
        high_freq_factor = float(params.get("high_freq_factor", 4.0))
        old_ctx = float(params.get("original_max_position_embeddings", 8192))
        freqs = 1.0 / base ** (np.arange(0, 2 * half, 2, dtype=np.float32) / np.float32(2 * half))
        wavelen = 2 * np.pi / freqs.astype(np.float64)
        smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        factors = np.where(wavelen < old_ctx / high_freq_factor, 1.0,
                           np.where(wavelen > old_ctx / low_freq_factor, factor,
                                    1.0 / ((1.0 - smooth) / factor + smooth)))
        return {"rope_freqs.weight": factors.astype(np.float32)}
    if kind == "longrope":
        long_f, short_f = params.get("long_factor"), params.get("short_factor")
        if long_f is None or short_f is None or len(long_f) != half or len(short_f) != half:
            raise ConversionError(f"longrope needs long_factor and short_factor of {half} values each")
        return {"rope_factors_long.weight": np.asarray(long_f, dtype=np.float32),
                "rope_factors_short.weight": np.asarray(short_f, dtype=np.float32)}
    if kind not in ("default", "linear", "yarn"):
        raise ConversionError(f"RoPE scaling {kind!r} is not converted (default, linear, yarn, llama3, longrope)")
    return {}


def _add_family_metadata(writer, arch: str, config: dict) -> None:
    """The metadata keys of the newer architectures and of RoPE scaling (llama.cpp's names)."""
    import gguf

    params = _rope_params(config)
    kind = params.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(params.get("original_max_position_embeddings")
                                                 or config.get("max_position_embeddings", 2048)))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if params.get(key) is not None:
                add(float(params[key]))
        if params.get("attention_factor") is not None:   # llama.cpp multiplies it by 0.1 ln(factor) + 1
            writer.add_rope_scaling_attn_factors(float(params["attention_factor"]) /
                                                 (0.1 * math.log(float(params["factor"])) + 1.0))
    elif kind == "longrope":
        orig = int(config.get("original_max_position_embeddings") or params["original_max_position_embeddings"])
        scale = config["max_position_embeddings"] / orig
        attn_factor = params.get("attention_factor")
        if attn_factor is None:    # HF's and llama.cpp's default
            attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        writer.add_rope_scaling_orig_ctx_len(orig)
        writer.add_rope_scaling_attn_factors(float(attn_factor))
    if arch in SWA_PERIOD:
        writer.add_sliding_window(int(config["sliding_window"]))
        n = SWA_PERIOD[arch]
        want = ["sliding_attention" if i % n < n - 1 else "full_attention" for i in range(config["num_hidden_layers"])]
        if config.get("layer_types") not in (None, want):
            raise ConversionError(f"{arch}: layer_types {config['layer_types']} differ from llama.cpp's fixed pattern "
                                  f"(every {n}th layer global)")
        for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                         ("final_logit_softcapping", writer.add_final_logit_softcapping)):
            if config.get(key):
                add(float(config[key]))
        scalar = config.get("query_pre_attn_scalar")
        if scalar and scalar != _head_dim(config):
            writer.add_attention_scale(float(scalar) ** -0.5)
    if arch == "gemma3":
        writer.add_rope_freq_base_swa(float(_rope_params(config, "sliding_attention").get("rope_theta", 10000.0)))


def write_llama_gguf(path: str, arch: str, hparams: dict, tensors: dict, weight_type: str = "f32",
                     vocab: dict | None = None, progress: Callable[[str], None] | None = None) -> None:
    """Write a llama-family GGUF.

    hparams: n_layers, dim, ffn_dim, n_heads, n_kv_heads, rope_base, norm_eps, n_ctx, vocab_size,
    optional rope_dim, name. tensors: {gguf_name: float32 array (NumPy order)}; 2-D matrices are
    stored as `weight_type` (f32, f16, q8_0, q4_0, q4_1) except token_embd with a quant type that
    its width does not fit; vectors as F32. vocab: optional tokenizer metadata
    ({"model": "gpt2", "pre": ..., "tokens": [...], "token_types": [...], "merges": [...],
    "bos_id": ..., "eos_id": ..., "chat_template": ...}).
    """
    import gguf

    wtype = weight_type.upper()
    if weight_type.lower() not in WEIGHT_TYPES:
        raise ConversionError(f"weight type {weight_type!r} not supported ({', '.join(WEIGHT_TYPES)})")
    writer = gguf.GGUFWriter(path, arch)
    a = arch
    writer.add_name(hparams.get("name", f"{arch} model"))
    writer.add_uint32(f"{a}.block_count", hparams["n_layers"])
    writer.add_uint32(f"{a}.context_length", hparams["n_ctx"])
    writer.add_uint32(f"{a}.embedding_length", hparams["dim"])
    writer.add_uint32(f"{a}.feed_forward_length", hparams["ffn_dim"])
    writer.add_uint32(f"{a}.attention.head_count", hparams["n_heads"])
    writer.add_uint32(f"{a}.attention.head_count_kv", hparams["n_kv_heads"])
    writer.add_float32(f"{a}.rope.freq_base", float(hparams["rope_base"]))
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(hparams["norm_eps"]))
    writer.add_uint32(f"{a}.vocab_size", hparams["vocab_size"])
    head_dim = hparams.get("head_dim") or hparams["dim"] // hparams["n_heads"]
    if head_dim != hparams["dim"] // hparams["n_heads"] or hparams.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_uint32(f"{a}.rope.dimension_count", hparams.get("rope_dim", head_dim))
    if hparams.get("hf_config") is not None:
        _add_family_metadata(writer, arch, hparams["hf_config"])
    writer.add_uint32("general.file_type", {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[wtype])
    if vocab is not None:
        _add_vocab(writer, vocab)

    for i, (name, value) in enumerate(tensors.items()):
        value = np.ascontiguousarray(value, dtype=np.float32)
        ttype = wtype if value.ndim == 2 else "F32"
        if ttype.startswith("Q") and value.shape[-1] % 32:
            ttype = "F16"  # quant blocks need rows that are a multiple of 32 values
        if ttype == "F32":
            writer.add_tensor(name, value)
        elif ttype == "F16":
            writer.add_tensor(name, value.astype(np.float16))
        else:
            type_id = int(gguf.GGMLQuantizationType[ttype])
            blocks = quantize(type_id, value)  # uint8 [rows, row_bytes]
            writer.add_tensor(name, blocks.reshape(value.shape[0], -1),
                              raw_dtype=gguf.GGMLQuantizationType(type_id))
        if progress is not None:
            progress(f"[{i + 1}/{len(tensors)}] {name} {tuple(value.shape)} -> {ttype}")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_vocab(writer, vocab: dict) -> None:
    writer.add_tokenizer_model(vocab.get("model", "gpt2"))
    writer.add_tokenizer_pre(vocab.get("pre", "default"))
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab.get("token_types", [1] * len(vocab["tokens"])))
    if vocab.get("merges") or vocab.get("model", "gpt2") == "gpt2":
        writer.add_token_merges(vocab.get("merges", []))  # a BPE vocab needs the key, even empty
    if vocab.get("scores"):
        writer.add_token_scores(vocab["scores"])
    for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                     ("unk_id", writer.add_unk_token_id), ("pad_id", writer.add_pad_token_id)):
        if vocab.get(key) is not None:
            add(vocab[key])
    writer.add_add_bos_token(bool(vocab.get("add_bos", False)))
    if vocab.get("chat_template"):
        writer.add_chat_template(vocab["chat_template"])


def hparams_from_hf(config: dict) -> dict:
    """write_llama_gguf's hparams of an HF config.json ("hf_config": the config itself, for the
    keys of the newer architectures and of RoPE scaling)."""
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if key not in config:
            raise ConversionError(f"config.json: required key {key!r} is missing")
    n_heads = config["num_attention_heads"]
    if hf_arch(config) in SWA_PERIOD and not config.get("sliding_window"):
        raise ConversionError(f"config.json: required key 'sliding_window' is missing ({hf_arch(config)})")
    rope_theta = _rope_params(config).get("rope_theta", 10000.0)
    return {
        "head_dim": config.get("head_dim") or config["hidden_size"] // n_heads,
        "rope_dim": _rope_dim(config),
        "hf_config": config,
        "n_layers": config["num_hidden_layers"],
        "dim": config["hidden_size"],
        "ffn_dim": config["intermediate_size"],
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "rope_base": rope_theta,
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "n_ctx": config.get("max_position_embeddings", 2048),
        "vocab_size": config["vocab_size"],
        "name": config.get("_name_or_path") or "converted",
    }


TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4     # gguf.TokenType values


def token_table(spec: dict, path: str, model_type: str) -> tuple[dict, list, list]:
    """(vocab, tokens, types) of a parsed tokenizer.json `spec` whose model is `model_type` ("BPE",
    "WordPiece"; another type is a ConversionError naming `path`): vocab maps text -> id with the
    added tokens merged in; tokens[id] is its text ("[PAD<id>]" where no token has that id, as
    llama.cpp's converter fills gaps); types[id] is TOKEN_CONTROL for a special added token,
    TOKEN_USER_DEFINED for another added one, else TOKEN_NORMAL."""
    model = spec.get("model") or {}
    if model.get("type") != model_type:
        raise ConversionError(f"{path}: expected a {model_type} tokenizer (found {model.get('type')!r})")
    vocab = dict(model.get("vocab") or {})
    added_tokens = spec.get("added_tokens") or []
    for added in added_tokens:
        vocab[added["content"]] = added["id"]
    if not vocab:
        raise ConversionError(f"{path}: the tokenizer has no vocabulary")
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for text, i in vocab.items():
        tokens[i] = text
    types = [TOKEN_NORMAL] * n
    for added in added_tokens:
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    return vocab, tokens, types


def vocab_from_tokenizer_json(path: str, tokenizer_config: dict | None = None) -> dict:
    """GGUF tokenizer metadata from a byte-level BPE tokenizer.json (gpt2 / llama 3 / qwen2 style)."""
    with open(path, encoding="utf-8") as fh:
        tj = json.load(fh)
    model = tj.get("model", {})
    vocab, tokens, types = token_table(tj, path, "BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # "gpt-2": llama.cpp's name of GPT-2's pre-tokenizer split (it refuses "gpt2"; we read both)
    out = {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "token_types": types, "merges": merges}
    tc = tokenizer_config or {}
    for key, field in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id")):
        tok = tc.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        if tok in vocab:
            out[field] = vocab[tok]
    if tc.get("chat_template"):
        out["chat_template"] = tc["chat_template"]
    return out


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors_widened(path: str) -> dict:
    """The tensors of a .safetensors file as NumPy arrays, BF16 ones widened to float32 (exact: the
    bf16 bits are the top half of the float32's). The format: a little-endian u64 header length,
    a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}} and the data after it.
    Used where `safetensors.numpy` refuses a file for its bfloat16 tensors; ConversionError naming
    the file and tensor for anything malformed."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if data.size < 8:
        raise ConversionError(f"{path}: too short for a safetensors header")
    n_header = int(data[:8].view("<u8")[0])
    if n_header > min(data.size - 8, 100 << 20):
        raise ConversionError(f"{path}: safetensors header length {n_header} is past the file's end or over 100 MB")
    try:
        header = json.loads(bytes(data[8: 8 + n_header]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: the safetensors header is not JSON ({e})") from None
    body = data[8 + n_header:]
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = spec["dtype"], [int(d) for d in spec["shape"]], spec["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise ConversionError(f"{path}: tensor {name!r}: a malformed header entry ({e})") from None
        item = 2 if dtype == "BF16" else np.dtype(_SAFETENSORS_DTYPES.get(dtype, "V1")).itemsize
        if dtype != "BF16" and dtype not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has dtype {dtype}, which lmengine does not read")
        if not 0 <= begin <= end <= body.size or end - begin != int(np.prod(shape, dtype=np.int64)) * item:
            raise ConversionError(f"{path}: tensor {name!r} ({dtype}, shape {shape}): its data offsets "
                                  f"{begin}..{end} do not fit the shape or the file")
        raw = body[begin:end]
        if dtype == "BF16":
            out[name] = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        else:
            out[name] = raw.view(_SAFETENSORS_DTYPES[dtype]).reshape(shape)
    return out


def load_hf_state_dict(model_dir: str) -> dict:
    """float32 NumPy arrays from *.safetensors (preferred) or pytorch_model.bin."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    state = {}
    if files:
        try:
            from safetensors.numpy import load_file
        except ImportError as e:  # pragma: no cover - safetensors comes with transformers
            raise ConversionError("reading .safetensors needs the `safetensors` package") from e
        for f in files:
            path = os.path.join(model_dir, f)
            try:
                tensors = load_file(path)
            except TypeError:              # NumPy has no bfloat16: most HF checkpoints are bf16
                tensors = read_safetensors_widened(path)
            for k, v in tensors.items():
                state[k] = v.astype(np.float32) if v.dtype != np.float32 else v
        return state
    bin_path = os.path.join(model_dir, "pytorch_model.bin")
    if os.path.exists(bin_path):
        import torch
        sd = torch.load(bin_path, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items()}
    raise ConversionError(f"{model_dir}: no *.safetensors or pytorch_model.bin found")


def convert_hf(model_dir: str, out_path: str, weight_type: str = "f32",
               progress: Callable[[str], None] | None = None) -> None:
    """Convert a local HF llama / qwen2 model directory to GGUF."""
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise ConversionError(f"{model_dir}: config.json not found (is this a Hugging Face model directory?)")
    with open(cfg_path, encoding="utf-8") as fh:
        config = json.load(fh)
    hparams = hparams_from_hf(config)      # checks the config's keys before the weights are read
    arch, tensors = hf_to_gguf_tensors(config, load_hf_state_dict(model_dir))
    vocab = None
    tj = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(tj):
        tc_path = os.path.join(model_dir, "tokenizer_config.json")
        tc = json.load(open(tc_path, encoding="utf-8")) if os.path.exists(tc_path) else {}
        vocab = vocab_from_tokenizer_json(tj, tc)
    write_llama_gguf(out_path, arch, hparams, tensors, weight_type, vocab, progress)
