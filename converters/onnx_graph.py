"""A small ONNX graph builder: nodes with generated output names, initializers written straight
to disk.

`GraphBuilder.op("MatMul", [a, b])` appends a node and returns its output name(s), so a graph
reads like the forward pass it computes.

Initializers go to an `InitializerSink`. Protobuf caps a message at 2 GiB, so weights beyond
that go to one external data file beside the model (onnx's convention: `location`, `offset`,
`length` on each tensor), streamed as they come, so a large export never holds all its weights
in memory. Below the cap they stay inside model.onnx; there too they are streamed into the file
(`save_model` writes their protobuf records itself) rather than copied into a message first,
which would cost two extra copies of every weight and seconds per 100 MB in the protobuf runtime.
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
SMALL = 4096                  # tensors below this many bytes always sit in the graph message
                              # (shape constants, which graph checks and shape inference read)


class InitializerSink:
    """Collects initializers: small ones in the graph, large ones held for `save_model` to stream
    into model.onnx, or written to `data_path` once they outgrow EMBED_LIMIT."""

    def __init__(self, data_path: str, embed_limit: int | None = None):
        self.data_path = data_path
        self.embed_limit = EMBED_LIMIT if embed_limit is None else embed_limit
        self.tensors: list[TensorProto] = []               # in the graph message
        self.held: list[tuple[TensorProto, np.ndarray]] = []  # (header without data, values) for save_model
        self._held_bytes = 0
        self._file = None
        self._offset = 0

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")   # (np.ascontiguousarray would turn a scalar into [1])
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        if array.nbytes < SMALL:
            tensor.raw_data = array.tobytes()
            self.tensors.append(tensor)
        elif self._file is None and self._held_bytes + array.nbytes <= self.embed_limit:
            self.held.append((tensor, array))
            self._held_bytes += array.nbytes
        else:
            if self._file is None:          # from here on the large tensors live in the data file
                self._file = open(self.data_path, "wb")
                for held, values in self.held:
                    self._write(held, values)
                self.held = []
            self._write(tensor, array)
        return name

    def _write(self, tensor: TensorProto, array: np.ndarray) -> None:
        pad = -self._offset % ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        self._file.write(array.data)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", os.path.basename(self.data_path)), ("offset", str(self._offset)),
                           ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.tensors.append(tensor)
        self._offset += array.nbytes

    def finish(self) -> list[TensorProto]:
        """Close the data file; returns the tensors that go into the graph message."""
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
        self._initializers: set = set()

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
        if name in self._initializers:
            raise ConversionError(f"initializer {name!r} added twice")
        self._initializers.add(name)
        return self.sink.add(name, array)

    def has_initializer(self, name: str) -> bool:
        return name in self._initializers

    def const(self, value, dtype=np.int64) -> str:
        """A small constant initializer (shared between uses of the same value)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(self.name("const"), array)
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
        self.held = self.sink.held   # large initializers for save_model to append
        return model


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_key(message, field: str) -> bytes:
    """Protobuf key of a length-delimited field (wire type 2)."""
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)


def save_model(model: onnx.ModelProto, path: str, held: list = ()) -> None:
    """Write `model`, plus the `held` initializers ((TensorProto header, values) pairs) appended
    to its graph. Protobuf lets a message's fields come in any order and repeated fields in
    pieces, so the file is: the model without its graph, the graph's key and length, the graph
    without the held tensors, then one `initializer` record per held tensor, its values last
    (`raw_data`), written from the array itself."""
    graph = model.graph
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    records = []                                   # (bytes before the values, values)
    for tensor, values in held:
        header = tensor.SerializeToString() + _field_key(tensor, "raw_data") + _varint(values.nbytes)
        body = len(header) + values.nbytes
        records.append((_field_key(graph, "initializer") + _varint(body) + header, values))
    graph_bytes = graph.SerializeToString()
    graph_len = len(graph_bytes) + sum(len(head) + values.nbytes for head, values in records)
    start = rest.SerializeToString() + _field_key(model, "graph") + _varint(graph_len)
    if len(start) + graph_len >= 2**31:
        raise ConversionError(f"{path}: the model would be {len(start) + graph_len} bytes, over protobuf's 2 GiB limit")
    with open(path, "wb") as f:
        f.write(start)
        f.write(graph_bytes)
        for head, values in records:
            f.write(head)
            f.write(values.data)


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
