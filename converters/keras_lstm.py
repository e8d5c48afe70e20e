"""Keras LSTM language model to GGUF `lstm`, read without Keras (json + h5py).

    Embedding(vocab, emb) -> LSTM(H_0, return_sequences=True) -> ... -> LSTM(H_last) -> Dense(vocab, softmax)

Accepted files:
- `.keras` (Keras 3): a zip of config.json (the architecture) and model.weights.h5.
- legacy `.h5` full models (`model.save("m.h5")`): the architecture in the `model_config` attribute,
  weights under `model_weights/<layer name>` listed by each group's `weight_names`.
- weights-only `.weights.h5` (Keras 3 `save_weights`) and legacy weights-only `.h5` (Keras 2,
  root attribute `layer_names`): the architecture is inferred from the variables (Embedding: one
  matrix; LSTM: kernel, recurrent_kernel, bias; Dense: kernel, bias), chained by their shapes.
  The Dense activation is not stored there: pass it in the description ({"output_activation":
  "softmax"}); the logits are the Dense pre-activation either way.

Layers understood in the model: InputLayer, Embedding, LSTM (tanh / sigmoid, forward), Dense or
TimeDistributed(Dense) with activation softmax / log_softmax / linear, a final Activation of one of
those, and the inference no-ops Dropout, SpatialDropout1D, GaussianNoise, GaussianDropout.
Keras stores the LSTM kernels as [n_in, 4H] and [H, 4H] in gate order i, f, c, o (c is the
canonical g): they are transposed to [4H, n_in] / [4H, H]; see converters/lstm_gguf.py.
"""
from __future__ import annotations

import io
import json
import os
import re
import zipfile
from typing import Callable

import numpy as np

from .errors import ConversionError
from .lstm_gguf import LSTMLayerWeights, LSTMWeights, load_description, load_vocabulary, print_progress, write_lstm_gguf

NO_OP_LAYERS = ("InputLayer", "Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout")
HEAD_ACTIVATIONS = {None: "linear", "linear": "linear", "softmax": "softmax", "log_softmax": "log_softmax"}


# --- reading the file -------------------------------------------------------------------------

def read_keras_file(path):
    """(layers, arrays) of a Keras model file. layers: [(class_name, config)] in model order, or
    None for a weights-only file; arrays: layer name -> [numpy arrays in Keras variable order]."""
    import h5py
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                config = json.loads(z.read("config.json"))
                weights = io.BytesIO(z.read("model.weights.h5"))
        except (KeyError, json.JSONDecodeError, zipfile.BadZipFile) as e:
            raise ConversionError(f"{path}: not a Keras 3 .keras archive (config.json + model.weights.h5): {e}") from None
        with h5py.File(weights, "r") as h5:
            return _layers_from_config(config, path), _keras3_arrays(h5, path)
    try:
        h5 = h5py.File(path, "r")
    except OSError as e:
        raise ConversionError(f"{path}: neither a .keras archive nor an HDF5 file: {e}") from None
    with h5:
        if "model_config" in h5.attrs:                     # legacy full model
            config = json.loads(_text(h5.attrs["model_config"]))
            return _layers_from_config(config, path), _legacy_arrays(h5["model_weights"], path)
        if "layer_names" in h5.attrs:                      # legacy weights only
            return None, _legacy_arrays(h5, path)
        if "layers" in h5:                                 # Keras 3 weights only
            return None, _keras3_arrays(h5, path)
    raise ConversionError(f"{path}: an HDF5 file without Keras model weights")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _layers_from_config(config: dict, path: str) -> list:
    """[(class_name, layer config)] of a Sequential or single-chain Functional model."""
    if config.get("class_name") not in ("Sequential", "Functional", "Model"):
        raise ConversionError(f"{path}: a {config.get('class_name')!r} model; expected Sequential or Functional")
    entries = config.get("config", {}).get("layers")
    if not isinstance(entries, list):
        raise ConversionError(f"{path}: the model config lists no layers")
    layers = [(e["class_name"], e.get("config", {})) for e in entries]
    if config["class_name"] != "Sequential":            # check that the graph is one chain
        names = [cfg.get("name") for _, cfg in layers]
        for k, entry in enumerate(entries[1:], start=1):
            inbound = _names_in(entry.get("inbound_nodes", []), set(names))
            if inbound != {names[k - 1]}:
                raise ConversionError(f"{path}: layer {names[k]!r} takes its input from {sorted(inbound)}, not "
                                      f"from the layer before it; only single-chain models are converted")
    return layers


def _names_in(obj, known: set) -> set:
    """Layer names mentioned anywhere in an inbound_nodes structure (Keras 2 and 3 formats)."""
    if isinstance(obj, str):
        return {obj} & known
    if isinstance(obj, dict):
        return set().union(*(_names_in(v, known) for v in obj.values())) if obj else set()
    if isinstance(obj, (list, tuple)):
        return set().union(*(_names_in(v, known) for v in obj)) if obj else set()
    return set()


def _keras3_arrays(h5, path: str) -> dict:
    """Keras 3 layout: layers/<key>/[.../]vars/<i>, the layer's name in the `vars` group's attrs.
    Keys are class names numbered in creation order (lstm, lstm_1, ...): the result follows them."""
    out = {}
    if "layers" not in h5:
        return out
    for key, group in sorted(h5["layers"].items(), key=lambda item: _suffix_order(item[0])):
        name = _text(group["vars"].attrs.get("name", key)) if "vars" in group else key
        found = []
        group.visititems(lambda sub, obj: found.append((sub, obj)) if hasattr(obj, "shape") else None)
        # vars/0, vars/1, ... (at any depth: LSTM under cell/, TimeDistributed under layer/)
        found.sort(key=lambda item: (item[0].rsplit("/", 1)[0], int(item[0].rsplit("/", 1)[1])))
        out[name] = [np.asarray(obj[()], dtype=np.float32) for _, obj in found]
    return out


def _legacy_arrays(root, path: str) -> dict:
    """Keras 2 / legacy h5 layout: <layer name>/<weight name> listed by `weight_names`."""
    out = {}
    for name in root.attrs.get("layer_names", []):
        name = _text(name)
        group = root[name]
        out[name] = [np.asarray(group[_text(w)][()], dtype=np.float32) for w in group.attrs.get("weight_names", [])]
    return out


# --- architecture -----------------------------------------------------------------------------

def _check_lstm(cfg: dict, name: str) -> None:
    for key, want in (("activation", "tanh"), ("recurrent_activation", "sigmoid")):
        if cfg.get(key, want) != want:
            raise ConversionError(f"LSTM {name!r}: {key}={cfg.get(key)!r} is not supported (only {want!r})")
    if cfg.get("go_backwards"):
        raise ConversionError(f"LSTM {name!r}: go_backwards=True is not supported")


def lstm_weights_from_keras(layers, arrays: dict, description=None, progress: Callable | None = None) -> LSTMWeights:
    """Canonical LSTMWeights from `read_keras_file`'s result."""
    say = progress or (lambda msg: None)
    desc = dict(description or {})
    plan = _plan_from_config(layers, arrays, say) if layers is not None else _plan_from_arrays(arrays, desc, say)
    emb_name, lstm_names, head_name, activation = plan
    if "output_activation" in desc:
        activation = desc["output_activation"]
    (embedding,) = _expect(arrays, emb_name, 1, "Embedding")
    lstm_layers = []
    for name in lstm_names:
        kernel, recurrent, *bias = _expect(arrays, name, (2, 3), "LSTM")
        bias = bias[0] if bias else np.zeros(kernel.shape[1], dtype=np.float32)
        lstm_layers.append(LSTMLayerWeights(w_ih=np.ascontiguousarray(kernel.T), w_hh=np.ascontiguousarray(recurrent.T),
                                            bias=bias))
    kernel, *bias = _expect(arrays, head_name, (1, 2), "Dense")
    output_bias = bias[0] if bias else np.zeros(kernel.shape[1], dtype=np.float32)
    weights = LSTMWeights(embedding=embedding, layers=lstm_layers, output_weight=np.ascontiguousarray(kernel.T),
                          output_bias=output_bias, output_activation=activation, source="keras")
    weights.validate()
    return weights


def _expect(arrays: dict, name: str, counts, kind: str) -> list:
    got = arrays.get(name)
    counts = counts if isinstance(counts, tuple) else (counts,)
    if got is None:
        raise ConversionError(f"{kind} layer {name!r} has no weights in the file")
    if len(got) not in counts:
        raise ConversionError(f"{kind} layer {name!r} has {len(got)} weight arrays, expected {' or '.join(map(str, counts))}")
    return got


def _plan_from_config(layers, arrays, say):
    """(embedding name, [LSTM names], head name, activation) from the model's layer list."""
    emb_name, lstm_names, head_name, activation = None, [], None, None
    for k, (cls, cfg) in enumerate(layers):
        name = cfg.get("name", f"layer {k}")
        if cls in NO_OP_LAYERS:
            continue
        if head_name is not None:
            act = cfg.get("activation")
            if cls == "Activation" and act in HEAD_ACTIVATIONS and (activation == "linear" or act in (None, "linear")):
                activation = HEAD_ACTIVATIONS[act] if activation == "linear" else activation
                continue
            raise ConversionError(f"layer {name!r} ({cls}, activation {act!r}) after the output Dense is not "
                                  f"supported (a softmax / log_softmax / linear Activation is)")
        if cls == "Embedding":
            if emb_name is not None or lstm_names:
                raise ConversionError(f"Embedding {name!r} must be the first layer, and the only Embedding")
            if cfg.get("mask_zero"):
                say(f"note: Embedding {name!r} has mask_zero=True; the engine does not pad, so id 0 is read "
                    f"as an ordinary token")
            emb_name = name
        elif cls == "LSTM":
            if emb_name is None:
                raise ConversionError(f"LSTM {name!r} comes before any Embedding; the model must start with one")
            if lstm_names and not _returns_sequences(layers, lstm_names[-1]):
                raise ConversionError(f"LSTM {lstm_names[-1]!r} feeds {name!r} without return_sequences=True")
            _check_lstm(cfg, name)
            lstm_names.append(name)
        elif cls in ("Dense", "TimeDistributed"):
            inner = cfg.get("layer", {}) if cls == "TimeDistributed" else {"class_name": "Dense", "config": cfg}
            if inner.get("class_name") != "Dense":
                raise ConversionError(f"TimeDistributed {name!r} wraps a {inner.get('class_name')}, not a Dense")
            act = inner["config"].get("activation")
            if act not in HEAD_ACTIVATIONS:
                raise ConversionError(f"Dense {name!r}: activation {act!r} is not a language-model head "
                                      f"(expected one of softmax, log_softmax, linear)")
            if not lstm_names:
                raise ConversionError(f"Dense {name!r} comes before any LSTM layer")
            head_name, activation = name, HEAD_ACTIVATIONS[act]
        else:
            raise ConversionError(f"layer {name!r} of type {cls} is not supported in an LSTM language model "
                                  f"(Embedding -> LSTM... -> Dense)")
    if emb_name is None or not lstm_names or head_name is None:
        raise ConversionError("the model is not Embedding -> LSTM (one or more) -> Dense: found "
                              f"{[cls for cls, _ in layers if cls not in NO_OP_LAYERS]}")
    return emb_name, lstm_names, head_name, activation


def _returns_sequences(layers, name) -> bool:
    return any(cfg.get("name") == name and cfg.get("return_sequences", False) for _, cfg in layers)


def _suffix_order(name: str):
    """'lstm' < 'lstm_1' < 'lstm_2' < 'lstm_10' (Keras numbers layers of a class in creation order)."""
    m = re.match(r"^(.*?)(?:_(\d+))?$", name)
    return (m.group(1), int(m.group(2) or 0))


def _plan_from_arrays(arrays: dict, desc: dict, say):
    """The architecture of a weights-only file, from the arrays' counts and shapes."""
    embeddings = [n for n, a in arrays.items() if len(a) == 1 and a[0].ndim == 2]
    # `arrays` is in model order (see _keras3_arrays / _legacy_arrays), which orders stacked LSTMs.
    lstms = [n for n, a in arrays.items() if len(a) in (2, 3) and a[0].ndim == 2 and a[1].ndim == 2]
    heads = [n for n, a in arrays.items() if len(a) == 2 and a[0].ndim == 2 and a[1].ndim == 1]
    if len(embeddings) != 1:
        raise ConversionError(f"weights-only file: expected one Embedding matrix, found {embeddings or 'none'}")
    if not lstms:
        raise ConversionError("weights-only file: no LSTM layer (kernel, recurrent_kernel, bias) found")
    n_in = arrays[embeddings[0]][0].shape[1]
    for name in lstms:
        if arrays[name][0].shape[0] != n_in:
            raise ConversionError(f"weights-only file: LSTM {name!r} takes inputs of {arrays[name][0].shape[0]}, "
                                  f"the layer before gives {n_in}")
        n_in = arrays[name][1].shape[0]
    heads = [n for n in heads if arrays[n][0].shape[0] == n_in]
    if len(heads) != 1:
        raise ConversionError(f"weights-only file: expected one Dense [{n_in}, vocab] head, found {heads or 'none'}")
    activation = desc.get("output_activation", "softmax")
    say(f"weights-only file: architecture inferred as {embeddings[0]} -> {' -> '.join(lstms)} -> {heads[0]}; "
        f"output activation {activation!r} (the file does not record it; logits are the Dense pre-activation)")
    return embeddings[0], lstms, heads[0], activation


def convert_keras(path, out_path, vocab=None, description=None, out_type: str = "F32", name: str = "",
                  progress: Callable | None = print_progress) -> dict:
    """Convert a Keras LSTM LM file (.keras, .h5, .weights.h5) to GGUF. `vocab`: the vocabulary
    (JSON path, list, dict or Vocabulary; see lmengine.converters.lstm_gguf.load_vocabulary), or "vocab" in
    the description (a dict or JSON path: {"output_activation": ..., "vocab": ...})."""
    say = progress or (lambda msg: None)
    desc = load_description(description)
    say(f"reading {os.fspath(path)}")
    layers, arrays = read_keras_file(path)
    weights = lstm_weights_from_keras(layers, arrays, desc, say)
    vocab = vocab if vocab is not None else desc.get("vocab")
    if vocab is None:
        raise ConversionError("a vocabulary is needed to write the tokenizer: pass vocab (a JSON file of the "
                              "tokens, index = id) or put \"vocab\" in the description")
    say(f"keras LSTM: vocab {weights.vocab_size}, embedding {weights.embedding.shape[1]}, "
        f"{len(weights.layers)} layer(s) of hidden {weights.hidden_sizes}, head {weights.output_activation}")
    return write_lstm_gguf(out_path, weights, load_vocabulary(vocab), out_type, name, progress)
