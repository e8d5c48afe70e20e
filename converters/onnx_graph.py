"""A small ONNX graph builder: nodes with generated output names, initializers that stream to disk.

`GraphBuilder.op("MatMul", [a, b])` appends a node and returns its output name(s), so a graph
reads like the forward pass it computes. Initializers go to an `InitializerSink`, which keeps their
bytes in memory while the total stays under protobuf's 2 GiB limit and otherwise writes them to
one external data file beside the model (onnx's external-data convention: `location`, `offset`,
`length` on each tensor), so exporting a large model never holds all its weights in memory.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import ConversionError

CONTRIB_DOMAIN = "com.microsoft"
OPSET = 17                    # ai.onnx opset of the graphs written here
EMBED_LIMIT = 2**31 - 2**26   # bytes of initializers kept inside the .onnx file (protobuf: < 2 GiB)
ALIGN = 4096                  # external data offsets, page aligned so onnxruntime can map them


class InitializerSink:
    """Collects initializers; spills them to `data_path` once they outgrow EMBED_LIMIT."""

    def __init__(self, data_path: str, embed_limit: int = EMBED_LIMIT):
        self.data_path = data_path
        self.embed_limit = embed_limit
        self.tensors: list[TensorProto] = []
        self._held: list[tuple[TensorProto, bytes]] = []   # (tensor, raw bytes) not yet placed
        self._held_bytes = 0
        self._file = None
        self._offset = 0

    @property
    def external(self) -> bool:
        return self._file is not None

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")   # (np.ascontiguousarray would turn a scalar into [1])
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        data = array.tobytes()
        self.tensors.append(tensor)
        if self._file is None and self._held_bytes + len(data) <= self.embed_limit:
            self._held.append((tensor, data))
            self._held_bytes += len(data)
            return name
        if self._file is None:          # spill what is held, then stream from here on
            self._file = open(self.data_path, "wb")
            for held, held_data in self._held:
                self._write(held, held_data)
            self._held = []
        self._write(tensor, data)
        return name

    def _write(self, tensor: TensorProto, data: bytes) -> None:
        pad = -self._offset % ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        self._file.write(data)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", os.path.basename(self.data_path)), ("offset", str(self._offset)),
                           ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += len(data)

    def finish(self) -> list[TensorProto]:
        """Place what is still held (inside the model) and close the data file."""
        for tensor, data in self._held:
            tensor.raw_data = data
        self._held = []
        if self._file is not None:
            self._file.close()
            self._file = None
        return self.tensors


class GraphBuilder:
    """Nodes, graph inputs/outputs and initializers of one ONNX graph."""

    def __init__(self, sink: InitializerSink, use_contrib_ops: bool):
        self.sink = sink
        self.use_contrib_ops = use_contrib_ops
        self.nodes: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._names: dict[str, int] = {}
        self._consts: dict = {}

    def name(self, hint: str) -> str:
        """A fresh value name starting with `hint`."""
        n = self._names.get(hint, 0)
        self._names[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def op(self, op_type: str, inputs: list, n_outputs: int = 1, *, name: str | None = None,
           outputs: list | None = None, domain: str = "", **attrs):
        """Append a node; returns its output name (or a tuple of names when n_outputs > 1).
        `inputs` may hold "" for an omitted optional input; `outputs` fixes the output names."""
        hint = name or op_type.lower()
        if outputs is None:
            outputs = [self.name(hint if n_outputs == 1 else f"{hint}.{i}") for i in range(n_outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=self.name(f"n.{hint}"),
                                           domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def contrib(self, op_type: str, inputs: list, n_outputs: int = 1, **kw):
        return self.op(op_type, inputs, n_outputs, domain=CONTRIB_DOMAIN, **kw)

    def initializer(self, name: str, array: np.ndarray) -> str:
        return self.sink.add(name, array)

    def const(self, value, dtype=np.int64) -> str:
        """A small constant initializer (shared between uses of the same value)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.sink.add(self.name("const"), array)
        return self._consts[key]

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        """Declare graph output `name`, produced by the value `value` (renamed through Identity
        unless the value already has that name)."""
        if value != name:
            self.op("Identity", [value], outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def model(self, graph_name: str, producer: str, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.sink.finish())
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == CONTRIB_DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer, doc_string=doc)
        model.ir_version = 8  # readable by onnxruntime >= 1.14
        return model


def save_model(model: onnx.ModelProto, path: str) -> None:
    """Write the model proto (initializers already embedded or pointing at the external file)."""
    data = model.SerializeToString()
    if len(data) >= 2**31:
        raise ConversionError(f"{path}: the model proto is {len(data)} bytes, over protobuf's 2 GiB limit")
    with open(path, "wb") as f:
        f.write(data)


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
