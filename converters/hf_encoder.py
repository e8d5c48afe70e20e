"""Hugging Face BERT (and sentence-transformers) and GPT-2 checkpoints -> GGUF, as llama.cpp's
convert_hf_to_gguf.py writes them, so our files run in llama.cpp and theirs run here.

* `bert`: a `BertModel` directory, or a sentence-transformers directory (`modules.json` whose
  first module is the Transformer at path "" or a sub-folder, `1_Pooling/config.json`, and
  `sentence_bert_config.json`). Metadata: `bert.*` sizes, `bert.attention.causal = false`,
  `bert.pooling_type` (from the Pooling module: mean 1, CLS 2, last token 3; absent when the
  directory has no Pooling module), the WordPiece vocab in llama.cpp's "phantom space" form
  (a word-initial piece gets a leading "▁", a "##" continuation loses its "##"; control tokens
  stay as written) with `tokenizer.ggml.model = "bert"`, and the special ids and add-BOS/EOS flags
  that gguf.SpecialVocab reads from the tokenizer files. One key of our own,
  `bert.embedding.max_seq_length`, keeps sentence-transformers' truncation length (256 for
  all-MiniLM-L6-v2, below the 512 positions), so our embeddings truncate as `encode` does;
  llama.cpp ignores it.
* `gpt2`: a `GPT2LMHeadModel` directory. HF's Conv1D weights are [in, out]: they are transposed
  to ggml's [out, in]. `output.weight` is written (a copy of the tied embedding), as llama.cpp does.

Tensor names come from the gguf package's tables (`gguf.get_tensor_name_map`). Matrices are
written as F32 or F16 (`weight_type`), vectors and the token-type table as F32.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from .errors import ConversionError
from .hf import TOKEN_CONTROL, load_hf_state_dict, token_table, vocab_from_tokenizer_json

ENCODER_ARCHS = {"BertModel": "bert", "BertForMaskedLM": "bert", "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2"}
POOLING_TYPES = {"none": 0, "mean": 1, "cls": 2, "last": 3}
MAX_SEQ_LENGTH_KEY = "bert.embedding.max_seq_length"
WEIGHT_TYPES = ("f32", "f16")     # the types convert_encoder writes itself


def is_encoder_source(model_dir: str) -> bool:
    """True when model_dir is a BERT / sentence-transformers / GPT-2 directory this module converts."""
    try:
        config = _read_json(os.path.join(_transformer_dir(model_dir), "config.json"))
    except ConversionError:
        return False
    return _arch_of(config) is not None


def convert_encoder(model_dir: str, out_path: str, weight_type: str = "f32",
                    progress: Callable[[str], None] | None = None) -> str:
    """Convert a BERT / sentence-transformers or GPT-2 directory to a GGUF at out_path; returns
    the architecture written ("bert" or "gpt2")."""
    if weight_type.lower() not in WEIGHT_TYPES:
        raise ConversionError(f"--weights {weight_type!r}: bert and gpt2 convert to f32 or f16 "
                              f"(quantize the GGUF afterwards with `lmengine quantize`)")
    src = _transformer_dir(model_dir)
    config = _read_json(os.path.join(src, "config.json"))
    arch = _arch_of(config)
    if arch is None:
        raise ConversionError(f"{src}/config.json: architectures {config.get('architectures')} / model_type "
                              f"{config.get('model_type')!r} is not BERT or GPT-2")
    state = load_hf_state_dict(src)
    if arch == "bert":
        _write_bert(model_dir, src, config, state, out_path, weight_type.lower(), progress)
    else:
        _write_gpt2(src, config, state, out_path, weight_type.lower(), progress)
    return arch


# -- helpers ----------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot be read as JSON: {e}") from e


def _transformer_dir(model_dir: str) -> str:
    """The folder with config.json and the weights: model_dir itself, or the Transformer
    module's folder of a sentence-transformers directory."""
    modules = os.path.join(model_dir, "modules.json")
    if os.path.exists(modules):
        for module in _read_json(modules):
            if str(module.get("type", "")).endswith("models.Transformer"):
                return os.path.join(model_dir, module.get("path", ""))
    return model_dir


def _arch_of(config: dict) -> str | None:
    for name in config.get("architectures") or []:
        if name in ENCODER_ARCHS:
            return ENCODER_ARCHS[name]
    return {"bert": "bert", "gpt2": "gpt2"}.get(config.get("model_type"))


def _need(config: dict, key: str, where: str):
    if key not in config:
        raise ConversionError(f"{where}/config.json: key {key!r} is missing")
    return config[key]


def _sentence_transformers(model_dir: str) -> tuple[str | None, int | None]:
    """(pooling name or None, max_seq_length or None) of a sentence-transformers directory."""
    pooling, max_len = None, None
    modules = os.path.join(model_dir, "modules.json")
    if os.path.exists(modules):
        for module in _read_json(modules):
            if str(module.get("type", "")).endswith("models.Pooling"):
                cfg = _read_json(os.path.join(model_dir, module.get("path", ""), "config.json"))
                modes = [m for m, key in (("mean", "pooling_mode_mean_tokens"), ("cls", "pooling_mode_cls_token"),
                                          ("last", "pooling_mode_lasttoken")) if cfg.get(key)]
                others = [k for k in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                                      "pooling_mode_weightedmean_tokens") if cfg.get(k)]
                if len(modes) != 1 or others:
                    raise ConversionError(f"{model_dir}/{module.get('path', '')}/config.json: pooling "
                                          f"{modes + others} is not supported (one of mean, cls, lasttoken)")
                pooling = modes[0]
    st_config = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.exists(st_config):
        value = _read_json(st_config).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            max_len = value
    return pooling, max_len


def _add_tensors(writer, tensors: dict, weight_type: str, keep_f32: tuple, progress) -> None:
    for i, (name, value) in enumerate(tensors.items()):
        value = np.ascontiguousarray(value, dtype=np.float32)
        f16 = weight_type == "f16" and value.ndim == 2 and not name.startswith(keep_f32)
        writer.add_tensor(name, value.astype(np.float16) if f16 else value)
        if progress is not None:
            progress(f"[{i + 1}/{len(tensors)}] {name} {tuple(value.shape)} -> {'F16' if f16 else 'F32'}")


def _mapped(state: dict, arch, n_layers: int, strip: tuple, skip: tuple, where: str) -> dict:
    """state_dict renamed to GGUF names through the gguf package's table."""
    import gguf

    name_map = gguf.get_tensor_name_map(arch, n_layers)
    out = {}
    for name, value in state.items():
        short = name
        for prefix in strip:
            if short.startswith(prefix):
                short = short[len(prefix):]
        if short.endswith(skip):
            continue
        new = name_map.get_name(short, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConversionError(f"{where}: tensor {name!r} has no GGUF name in the {arch.name} table")
        out[new] = value
    return out


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# -- bert --------------------------------------------------------------------------------------

def _write_bert(model_dir, src, config, state, out_path, weight_type, progress) -> None:
    import gguf

    where = src
    n_layers = int(_need(config, "num_hidden_layers", where))
    dim = int(_need(config, "hidden_size", where))
    n_heads = int(_need(config, "num_attention_heads", where))
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"{where}/config.json: hidden_act {act!r} is not supported (gelu)")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{where}/config.json: position_embedding_type "
                              f"{config.get('position_embedding_type')!r} is not supported (absolute)")
    pooling, max_seq_len = _sentence_transformers(model_dir)
    tensors = _mapped(state, gguf.MODEL_ARCH.BERT, n_layers, ("bert.",),
                      ("position_ids", "pooler.dense.weight", "pooler.dense.bias"), where)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("cls")}  # no MLM head

    writer = gguf.GGUFWriter(out_path, "bert")
    writer.add_name(config.get("_name_or_path") or os.path.basename(os.path.abspath(model_dir)))
    writer.add_context_length(int(_need(config, "max_position_embeddings", where)))
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(int(_need(config, "intermediate_size", where)))
    writer.add_block_count(n_layers)
    writer.add_head_count(n_heads)
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_file_type(0 if weight_type == "f32" else 1)
    if pooling is not None:
        writer.add_pooling_type(gguf.PoolingType(POOLING_TYPES[pooling]))
    if max_seq_len is not None:
        writer.add_uint32(MAX_SEQ_LENGTH_KEY, max_seq_len)
    _add_wordpiece_vocab(writer, src, int(config.get("type_vocab_size", 1)))
    _add_tensors(writer, tensors, weight_type, ("token_types",), progress)
    _finish(writer)


def _add_wordpiece_vocab(writer, src: str, n_token_types: int) -> None:
    """tokenizer.json's WordPiece vocab in llama.cpp's phantom-space form, with gguf.SpecialVocab."""
    import gguf

    path = os.path.join(src, "tokenizer.json")
    spec = _read_json(path)
    model = spec.get("model") or {}
    _, tokens, types = token_table(spec, path + " (a bert model)", "WordPiece")
    n = len(tokens)
    prefix = model.get("continuing_subword_prefix", "##")

    def phantom(text, kind):
        if kind == TOKEN_CONTROL:
            return text
        return text[len(prefix):] if text.startswith(prefix) else "\u2581" + text

    writer.add_token_type_count(n_token_types)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([phantom(t, k) for t, k in zip(tokens, types)])
    writer.add_token_types(types)
    gguf.SpecialVocab(src, load_merges=False, n_vocab=n).add_to_gguf(writer, quiet=True)


# -- gpt2 --------------------------------------------------------------------------------------

def _write_gpt2(src, config, state, out_path, weight_type, progress) -> None:
    import gguf

    where = src
    n_layers = int(_need(config, "n_layer", where))
    dim = int(_need(config, "n_embd", where))
    act = config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"{where}/config.json: activation_function {act!r} is not supported "
                              f"(gelu_new, gelu_pytorch_tanh)")
    tensors = _mapped(state, gguf.MODEL_ARCH.GPT2, n_layers, ("transformer.",),
                      (".attn.bias", ".attn.masked_bias"), where)
    for name in list(tensors):      # Conv1D stores [in, out]; ggml wants [out, in]
        if name.endswith((".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")):
            tensors[name] = np.ascontiguousarray(tensors[name].T)
    if "output.weight" not in tensors:
        tensors["output.weight"] = tensors["token_embd.weight"]   # llama.cpp writes the tied copy

    writer = gguf.GGUFWriter(out_path, "gpt2")
    writer.add_name(config.get("_name_or_path") or os.path.basename(os.path.abspath(src)))
    writer.add_context_length(int(_need(config, "n_positions", where)))
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(int(config.get("n_inner") or 4 * dim))
    writer.add_block_count(n_layers)
    writer.add_head_count(int(_need(config, "n_head", where)))
    writer.add_layer_norm_eps(float(config.get("layer_norm_epsilon", 1e-5)))
    writer.add_file_type(0 if weight_type == "f32" else 1)
    tj = os.path.join(src, "tokenizer.json")
    if os.path.exists(tj):
        tc_path = os.path.join(src, "tokenizer_config.json")
        vocab = vocab_from_tokenizer_json(tj, _read_json(tc_path) if os.path.exists(tc_path) else {})
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")        # llama.cpp's name for GPT-2's pre-tokenizer
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["token_types"])
        writer.add_token_merges(vocab["merges"])
        for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                         ("pad_id", writer.add_pad_token_id)):
            if vocab.get(key) is not None:
                add(vocab[key])
        writer.add_add_bos_token(False)
    _add_tensors(writer, tensors, weight_type, (), progress)
    _finish(writer)
