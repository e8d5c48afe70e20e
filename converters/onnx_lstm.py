"""Export an LSTM language model (GGUF `lstm`) to ONNX with the ONNX `LSTM` operator.

The graph steps: the recurrent state is a graph input and output, so a runner feeds the state it
got back from the previous call (prompt, then one token at a time, or any mix).

    inputs   input_ids      int64   [batch, seq]
             sequence_lens  int32   [batch]           tokens of each row (right padding after)
             past_h.{l}     float32 [1, batch, H_l]   state before the call, per layer l
             past_c.{l}     float32 [1, batch, H_l]
    outputs  logits         float32 [batch, seq, vocab]   pre-softmax; rows past sequence_lens
                                                          are unspecified
             present_h.{l}  float32 [1, batch, H_l]   state after each row's last token
             present_c.{l}  float32 [1, batch, H_l]

    Gather(token_embd) -> Transpose to [seq, batch, E] -> LSTM x L (Squeeze the direction axis)
    -> Transpose to [batch, seq, H] -> MatMul(output^T) -> Add(output.bias)

Weights are float32 (dequantized from the GGUF blocks with the `gguf` package). The ONNX gate
order is i, o, f, c, so W, R and B are reordered from the canonical i, f, g, o; the summed bias goes
in Wb and Rb is zero. The model's metadata_props carry "lmengine.lstm" (the config as JSON) and
"lmengine.tokenizer" (the GGUF's tokenizer.* keys as JSON), so a runner needs no other file.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from . import lstm_gguf as layout
from .errors import ConversionError
from .gguf_file import GGUFFile
from .lstm_gguf import dequantized_tensor, print_progress

OPSET = 17
META_CONFIG = "lmengine.lstm"
META_TOKENIZER = "lmengine.tokenizer"
MODEL_FILE = "model.onnx"


def _lstm_metadata(f: GGUFFile) -> tuple:
    """(config dict, tokenizer metadata dict) of a GGUF `lstm` file."""
    if f.get("general.architecture") != layout.ARCH:
        raise ConversionError(f"{f.path}: architecture {f.get('general.architecture')!r} is not {layout.ARCH!r}")
    hidden = f.get(layout.KEY_HIDDEN_SIZES)
    if not isinstance(hidden, list) or not hidden:
        raise ConversionError(f"{f.path}: metadata {layout.KEY_HIDDEN_SIZES!r} is missing")
    if not all(isinstance(h, int) and not isinstance(h, bool) for h in hidden):
        raise ConversionError(f"{f.path}: metadata {layout.KEY_HIDDEN_SIZES!r} must hold integers, got {hidden!r}")
    config = {"vocab_size": f.require(layout.KEY_VOCAB_SIZE, int), "emb_dim": f.require(layout.KEY_EMBEDDING_LENGTH, int),
              "hidden_sizes": [int(h) for h in hidden],
              "output_activation": f.get(layout.KEY_OUTPUT_ACTIVATION, "linear"),
              "gate_order_source": layout.CANONICAL_GATE_ORDER, "name": f.get("general.name", "")}
    tokenizer = {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.")}
    return config, tokenizer


def build_lstm_onnx(f: GGUFFile, progress: Callable | None = None):
    """The onnx.ModelProto of the LSTM in `f`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    say = progress or (lambda msg: None)
    config, tokenizer = _lstm_metadata(f)
    hidden = config["hidden_sizes"]
    inits, nodes = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))

    init("token_embd", dequantized_tensor(f, layout.TOKEN_EMBD))
    nodes.append(helper.make_node("Gather", ["token_embd", "input_ids"], ["embedded"], axis=0))   # [b, s, E]
    nodes.append(helper.make_node("Transpose", ["embedded"], ["x.0"], perm=[1, 0, 2]))           # [s, b, E]
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "direction_axis"))
    for l, h in enumerate(hidden):
        w = layout.reorder_gates(dequantized_tensor(f, layout.lstm_ih(l)), "canonical", "onnx")           # [4H, n_in]
        r = layout.reorder_gates(dequantized_tensor(f, layout.lstm_hh(l)), "canonical", "onnx")           # [4H, H]
        b = layout.reorder_gates(dequantized_tensor(f, layout.lstm_bias(l)), "canonical", "onnx")         # [4H]
        init(f"lstm.{l}.W", w[None])
        init(f"lstm.{l}.R", r[None])
        init(f"lstm.{l}.B", np.concatenate([b, np.zeros_like(b)])[None])                           # Wb ++ Rb
        nodes.append(helper.make_node(
            "LSTM", [f"x.{l}", f"lstm.{l}.W", f"lstm.{l}.R", f"lstm.{l}.B", "sequence_lens", f"past_h.{l}",
                     f"past_c.{l}"],
            [f"y.{l}", f"present_h.{l}", f"present_c.{l}"], hidden_size=h, direction="forward"))
        nodes.append(helper.make_node("Squeeze", [f"y.{l}", "direction_axis"], [f"x.{l + 1}"]))   # [s, b, H]
        say(f"layer {l}: LSTM hidden {h}")
    top = f"x.{len(hidden)}"
    init("output.weight_t", dequantized_tensor(f, layout.OUTPUT).T)                                       # [H, V]
    init("output.bias", dequantized_tensor(f, layout.OUTPUT_BIAS))
    nodes.append(helper.make_node("Transpose", [top], ["top"], perm=[1, 0, 2]))                     # [b, s, H]
    nodes.append(helper.make_node("MatMul", ["top", "output.weight_t"], ["logits_nobias"]))
    nodes.append(helper.make_node("Add", ["logits_nobias", "output.bias"], ["logits"]))

    float_t = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["batch"])]
    outputs = [helper.make_tensor_value_info("logits", float_t, ["batch", "seq", config["vocab_size"]])]
    for l, h in enumerate(hidden):
        for kind in "hc":
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{l}", float_t, [1, "batch", h]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{l}", float_t, [1, "batch", h]))
    graph = helper.make_graph(nodes, "lstm_lm", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lmengine")
    model.ir_version = min(model.ir_version, 9)        # readable by older onnxruntime releases too
    helper.set_model_props(model, {META_CONFIG: json.dumps(config), META_TOKENIZER: json.dumps(tokenizer)})
    onnx.checker.check_model(model)
    return model


def export_lstm_onnx(gguf_path, out_dir, progress: Callable | None = print_progress) -> str:
    """Write `out_dir/model.onnx` for the GGUF `lstm` model; returns its path."""
    import onnx
    say = progress or (lambda msg: None)
    f = GGUFFile(gguf_path)
    model = build_lstm_onnx(f, say)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.fspath(out_dir), MODEL_FILE)
    big = model.ByteSize() > 1_800_000_000               # protobuf's 2 GB limit: weights beside the graph
    onnx.save_model(model, path, save_as_external_data=big, location=MODEL_FILE + ".data" if big else None)
    say(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, opset {OPSET})")
    return path


def read_lstm_onnx_metadata(onnx_path) -> tuple:
    """(config dict, tokenizer metadata dict) stored in an exported model's metadata_props."""
    import onnx
    path = os.fspath(onnx_path)
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others
        raise ConversionError(f"{path}: cannot read the ONNX model: {e}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_CONFIG not in props:
        raise ConversionError(f"{path}: not an lmengine LSTM export (no {META_CONFIG!r} metadata)")
    return json.loads(props[META_CONFIG]), json.loads(props.get(META_TOKENIZER, "{}"))


def read_lstm_onnx_config(onnx_path) -> dict:
    return read_lstm_onnx_metadata(onnx_path)[0]
