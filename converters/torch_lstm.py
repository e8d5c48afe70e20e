"""PyTorch LSTM language model (a state_dict of Embedding -> nn.LSTM -> Linear) to GGUF `lstm`.

    emb = nn.Embedding(vocab, emb_dim)
    rnn = nn.LSTM(emb_dim, hidden, num_layers=L, batch_first=True or False)
    fc  = nn.Linear(hidden, vocab)

The state_dict holds `<emb>.weight`, `<rnn>.weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`,
`bias_hh_l{k}` and `<fc>.weight`, `<fc>.bias`. The module names are found from the shapes (and,
when two tensors fit, from their names); a description resolves what cannot be inferred:

    {"embedding": "encoder.weight", "lstm": "rnn", "output": "decoder",
     "batch_first": true, "output_activation": "linear", "vocab": "vocab.json" | {...} | [...]}

(every key optional; "lstm" and "output" are module prefixes, "embedding" a tensor key).
`batch_first` does not change the weights; it is accepted for the record. PyTorch's gate order
i, f, g, o is the canonical one; the two biases are summed (see converters/lstm_gguf.py).
Bidirectional LSTMs and LSTMs with proj_size are rejected with a clear error.
"""
from __future__ import annotations

import os
import re
from typing import Callable

import numpy as np

from .errors import ConversionError
from .lstm_gguf import (LSTMLayerWeights, LSTMWeights, dequantized_tensor, load_description, load_vocabulary,
                        print_progress, write_lstm_gguf)

_LSTM_KEY = re.compile(r"^(.*?)(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")
_EMBEDDING_HINTS = ("emb", "encoder", "wte", "token")
_OUTPUT_HINTS = ("fc", "out", "decoder", "head", "linear", "proj", "classifier", "dense", "lm")


def load_state_dict(source) -> dict:
    """name -> float32 ndarray from a state_dict file (torch.save(model.state_dict())), a
    checkpoint dict holding one under "state_dict"/"model_state_dict", or an in-memory dict."""
    where = "state dict"
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        if not os.path.isfile(where):
            raise ConversionError(f"{where}: no such file")
        import torch
        try:
            source = torch.load(where, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for pickles it refuses or cannot read
            raise ConversionError(
                f"{where}: cannot be read as a PyTorch state_dict ({type(e).__name__}: {str(e)[:200]}); "
                f"save the weights with torch.save(model.state_dict(), path)") from None
    if isinstance(source, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(source.get(key), dict):
                source = source[key]
                break
    if not isinstance(source, dict) or not source:
        raise ConversionError(f"{where}: expected a non-empty state_dict (name -> tensor), got {type(source).__name__}")
    out = {}
    for name, value in source.items():
        if hasattr(value, "detach"):
            value = value.detach().to("cpu").float().numpy()
        value = np.asarray(value)
        if value.dtype.kind not in "fiu":
            raise ConversionError(f"{where}: entry {name!r} is not a tensor (type {type(value).__name__})")
        out[str(name)] = value.astype(np.float32)
    return out


def _module_prefix(prefix: str) -> str:
    """'rnn' or 'rnn.' -> 'rnn.'; '' stays ''."""
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def _find_lstm(sd: dict, desc: dict):
    """(prefix, number of layers) of the nn.LSTM in the state dict."""
    prefixes = {}
    for key in sd:
        m = _LSTM_KEY.match(key)
        if m:
            prefix, kind, _, reverse = m.groups()
            if reverse:
                raise ConversionError(f"{key!r}: bidirectional LSTMs are not supported (a language model "
                                      f"reads left to right)")
            if kind == "weight_hr":
                raise ConversionError(f"{key!r}: LSTMs with proj_size are not supported")
            prefixes.setdefault(prefix, set()).add(int(m.group(3)))
    if "lstm" in desc:
        prefix = _module_prefix(desc["lstm"])
        if prefix not in prefixes:
            raise ConversionError(f"description names the LSTM {desc['lstm']!r}, but the state dict has no "
                                  f"{prefix}weight_ih_l0 (LSTM modules found: {sorted(p.rstrip('.') for p in prefixes)})")
    elif len(prefixes) == 1:
        prefix = next(iter(prefixes))
    elif not prefixes:
        raise ConversionError("the state dict holds no nn.LSTM weights (keys like 'lstm.weight_ih_l0')")
    else:
        raise ConversionError(f"the state dict holds several LSTM modules {sorted(prefixes)}; name the one to "
                              f"use with the description key \"lstm\"")
    layers = sorted(prefixes[prefix])
    if layers != list(range(len(layers))):
        raise ConversionError(f"LSTM {prefix!r}: layer indices {layers} are not 0..{len(layers) - 1}")
    if "num_layers" in desc and desc["num_layers"] != len(layers):
        raise ConversionError(f"description says num_layers={desc['num_layers']}, the state dict has {len(layers)}")
    return prefix, len(layers)


def _pick(candidates: list, hints: tuple, what: str):
    """The candidate key whose name carries a hint, when the shapes alone leave several."""
    if len(candidates) == 1:
        return candidates[0]
    hinted = [k for k in candidates if any(h in k.lower() for h in hints)]
    if len(hinted) == 1:
        return hinted[0]
    raise ConversionError(f"cannot tell which tensor is the {what}: candidates {candidates}; name it in the "
                          f"description")


def lstm_weights_from_state_dict(sd: dict, description=None) -> LSTMWeights:
    """Canonical LSTMWeights from a state dict (name -> float32 array)."""
    desc = load_description(description)
    prefix, n_layers = _find_lstm(sd, desc)
    used = set()

    def get(key):
        if key not in sd:
            raise ConversionError(f"the state dict has no {key!r}")
        used.add(key)
        return sd[key]

    layers = []
    for l in range(n_layers):
        w_ih, w_hh = get(f"{prefix}weight_ih_l{l}"), get(f"{prefix}weight_hh_l{l}")
        hidden = w_hh.shape[1] if w_hh.ndim == 2 else 0
        bias = np.zeros(4 * hidden, dtype=np.float32)
        for name in (f"{prefix}bias_ih_l{l}", f"{prefix}bias_hh_l{l}"):
            if name in sd:                      # nn.LSTM(bias=False) has neither
                bias = bias + get(name)
        layers.append(LSTMLayerWeights(w_ih=w_ih, w_hh=w_hh, bias=bias.astype(np.float32)))
    emb_dim, last_hidden = layers[0].w_ih.shape[1], layers[-1].hidden_size

    matrices = [k for k, v in sd.items() if v.ndim == 2 and k not in used]
    if "embedding" in desc:
        emb_key = desc["embedding"]
        if emb_key not in sd and emb_key + ".weight" in sd:
            emb_key += ".weight"
        if emb_key not in sd:
            raise ConversionError(f"description names the embedding {desc['embedding']!r}, not in the state dict")
    else:
        emb_key = _pick([k for k in matrices if sd[k].shape[1] == emb_dim], _EMBEDDING_HINTS,
                        f"embedding (shape [vocab, {emb_dim}])")
    embedding = get(emb_key)
    vocab = embedding.shape[0]
    if "output" in desc:
        out_key = _module_prefix(desc["output"]) + "weight"
        if out_key not in sd:
            raise ConversionError(f"description names the output layer {desc['output']!r}, but the state dict "
                                  f"has no {out_key!r}")
    else:
        out_key = _pick([k for k in matrices if k != emb_key and sd[k].shape == (vocab, last_hidden)],
                        _OUTPUT_HINTS, f"output Linear weight (shape [{vocab}, {last_hidden}])")
    output_weight = get(out_key)
    bias_key = out_key[:-len("weight")] + "bias"
    output_bias = get(bias_key) if bias_key in sd else np.zeros(output_weight.shape[0], dtype=np.float32)

    leftover = [k for k in sd if k not in used]
    if leftover:
        raise ConversionError(f"the state dict holds tensors outside Embedding -> LSTM -> Linear: {leftover}; "
                              f"this converter handles exactly that architecture")
    weights = LSTMWeights(embedding=embedding, layers=layers, output_weight=output_weight, output_bias=output_bias,
                          output_activation=desc.get("output_activation", "linear"), source="pytorch")
    weights.validate()
    return weights


def convert_torch_lstm(source, out_path, vocab=None, description=None, out_type: str = "F32", name: str = "",
                       progress: Callable | None = print_progress) -> dict:
    """Convert a PyTorch LSTM LM state_dict (file or dict) to GGUF. `vocab`: a vocabulary (JSON path,
    list, dict or lmengine.converters.lstm_gguf.Vocabulary; see load_vocabulary), or inside the description."""
    say = progress or (lambda msg: None)
    desc = load_description(description)
    say(f"reading {source if isinstance(source, (str, os.PathLike)) else 'state dict'}")
    weights = lstm_weights_from_state_dict(load_state_dict(source), desc)
    vocab = vocab if vocab is not None else desc.get("vocab")
    if vocab is None:
        raise ConversionError("a vocabulary is needed to write the tokenizer: pass vocab (a JSON file of the "
                              "tokens, index = id) or put \"vocab\" in the description")
    say(f"pytorch LSTM: vocab {weights.vocab_size}, embedding {weights.embedding.shape[1]}, "
        f"{len(weights.layers)} layer(s) of hidden {weights.hidden_sizes}")
    return write_lstm_gguf(out_path, weights, load_vocabulary(vocab), out_type, name, progress)


def torch_lstm_from_gguf(gguf_path):
    """PyTorch modules (embedding, lstm layers, output Linear) holding the weights of a GGUF `lstm`
    file, dequantized by the `gguf` package: the reference that tests and the benchmark compare our
    kernels with. `lstm` is a list of single-layer nn.LSTM (hidden sizes may differ per layer)."""
    import torch
    from . import lstm_gguf as layout
    from .gguf_file import MAX_LAYERS, GGUFFile
    f = GGUFFile(gguf_path)
    t = lambda name: torch.from_numpy(dequantized_tensor(f, name))   # noqa: E731
    embedding = torch.nn.Embedding.from_pretrained(t(layout.TOKEN_EMBD), freeze=True)
    layers = []
    n_layers = f.require(layout.KEY_BLOCK_COUNT, int)
    if not 1 <= n_layers <= MAX_LAYERS:
        raise ConversionError(f"{f.path}: {layout.KEY_BLOCK_COUNT} = {n_layers} is outside [1, {MAX_LAYERS}]")
    for l in range(n_layers):
        w_ih, w_hh = t(layout.lstm_ih(l)), t(layout.lstm_hh(l))
        lstm = torch.nn.LSTM(w_ih.shape[1], w_hh.shape[1], batch_first=True)
        with torch.no_grad():
            lstm.weight_ih_l0.copy_(w_ih)
            lstm.weight_hh_l0.copy_(w_hh)
            lstm.bias_ih_l0.copy_(t(layout.lstm_bias(l)))
            lstm.bias_hh_l0.zero_()
        layers.append(lstm.eval())
    w_out = t(layout.OUTPUT)
    head = torch.nn.Linear(w_out.shape[1], w_out.shape[0])
    with torch.no_grad():
        head.weight.copy_(w_out)
        head.bias.copy_(t(layout.OUTPUT_BIAS))
    return embedding, layers, head.eval()
