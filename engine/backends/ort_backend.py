"""Run an ONNX decoder export (converters/onnx_export.py, or any graph with the same inputs and
outputs) with onnxruntime, behind the engine's Backend contract.

The graph appends tokens to a KV cache given as inputs (`past_key_values.{i}.key|value`,
[batch, n_kv_heads, past, head_dim]) and returns the longer cache (`present.*`). Caches stay in
onnxruntime's memory on the execution provider's device (OrtValues bound with IO binding): a
decode step hands the previous step's present tensors back as past without copying them through
NumPy, which matters on a GPU.

KV stores. A store is one set of 2 * n_layers tensors [batch, n_kv_heads, T, head_dim], as a run
returned them. A slot's cache is a window of one row of a store: positions [begin, begin + n) of
row `row` hold the slot's tokens 0..n-1. Stores are never written after they are made, so slots
can share them (copy_slot is free). A run can take a store as its past directly when the store
holds exactly the slots of the run, in order, each ending at T; then positions before `begin` are
padding, hidden by the attention mask (left padding: a batch of sequences of different lengths).
Otherwise the rows are first gathered into a new store by a small helper graph on the same device
(rows end-aligned, left padded), which is also how a rewind (forward with start_pos < n) drops
the tail. In steady batched decoding the same slots step together, so no gather runs at all.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import BackendError, ContextLengthError, InvalidParameterError
from ..validation import check_token_ids
from .base import Backend, checked_thread_count

GENAI_CONFIG = "genai_config.json"
PREFILL_CHUNK = 256   # prompt tokens per run: bounds the [chunk, vocab] logits and attention scores
DEVICE_OF_PROVIDER = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
_NP_OF_ORT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}


class _Store:
    """2 * n_layers OrtValues [batch, n_kv_heads, length, head_dim] (k0, v0, k1, v1, ...)."""

    __slots__ = ("values", "batch", "length")

    def __init__(self, values: list, batch: int, length: int):
        self.values, self.batch, self.length = values, batch, length


class _SlotState:
    """Slot tokens 0..n-1 live at positions [begin, begin + n) of row `row` of `store`."""

    __slots__ = ("store", "row", "begin", "n")

    def __init__(self, store: _Store | None = None, row: int = 0, begin: int = 0, n: int = 0):
        self.store, self.row, self.begin, self.n = store, row, begin, n


def read_genai_config(model_dir: str) -> dict:
    """genai_config.json of an export directory, checked for what this backend needs."""
    if not os.path.isdir(model_dir):
        raise BackendError(f"{model_dir}: not a directory (an ONNX export directory holds {GENAI_CONFIG} "
                           f"and model.onnx; make one with `lmengine convert MODEL DIR --to onnx`)")
    path = os.path.join(model_dir, GENAI_CONFIG)
    if not os.path.isfile(path):
        raise BackendError(f"{model_dir}: no {GENAI_CONFIG} in this directory (make the export with "
                           f"`lmengine convert MODEL DIR --to onnx`, which writes it beside model.onnx)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise BackendError(f"{path}: not a readable JSON file: {e}") from e
    model = config.get("model") if isinstance(config, dict) else None
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict):
        raise BackendError(f"{path}: missing field 'model.decoder'")
    missing = [f"model.decoder.{k}" for k in ("filename", "num_hidden_layers", "num_key_value_heads", "head_size")
               if k not in decoder] + (["model.vocab_size"] if "vocab_size" not in model else [])
    if missing:
        raise BackendError(f"{path}: missing field(s) {', '.join(missing)}")
    if config.get("search", {}).get("past_present_share_buffer"):
        raise BackendError(f"{path}: search.past_present_share_buffer is true; this backend runs graphs whose "
                           f"present KV outputs are past + new positions (set it to false for such a graph)")
    return config


def _provider_name(p) -> str:
    return p[0] if isinstance(p, (tuple, list)) else p


class OrtBackend(Backend):
    """A decoder export run by onnxruntime.

    model_dir: directory with genai_config.json and the model file it names.
    providers: onnxruntime execution providers in order of preference, as names or
        (name, options) pairs (default: CPUExecutionProvider).
    n_ctx: positions per slot (default and maximum: the export's context_length).
    n_slots: sequences held at once. n_threads: intra-op threads (None: onnxruntime's default).
    """

    supports_rewind = True

    def __init__(self, model_dir: str, providers=None, n_ctx: int | None = None, n_slots: int = 1,
                 n_threads: int | None = None):
        import onnxruntime as ort
        self._ort = ort
        self.model_dir = os.fspath(model_dir)
        self.genai_config = read_genai_config(self.model_dir)
        model, decoder = self.genai_config["model"], self.genai_config["model"]["decoder"]
        self.model_path = os.path.join(self.model_dir, decoder["filename"])
        if not os.path.isfile(self.model_path):
            raise BackendError(f"{self.model_dir}: {GENAI_CONFIG} names the model file {decoder['filename']!r}, "
                               f"which is not in the directory")
        self.n_layers = int(decoder["num_hidden_layers"])
        self.n_kv_heads = int(decoder["num_key_value_heads"])
        self.head_dim = int(decoder["head_size"])
        self.vocab_size = int(model["vocab_size"])
        self.context_length = int(model.get("context_length", 0)) or None
        self.bos_token_id = model.get("bos_token_id")
        eos = model.get("eos_token_id")
        self.eos_token_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        self.names = self._io_names(decoder)
        self.config = None  # no TransformerConfig: the engine reads sizes from the attributes above

        if n_ctx is None:
            n_ctx = self.context_length or 2048
        if not isinstance(n_ctx, int) or n_ctx < 1:
            raise InvalidParameterError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        if self.context_length and n_ctx > self.context_length:
            raise ContextLengthError(
                f"n_ctx={n_ctx} is larger than the export's context_length {self.context_length} "
                f"({os.path.join(self.model_dir, GENAI_CONFIG)}): its rope tables hold no more positions")
        if not isinstance(n_slots, int) or n_slots < 1:
            raise InvalidParameterError(f"n_slots must be a positive integer, got {n_slots!r}")
        self.n_ctx, self.n_slots = n_ctx, n_slots

        self.providers = self._check_providers(providers)
        first = _provider_name(self.providers[0])
        self.device = DEVICE_OF_PROVIDER.get(first, "cpu")
        options = self.providers[0][1] if isinstance(self.providers[0], (tuple, list)) else {}
        self.device_id = int(options.get("device_id", 0)) if self.device != "cpu" else 0
        self.n_threads = None
        self._threads_wanted = n_threads
        self.session = None
        self._gathers = {}   # number of source stores -> helper session
        self._open_session()
        self.slots = [_SlotState() for _ in range(n_slots)]

    # -- setup -----------------------------------------------------------------------------------
    def _io_names(self, decoder) -> dict:
        inputs, outputs = decoder.get("inputs", {}), decoder.get("outputs", {})
        past_k = inputs.get("past_key_names", "past_key_values.%d.key")
        past_v = inputs.get("past_value_names", "past_key_values.%d.value")
        present_k = outputs.get("present_key_names", "present.%d.key")
        present_v = outputs.get("present_value_names", "present.%d.value")
        past, present = [], []
        for i in range(self.n_layers):
            past += [past_k % i, past_v % i]
            present += [present_k % i, present_v % i]
        return {"input_ids": inputs.get("input_ids", "input_ids"),
                "attention_mask": inputs.get("attention_mask", "attention_mask"),
                "position_ids": inputs.get("position_ids", "position_ids"),
                "logits": outputs.get("logits", "logits"), "past": past, "present": present}

    def _check_providers(self, providers) -> list:
        available = self._ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
        if isinstance(providers, str):
            providers = [providers]
        providers = list(providers)
        if not providers:
            raise BackendError(f"providers is empty; available execution providers: {', '.join(available)}")
        for p in providers:
            name = _provider_name(p)
            if name not in available:
                hint = " (install onnxruntime-gpu for CUDAExecutionProvider)" if name.startswith("CUDA") else ""
                raise BackendError(f"execution provider {name!r} is not available in this onnxruntime "
                                   f"{self._ort.__version__}{hint}; available: {', '.join(available)}")
        return providers

    def _session_options(self):
        so = self._ort.SessionOptions()
        if self.n_threads:
            so.intra_op_num_threads = self.n_threads
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        return so

    def _open_session(self) -> None:
        """(Re)create the session with the wanted thread count."""
        self.n_threads = self._threads_wanted
        try:
            self.session = self._ort.InferenceSession(self.model_path, self._session_options(),
                                                      providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"{self.model_path}: onnxruntime cannot load the model: {e}") from e
        used = self.session.get_providers()
        if _provider_name(self.providers[0]) not in used:
            raise BackendError(f"onnxruntime did not enable {_provider_name(self.providers[0])} "
                               f"for {self.model_path} (session uses {used})")
        self._check_graph()
        self._gathers = {}

    def _check_graph(self) -> None:
        """The graph's inputs and outputs are what genai_config.json says, with shapes we can feed."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        n = self.names
        want_in = [n["input_ids"], n["attention_mask"], n["position_ids"]] + n["past"]
        want_out = [n["logits"]] + n["present"]
        for name in want_in:
            if name not in inputs:
                raise BackendError(f"{self.model_path}: the graph has no input {name!r} (inputs: "
                                   f"{', '.join(list(inputs)[:8])}{', ...' if len(inputs) > 8 else ''})")
        for name in want_out:
            if name not in outputs:
                raise BackendError(f"{self.model_path}: the graph has no output {name!r}")
        extra = [name for name in inputs if name not in want_in]
        if extra:
            raise BackendError(f"{self.model_path}: the graph takes inputs this backend does not feed: {extra}")
        self._dtypes = {}
        for name in want_in:
            dtype = _NP_OF_ORT.get(inputs[name].type)
            if dtype is None:
                raise BackendError(f"{self.model_path}: input {name!r} has type {inputs[name].type}, "
                                   f"which this backend cannot feed")
            self._dtypes[name] = dtype
        shape = inputs[n["past"][0]].shape
        if len(shape) != 4 or shape[1] != self.n_kv_heads or shape[3] != self.head_dim:
            raise BackendError(f"{self.model_path}: input {n['past'][0]!r} has shape {shape}; {GENAI_CONFIG} "
                               f"says [batch, {self.n_kv_heads}, past, {self.head_dim}]")
        self._kv_dtype = self._dtypes[n["past"][0]]

    def set_threads(self, n_threads: int | None) -> None:
        n_threads = checked_thread_count(n_threads, self.max_threads)
        if n_threads != self.n_threads:
            self._threads_wanted = n_threads
            self._open_session()   # a session's thread pool is fixed when it is made

    def close(self) -> None:
        self.slots = [_SlotState() for _ in range(self.n_slots)]
        self.session = None
        self._gathers = {}

    # -- checks ----------------------------------------------------------------------------------
    def _check_slot(self, slot) -> int:
        if not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.n_slots:
            raise InvalidParameterError(f"slot {slot!r} out of range [0, {self.n_slots})")
        return int(slot)

    # -- Backend ---------------------------------------------------------------------------------
    def forward(self, slot, token_ids, start_pos, all_logits=False):
        slot = self._check_slot(slot)
        tokens = check_token_ids(token_ids, self.vocab_size)
        n = tokens.shape[0]
        if n == 0:
            raise InvalidParameterError("forward needs at least one token")
        state = self.slots[slot]
        if not 0 <= start_pos <= state.n:
            raise InvalidParameterError(
                f"start_pos {start_pos} is outside [0, {state.n}] (slot {slot} holds {state.n} positions)")
        if start_pos + n > self.n_ctx:
            raise ContextLengthError(f"positions {start_pos}..{start_pos + n - 1} do not fit the context "
                                     f"of {self.n_ctx} tokens")
        outputs = []
        for begin in range(0, n, PREFILL_CHUNK):
            chunk = tokens[begin: begin + PREFILL_CHUNK]
            pos = start_pos + begin
            store, lead = self._single_past(state, pos)        # `lead` padding positions before the slot's
            m = chunk.shape[0]
            mask = np.ones((1, lead + pos + m), np.int64)
            mask[0, :lead] = 0
            logits, present = self._run(store, chunk[None, :], mask, np.arange(pos, pos + m)[None, :])
            self.slots[slot] = state = _SlotState(present, 0, lead, pos + m)
            last = begin + PREFILL_CHUNK >= n
            if all_logits:
                outputs.append(logits[0])
            elif last:
                outputs.append(logits[0, -1:])
        return np.concatenate(outputs, axis=0) if len(outputs) > 1 else outputs[0]

    def forward_batch(self, slots, token_ids, positions):
        tokens = check_token_ids(token_ids, self.vocab_size)
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        b = tokens.shape[0]
        if not (slots.shape == positions.shape == tokens.shape):
            raise InvalidParameterError("slots, token_ids and positions must have the same length")
        if b == 0:
            return np.zeros((0, self.vocab_size), np.float32)
        for s in slots:
            self._check_slot(int(s))
        if len(set(slots.tolist())) != b:
            raise InvalidParameterError("forward_batch takes one token per slot (a slot appears twice)")
        states = [self.slots[int(s)] for s in slots]
        for s, state, p in zip(slots, states, positions):
            if not 0 <= p <= state.n:
                raise InvalidParameterError(f"position {p} for slot {s} is outside [0, {state.n}] "
                                            f"(the slot holds {state.n} positions)")
            if p >= self.n_ctx:
                raise ContextLengthError(f"position {p} is outside the context of {self.n_ctx} tokens")
        store = self._batch_past(states, positions)
        T = store.length
        mask = (np.arange(T + 1)[None, :] >= (T - positions)[:, None]).astype(np.int64)   # [b, T + 1]
        logits, present = self._run(store, tokens[:, None], mask, positions[:, None])
        for i, s in enumerate(slots):
            self.slots[int(s)] = _SlotState(present, i, int(T - positions[i]), int(positions[i]) + 1)
        return logits[:, -1, :]

    def copy_slot(self, src, dst, n_tokens):
        src, dst = self._check_slot(src), self._check_slot(dst)
        state = self.slots[src]
        if not 0 <= n_tokens <= state.n:
            raise InvalidParameterError(f"copy_slot: slot {src} holds {state.n} positions, asked for {n_tokens}")
        if src != dst or n_tokens != state.n:
            self.slots[dst] = _SlotState(state.store, state.row, state.begin, n_tokens)

    # -- KV plumbing -----------------------------------------------------------------------------
    def _single_past(self, state: _SlotState, n: int):
        """(store, lead): a batch-1 store whose last n positions are the slot's first n tokens,
        after `lead` padding positions."""
        if state.store is not None and state.store.batch == 1 and state.begin + n == state.store.length:
            return state.store, state.begin
        return self._gather([state], [n], n), 0

    def _batch_past(self, states: list, lengths: np.ndarray) -> _Store:
        """A store whose row i ends with the first lengths[i] tokens of states[i]."""
        first = states[0].store
        if first is not None and first.batch == len(states) and all(
                st.store is first and st.row == i and st.begin + int(n) == first.length
                for i, (st, n) in enumerate(zip(states, lengths))):
            return first
        return self._gather(states, [int(n) for n in lengths], int(max(lengths)))

    def _empty_store(self, batch: int) -> _Store:
        shape = [batch, self.n_kv_heads, 0, self.head_dim]
        values = [self._ort.OrtValue.ortvalue_from_shape_and_type(shape, self._kv_dtype, self.device, self.device_id)
                  for _ in self.names["past"]]
        return _Store(values, batch, 0)

    def _gather(self, states: list, lengths: list, length: int) -> _Store:
        """New store [len(states), n_kv, length, head_dim]: row i = left padding, then positions
        [begin, begin + lengths[i]) of states[i]'s row. Runs on the device (helper graph)."""
        sources = []                       # distinct stores holding the rows we need
        for st, n in zip(states, lengths):
            if n and not any(st.store is s for s in sources):
                sources.append(st.store)
        if not sources or length == 0:
            return self._empty_store(len(states))
        offsets, total = [], 0            # where each source starts in the concatenated rows
        for s in sources:
            offsets.append(total)
            total += s.batch * self.n_kv_heads * s.length
        idx = np.zeros((len(states), self.n_kv_heads, length), np.int64)     # pads read row 0
        heads = np.arange(self.n_kv_heads)
        for i, (st, n) in enumerate(zip(states, lengths)):
            if n == 0:
                continue
            j = next(k for k, s in enumerate(sources) if s is st.store)
            T = sources[j].length
            first = offsets[j] + (st.row * self.n_kv_heads + heads) * T + st.begin          # [n_kv]
            idx[i, :, length - n:] = first[:, None] + np.arange(n)[None, :]
        session = self._gather_session(len(sources))
        binding = session.io_binding()
        for j, s in enumerate(sources):
            for t, value in enumerate(s.values):
                binding.bind_ortvalue_input(f"x{t}_{j}", value)
        binding.bind_cpu_input("idx", idx)
        for t in range(len(self.names["past"])):
            binding.bind_output(f"y{t}", self.device, self.device_id)
        session.run_with_iobinding(binding)
        return _Store(binding.get_outputs(), len(states), length)

    def _gather_session(self, n_sources: int):
        if n_sources not in self._gathers:
            model = gather_graph(len(self.names["past"]), n_sources, self.head_dim, self._kv_dtype)
            self._gathers[n_sources] = self._ort.InferenceSession(
                model.SerializeToString(), self._session_options(), providers=self.providers)
        return self._gathers[n_sources]

    def _run(self, past: _Store, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray):
        """One run of the decoder: (logits float32 [b, s, vocab], present store)."""
        n = self.names
        binding = self.session.io_binding()
        binding.bind_cpu_input(n["input_ids"], np.ascontiguousarray(ids, dtype=self._dtypes[n["input_ids"]]))
        binding.bind_cpu_input(n["attention_mask"],
                               np.ascontiguousarray(mask, dtype=self._dtypes[n["attention_mask"]]))
        binding.bind_cpu_input(n["position_ids"],
                               np.ascontiguousarray(positions, dtype=self._dtypes[n["position_ids"]]))
        for name, value in zip(n["past"], past.values):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(n["logits"], "cpu")
        for name in n["present"]:
            binding.bind_output(name, self.device, self.device_id)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            raise BackendError(f"{self.model_path}: onnxruntime failed to run the decoder "
                               f"(batch {ids.shape[0]}, {ids.shape[1]} tokens, past {past.length}): {e}") from e
        outputs = binding.get_outputs()
        logits = np.array(outputs[0].numpy(), dtype=np.float32)     # a copy: the OrtValue is freed below
        return logits, _Store(outputs[1:], ids.shape[0], past.length + ids.shape[1])


def gather_graph(n_tensors: int, n_sources: int, head_dim: int, dtype=np.float32):
    """ONNX graph: y{t} = Gather(Concat_j(Reshape(x{t}_{j}, [-1, head_dim])), idx) for each of the
    n_tensors KV tensors; idx int64 [b, n_kv, length] picks rows of head_dim values, so
    y{t} is [b, n_kv, length, head_dim]."""
    from onnx import TensorProto, helper, numpy_helper
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inputs = [], [helper.make_tensor_value_info("idx", TensorProto.INT64, ["b", "h", "n"])]
    outputs = []
    shape = numpy_helper.from_array(np.array([-1, head_dim], np.int64), "flat_shape")
    for t in range(n_tensors):
        flats = []
        for j in range(n_sources):
            x = f"x{t}_{j}"
            inputs.append(helper.make_tensor_value_info(x, elem, [f"b{j}", "h", f"T{j}", head_dim]))
            nodes.append(helper.make_node("Reshape", [x, "flat_shape"], [f"{x}_flat"]))
            flats.append(f"{x}_flat")
        rows = flats[0]
        if n_sources > 1:
            rows = f"cat{t}"
            nodes.append(helper.make_node("Concat", flats, [rows], axis=0))
        nodes.append(helper.make_node("Gather", [rows, "idx"], [f"y{t}"], axis=0))
        outputs.append(helper.make_tensor_value_info(f"y{t}", elem, ["b", "h", "n", head_dim]))
    graph = helper.make_graph(nodes, "kv_gather", inputs, outputs, [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
