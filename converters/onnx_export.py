"""Export a decoder GGUF (llama, qwen2, qwen3, gpt2) as one decoder-only ONNX graph, with a genai_config.json.

    export_onnx(gguf_file, config, out_dir, weights="f32" | "int4", use_contrib_ops=True)

The graph (one for prefill and decode, the layout HF's and onnxruntime-genai's exports use):

    inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64,
             position_ids [batch, seq] int64,
             past_key_values.{i}.key | .value  [batch, n_kv_heads, past, head_dim] float32
    outputs  logits [batch, seq, vocab] float32,
             present.{i}.key | .value  [batch, n_kv_heads, past + seq, head_dim] float32

attention_mask marks real tokens (1) and padding (0) over past and new positions, so a batch of
prompts can be left padded; a key is attended to when its mask is 1 and it is not after the query.

Weights: "f32" stores every matrix as a float32 initializer (dequantized from the GGUF blocks);
"int4" stores 4-bit blocks for onnxruntime's MatMulNBits, carried over bit for bit from Q4_0, Q4_1
and Q4_K blocks (Q8_0 blocks become 8-bit MatMulNBits, also bit for bit) and quantized from float
otherwise (converters/onnx_weights.py). Q4_1 and Q4_K hold `d * q + m`; MatMulNBits computes
`(q - zero_point) * scale` and is fast only with integer zero points, so such a weight is split:

    x @ W.T = MatMulNBits(x; q, scale=d, zero_point=0) + blocksum(x) @ m.T

where blocksum(x) [tokens, n_cols/32] sums x over each 32-column block and m [n_rows, n_cols/32]
holds the blocks' minimums. Both terms are exact; the second reads 1 extra bit per weight.
`accuracy_level` 0 (default) keeps activations in float32, so the int4 graph computes the GGUF's
own numbers; 4 quantizes them to int8 per block (faster, llama.cpp-like error). A token table in
Q8_0 / Q4_0 blocks is gathered from those blocks (GatherBlockQuantized), shared with a tied output.
Matrices that read the same input (q|k|v, gate|up) are stacked into one matmul.

Rope: ggml rotates adjacent pairs (2i, 2i+1) for llama (llama.cpp's converter permuted the rows
of attn_q / attn_k within each head to make that equal HF's rotate_half) and pairs (i, i + d/2)
("NEOX") for qwen2. The export takes the rows of attn_q / attn_k of a llama file back to HF's
order, so rope here is always HF's rotate_half over the first rope_dim dims of a head (what
onnxruntime's RotaryEmbedding computes with interleaved=0). Attention scores are invariant
under that permutation since q and k rows move together.

`use_contrib_ops=True` builds rotary embedding, RMSNorm (+ residual add) and attention from
onnxruntime's contrib ops (RotaryEmbedding, SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization, GroupQueryAttention); False uses standard ONNX ops only.
GroupQueryAttention needs head_dim % 8 == 0: other head sizes get the standard-op attention (and
rope) with the contrib norms and matmuls.

gpt2 (`_GPT2Decoder`): the same inputs and outputs (n_kv_heads = n_heads), no rope: learned
positions (position_embd gathered at position_ids), LayerNorm with bias (LayerNormalization;
SkipLayerNormalization with contrib ops), fused q|k|v with bias (one matmul, split in three),
tanh-approximated GELU (FastGelu with contrib ops, else written out), output tied to token_embd
unless the file has output.weight. max_positions cannot pass gpt2.context_length.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Callable

import numpy as np

from .errors import ConversionError, TensorShapeError, UnsupportedArchitectureError
from .onnx_graph import FLOAT, INT32, INT64, GraphBuilder, InitializerSink, save_model
from .onnx_weights import BLOCK, F32, Q4_0, Q8_0, concat_nbits, dequantize, permute_rows, to_nbits, to_nbits_bits

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
WEIGHT_KINDS = ("f32", "int4")
ARCHS = ("llama", "qwen2", "qwen3", "gpt2")   # qwen3: RMSNorm of each q / k head before rope
# archs whose GGUF attn_q / attn_k rows are in ggml's adjacent-pair rope order
ADJACENT_PAIR_ROPE = ("llama",)
MASKED = -1e9   # attention bias of a padded key: exp(MASKED) == 0, and never inf (no NaN anywhere)


def export_onnx(gguf_file, config, out_dir: str, weights: str = "f32", use_contrib_ops: bool = True,
                accuracy_level: int = 0, max_positions: int | None = None,
                progress: Callable[[str], None] | None = None) -> str:
    """Write `out_dir`/model.onnx (+ model.onnx.data when the weights pass 2 GiB) and
    `out_dir`/genai_config.json for the GGUF `gguf_file` (a lmengine.converters.gguf_file.GGUFFile) whose
    decoder is described by `config` (lmengine.config.TransformerConfig or anything with its fields).

    weights: "f32" or "int4". accuracy_level: MatMulNBits' activation precision for 4-bit blocks
    (0: float32, the same numbers as dequantizing the GGUF; 4: activations quantized to int8 per
    block, faster, as llama.cpp does). 8-bit blocks (from Q8_0) always use 4: onnxruntime has no
    fast float32 kernel for them (~100x slower).
    max_positions: positions of the rope tables (default: the model's training context).
    Returns the path of model.onnx."""
    if weights not in WEIGHT_KINDS:
        raise ConversionError(f"weights={weights!r} is not supported (choose one of {', '.join(WEIGHT_KINDS)})")
    if config.arch not in ARCHS:
        raise UnsupportedArchitectureError(
            f"{gguf_file.path}: architecture {config.arch!r} cannot be exported to ONNX "
            f"(supported: {', '.join(ARCHS)})")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConversionError(f"accuracy_level={accuracy_level!r} must be 0, 1, 2, 3 or 4")
    max_positions = int(max_positions or config.n_ctx_train)
    if max_positions < 1:
        raise ConversionError(f"max_positions={max_positions} must be positive")
    if config.arch == "gpt2" and max_positions > config.n_ctx_train:
        raise ConversionError(f"max_positions={max_positions} is beyond gpt2's {config.n_ctx_train} learned positions")
    config = _graph_config(config)
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, MODEL_FILE)
    data_path = os.path.join(out_dir, DATA_FILE)
    if os.path.exists(data_path):
        os.remove(data_path)  # a stale data file from an earlier, larger export

    say = progress or (lambda message: None)
    g = GraphBuilder(InitializerSink(data_path), use_contrib_ops)
    decoder = _GPT2Decoder if config.arch == "gpt2" else _Decoder
    decoder(g, GGUFWeights(gguf_file, config), config, weights, accuracy_level, max_positions, say).build()
    model = g.model(f"{config.arch}_decoder", "lmengine", doc=f"{getattr(config, 'name', None) or config.arch} from "
                    f"{os.path.basename(gguf_file.path)}, {weights} weights")
    for key, value in {"lmengine.weights": weights, "lmengine.use_contrib_ops": str(int(use_contrib_ops)),
                       "lmengine.source": os.path.basename(gguf_file.path), "lmengine.arch": config.arch,
                       "lmengine.max_positions": str(max_positions)}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    say(f"writing {model_path}")
    save_model(model, model_path, g.held)
    write_genai_config(out_dir, gguf_file, config, max_positions)
    return model_path


def _graph_config(config):
    """`config` with the fields the graph and genai_config.json read: a gpt2 config
    (lmengine.models.gpt2.GPT2Config) gains n_kv_heads = n_heads, q_dim = dim and rope_dim = 0."""
    if config.arch != "gpt2":
        return config
    return SimpleNamespace(**vars(config), n_kv_heads=config.n_heads, q_dim=config.dim, rope_dim=0)


# -- weights ---------------------------------------------------------------------------------

def hf_rope_row_order(n_heads: int, head_dim: int, rope_dim: int) -> np.ndarray:
    """Row indices that take attn_q / attn_k rows from ggml's adjacent-pair rope order to HF's
    rotate_half order: within each head, HF row s * rope_dim/2 + i (s in {0, 1}) is GGUF row
    2i + s; rows from rope_dim on are not rotated and keep their place."""
    within = np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2),
                             np.arange(rope_dim, head_dim)])       # HF row j <- GGUF row within[j]
    return (np.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


class GGUFWeights:
    """Tensors of a GGUF decoder, with attn_q / attn_k rows in HF rope order."""

    def __init__(self, gguf_file, config):
        self.file = gguf_file
        self.config = config
        self._rows = {}
        if config.arch in ADJACENT_PAIR_ROPE:
            self._rows["attn_q"] = hf_rope_row_order(config.n_heads, config.head_dim, config.rope_dim)
            self._rows["attn_k"] = hf_rope_row_order(config.n_kv_heads, config.head_dim, config.rope_dim)

    def has(self, name: str) -> bool:
        return name in self.file.tensors

    def raw(self, name: str):
        """(raw uint8 blocks, ggml type id, NumPy-order shape) with rope rows reordered."""
        info = self.file.tensors.get(name)
        if info is None:
            raise TensorShapeError(f"{self.file.path}: tensor {name!r} is missing")
        raw = self.file.tensor_bytes(name)
        kind = name.split(".")[-2] if name.startswith("blk.") else ""
        if kind in self._rows:
            raw = permute_rows(raw, info.shape, self._rows[kind])
        return raw, info.type_id, tuple(info.shape)

    def f32(self, name: str) -> np.ndarray:
        raw, type_id, shape = self.raw(name)
        return dequantize(raw, type_id, shape)


def rope_tables(max_positions: int, rope_dim: int, base: float, freq_factors=None, linear_factor: float = 1.0):
    """cos, sin float32 [max_positions, rope_dim/2] of the angle (pos / linear_factor) * theta_i,
    theta_i = base^(-2i/rope_dim) / freq_factors[i] (ggml's optional rope_freqs), in float64."""
    inv_freq = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64)
    angle = (np.arange(max_positions, dtype=np.float64) / linear_factor)[:, None] * inv_freq[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


# -- the graph -------------------------------------------------------------------------------

class _Decoder:
    """Builds the decoder graph into a GraphBuilder, reading weights from GGUFWeights."""

    rotary = True     # rope on q and k (False: gpt2's learned positions)

    def __init__(self, g: GraphBuilder, w: GGUFWeights, config, weights: str, accuracy_level: int,
                 max_positions: int, say):
        self.g, self.w, self.c = g, w, config
        self.int4 = weights == "int4"
        self.accuracy_level = accuracy_level
        self.max_positions = max_positions
        self.say = say
        self._blocksums = {}   # value name -> its per-32-block sums (shared by the matrices it feeds)
        self._nbits = {}       # tuple of GGUF names -> (NBitsMatrix, initializer names)
        # onnxruntime's GroupQueryAttention (and RotaryEmbedding with it) wants head_dim % 8 == 0:
        # other heads get the standard-op attention, contrib ops elsewhere
        self.gqa = g.use_contrib_ops and config.head_dim % 8 == 0
        self._check_rope_scaling()

    def _check_rope_scaling(self):
        meta = self.w.file.metadata
        kind = meta.get(f"{self.c.arch}.rope.scaling.type", "none")
        if kind not in ("none", "linear", "yarn"):
            raise ConversionError(f"{self.w.file.path}: rope scaling {kind!r} is not supported by the ONNX export")
        self.rope_linear_factor = float(meta.get(f"{self.c.arch}.rope.scaling.factor", 1.0)) \
            if kind == "linear" else 1.0
        self.rope_kind = kind

    # -- building blocks ---------------------------------------------------------------------
    def linear(self, x: str, names: list, biases: list | None = None) -> list:
        """x [tokens, n_cols] @ W.T (+ b) for each GGUF matrix in `names` ([n_rows_i, n_cols] each).
        Matrices that take the same input are stacked into one matmul and split after it."""
        g = self.g
        biases = biases or [None] * len(names)
        mats = [self.w.raw(name) for name in names]           # (raw, type_id, shape)
        n_rows = [shape[0] for _, _, shape in mats]
        n_cols = mats[0][2][1]
        hint = names[0].removesuffix(".weight") + ("+" if len(names) > 1 else "")
        has_bias = [bool(b) and self.w.has(b) for b in biases]
        bias = g.initializer(hint + ".bias", np.concatenate([
            self.w.f32(b) if has else np.zeros(n, np.float32) for b, has, n in zip(biases, has_bias, n_rows)])) \
            if any(has_bias) else ""
        if not self.int4 or n_cols % BLOCK or all(t == F32 for _, t, _ in mats) and sum(n_rows) * n_cols < 65536:
            # float32 (also: rows that are not whole blocks, and small float tensors)
            weight = hint + ".weight"       # (the embedding table, when the output is tied to it)
            if not g.has_initializer(weight):
                g.initializer(weight, np.concatenate([dequantize(*m) for m in mats]))
            y = g.op("Gemm", [x, weight] + ([bias] if bias else []), name=hint, transB=1)
            return self.split(y, n_rows)
        if len({to_nbits_bits(t) for _, t, _ in mats}) > 1:   # e.g. Q8_0 next to Q4_K: one matmul each
            return [self.linear(x, [name], [b])[0] for name, b in zip(names, biases)]
        m, inits = self.nbits(names)
        inputs = [x, inits["packed"], inits["scales"], inits.get("zero_points", "")]
        if bias:
            inputs += ["", bias]
        y = g.contrib("MatMulNBits", inputs, name=hint, K=n_cols, N=m.n_rows, bits=m.bits, block_size=BLOCK,
                      accuracy_level=self.accuracy_level if m.bits == 4 else 4)
        if m.block_mins is not None:
            # y + blocksum(x) @ block_mins.T, as one Gemm with y as its C input
            y = g.op("Gemm", [self.blocksum(x, n_cols), inits["block_mins"], y], name=hint + ".mins", transB=1)
        return self.split(y, n_rows)

    def nbits(self, names: list):
        """(NBitsMatrix, {part: initializer name}) of the GGUF matrices `names` stacked along the
        rows; made once per set of names (the tied output and the embedding share theirs)."""
        key = tuple(names)
        if key not in self._nbits:
            m = concat_nbits([to_nbits(*self.w.raw(name)) for name in names])
            hint = names[0].removesuffix(".weight") + ("+" if len(names) > 1 else "")
            parts = {"packed": m.packed, "scales": m.scales, "zero_points": m.zero_points, "block_mins": m.block_mins}
            inits = {part: self.g.initializer(f"{hint}.{part}", value) for part, value in parts.items()
                     if value is not None}
            self._nbits[key] = (m, inits)
        return self._nbits[key]

    def embedding(self, ids: str) -> str:
        """Token rows [B, S, dim]. int4 with contrib ops: gathered from the table's 8-bit (Q8_0)
        or 4-bit (Q4_0) blocks (GatherBlockQuantized), which a tied output shares; otherwise
        from a float32 table."""
        g, name = self.g, "token_embd.weight"
        _, type_id, (n_rows, n_cols) = self.w.raw(name)
        if self.int4 and g.use_contrib_ops and type_id in (Q8_0, Q4_0) and n_cols % BLOCK == 0:
            m, inits = self.nbits([name])
            table = g.op("Reshape", [inits["packed"], g.const([n_rows, -1])])            # [vocab, dim*bits/8]
            return g.contrib("GatherBlockQuantized", [table, ids, inits["scales"]], name="embed", bits=m.bits,
                             block_size=BLOCK, gather_axis=0, quantize_axis=1)
        table = g.initializer(name, self.w.f32(name))                                      # [vocab, dim]
        return g.op("Gather", [table, ids], name="embed")

    def split(self, y: str, sizes: list) -> list:
        """[tokens, sum(sizes)] -> one [tokens, size] value per size."""
        if len(sizes) == 1:
            return [y]
        return list(self.g.op("Split", [y, self.g.const(sizes)], len(sizes), axis=1))

    def blocksum(self, x: str, n_cols: int) -> str:
        """[tokens, n_cols] -> [tokens, n_cols / 32]: sums over each block of 32 columns, as a
        matmul with a 0/1 matrix [n_cols, n_cols / 32] (shared by every matrix x feeds)."""
        if x not in self._blocksums:
            g = self.g
            key = f"block_indicator.{n_cols}"
            if key not in self._blocksums:
                ones = np.kron(np.eye(n_cols // BLOCK, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
                self._blocksums[key] = g.initializer(key, ones)
            self._blocksums[x] = g.op("MatMul", [x, self._blocksums[key]], name="blocksum")
        return self._blocksums[x]

    def rmsnorm(self, x: str, weight: str) -> str:
        g = self.g
        w = g.initializer(weight, self.w.f32(weight))
        eps = float(self.c.norm_eps)
        if g.use_contrib_ops:
            # registered by onnxruntime in the default domain
            return g.op("SimplifiedLayerNormalization", [x, w], name="rmsnorm", axis=-1, epsilon=eps, stash_type=1)
        mean_sq = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
        inv_rms = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean_sq, g.const(eps, np.float32)])])])
        return g.op("Mul", [g.op("Mul", [x, inv_rms]), w], name="rmsnorm")

    def add_rmsnorm(self, x: str, residual: str, weight: str):
        """(rmsnorm(residual + x), residual + x)."""
        g = self.g
        if g.use_contrib_ops:
            w = g.initializer(weight, self.w.f32(weight))
            normed, _, _, total = g.contrib("SkipSimplifiedLayerNormalization", [x, residual, w], 4,
                                            name="add_rmsnorm", epsilon=float(self.c.norm_eps))
            return normed, total
        total = g.op("Add", [residual, x], name="residual")
        return self.rmsnorm(total, weight), total

    # -- the forward pass --------------------------------------------------------------------
    def graph_inputs(self):
        """(input_ids, attention_mask, position_ids, [(past key, past value) per layer]) declared
        as the graph's inputs; also sets self.shape_bs_any, the shape [B, S, -1]."""
        g, c = self.g, self.c
        ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
        mask = g.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
        positions = g.input("position_ids", INT64, ["batch_size", "sequence_length"])
        kv_shape = ["batch_size", c.n_kv_heads, "past_sequence_length", c.head_dim]
        past = [(g.input(f"past_key_values.{i}.key", FLOAT, kv_shape), g.input(f"past_key_values.{i}.value", FLOAT, kv_shape))
                for i in range(c.n_layers)]
        batch_seq = g.op("Shape", [ids], name="batch_seq")                                # [B, S]
        self.shape_bs_any = g.op("Concat", [batch_seq, g.const([-1])], axis=0)            # [B, S, -1]
        return ids, mask, positions, past

    def output_logits(self, xn: str) -> None:
        """Declare the logits output [B, S, vocab] of the final normed states xn [B*S, dim]:
        output.weight, or the tied token_embd. Logits come first among the outputs."""
        g, c = self.g, self.c
        self.say("output")
        out_name = "output.weight" if self.w.has("output.weight") else "token_embd.weight"
        logits = self.linear(xn, [out_name])[0]                                           # [B*S, vocab]
        logits = g.op("Reshape", [logits, self.shape_bs_any])
        g.output(logits, "logits", FLOAT, ["batch_size", "sequence_length", c.vocab_size])
        g.outputs.insert(0, g.outputs.pop())   # logits first, then present.{i}.key|value

    def build(self):
        g, c = self.g, self.c
        ids, mask, positions, past = self.graph_inputs()
        self.say("embedding")
        h = g.op("Reshape", [self.embedding(ids), g.const([-1, c.dim])])                   # [B*S, dim]
        self.attention_inputs(mask, positions)

        xn = self.rmsnorm(h, "blk.0.attn_norm.weight")
        for i in range(c.n_layers):
            self.say(f"layer {i + 1}/{c.n_layers}")
            blk = f"blk.{i}."
            q, k, v = self.linear(xn, [blk + "attn_q.weight", blk + "attn_k.weight", blk + "attn_v.weight"],
                                  [blk + "attn_q.bias", blk + "attn_k.bias", blk + "attn_v.bias"])  # [B*S, q|kv|kv]
            attn = self.attention(i, q, k, v, *past[i])                                   # [B*S, q_dim]
            out = self.linear(attn, [blk + "attn_output.weight"])[0]
            xn, h = self.add_rmsnorm(out, h, blk + "ffn_norm.weight")
            gate, up = self.linear(xn, [blk + "ffn_gate.weight", blk + "ffn_up.weight"])  # [B*S, ffn_dim] x 2
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])], name="silu"), up], name="swiglu")
            down = self.linear(act, [blk + "ffn_down.weight"])[0]
            next_norm = f"blk.{i + 1}.attn_norm.weight" if i + 1 < c.n_layers else "output_norm.weight"
            xn, h = self.add_rmsnorm(down, h, next_norm)
        self.output_logits(xn)

    def attention_inputs(self, mask: str, positions: str):
        """Values every layer's attention shares: rope tables, the mask as a bias."""
        g = self.g
        if self.rotary:
            self.rope_inputs()
        self.positions = positions
        total = g.op("Gather", [g.op("Shape", [mask]), g.const(1)], name="total_len")     # T (scalar)
        keep = g.op("Cast", [mask], to=9)                                                  # bool [B, T]
        if self.gqa:
            # GroupQueryAttention: every row holds T positions (padding is masked by the bias);
            # it applies the causal mask itself from seqlens_k = T - 1.
            batch = g.op("Gather", [g.op("Shape", [mask]), g.const([0])], name="batch")    # [1]
            self.total_len = g.op("Cast", [total], to=INT32)
            self.seqlens_k = g.op("Expand", [g.op("Sub", [self.total_len, g.const(1, np.int32)]), batch],
                                  name="seqlens_k")
            seq = g.op("Gather", [g.op("Shape", [positions]), g.const([1])], name="seq")  # [1]
            pad_bias = g.op("Where", [g.op("Unsqueeze", [keep, g.const([1, 2])]), g.const(0.0, np.float32),
                                      g.const(MASKED, np.float32)])                        # [B, 1, 1, T]
            self.bias = g.op("Expand", [pad_bias, g.op("Concat", [batch, g.const([1]), seq, g.op(
                "Unsqueeze", [total, g.const([0])])], axis=0)], name="attention_bias")     # [B, 1, S, T]
        else:
            # key j is visible to query i (at absolute index T - S + i) when j <= T - S + i
            seq_len = g.op("Gather", [g.op("Shape", [positions]), g.const(1)], name="seq_len")
            past_len = g.op("Sub", [total, seq_len])
            query_at = g.op("Add", [g.op("Range", [g.const(0), seq_len, g.const(1)]), past_len])     # [S]
            key_at = g.op("Range", [g.const(0), total, g.const(1)])                                     # [T]
            causal = g.op("LessOrEqual", [g.op("Unsqueeze", [key_at, g.const([0])]),
                                          g.op("Unsqueeze", [query_at, g.const([1])])])              # [S, T]
            visible = g.op("And", [g.op("Unsqueeze", [keep, g.const([1])]), causal])                   # [B, S, T]
            self.bias = g.op("Unsqueeze", [g.op("Where", [visible, g.const(0.0, np.float32),
                                                          g.const(MASKED, np.float32)]), g.const([1, 2])],
                             name="attention_bias")                                                   # [B,1,1,S,T]
            if self.rotary:
                self.cos_at = g.op("Unsqueeze", [g.op("Gather", [self.cos, positions]), g.const([2])])  # [B,S,1,half]
                self.sin_at = g.op("Unsqueeze", [g.op("Gather", [self.sin, positions]), g.const([2])])

    def rope_inputs(self):
        """The rope tables cos, sin [max_positions, rope_dim/2] (initializers), with the file's scaling."""
        g, c = self.g, self.c
        freq_factors = self.w.f32("rope_freqs.weight") if self.w.has("rope_freqs.weight") else None
        if self.rope_kind == "yarn":     # YaRN frequencies, cos / sin times its attention factor
            from lmengine.kernels.ops import rope_frequencies
            inv_freq = rope_frequencies(c.rope_dim, float(c.rope_base), "yarn", float(c.rope_scaling_factor), None,
                                        int(c.rope_orig_ctx), float(c.yarn_beta_fast), float(c.yarn_beta_slow))
            angle = np.arange(self.max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
            mscale = float(c.rope_attn_factor)
            cos, sin = (np.cos(angle) * mscale).astype(np.float32), (np.sin(angle) * mscale).astype(np.float32)
        else:
            cos, sin = rope_tables(self.max_positions, c.rope_dim, float(c.rope_base), freq_factors,
                                   self.rope_linear_factor)
        self.cos = g.initializer("rope.cos", cos)                                          # [max_pos, rope_dim/2]
        self.sin = g.initializer("rope.sin", sin)

    def attention(self, i: int, q: str, k: str, v: str, past_k: str, past_v: str) -> str:
        g, c = self.g, self.c
        if getattr(c, "qk_norm", False):      # qwen3: RMSNorm over each head's head_dim values
            q = self.head_rmsnorm(q, c.n_heads, f"blk.{i}.attn_q_norm.weight")
            k = self.head_rmsnorm(k, c.n_kv_heads, f"blk.{i}.attn_k_norm.weight")
        q3 = g.op("Reshape", [q, self.shape_bs_any])                                       # [B, S, q_dim]
        k3 = g.op("Reshape", [k, self.shape_bs_any])                                       # [B, S, kv_dim]
        v3 = g.op("Reshape", [v, self.shape_bs_any])
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        if self.gqa:
            if self.rotary:
                rope = dict(interleaved=0, rotary_embedding_dim=c.rope_dim)
                q3 = g.contrib("RotaryEmbedding", [q3, self.positions, self.cos, self.sin], name="rope_q",
                               num_heads=c.n_heads, **rope)
                k3 = g.contrib("RotaryEmbedding", [k3, self.positions, self.cos, self.sin], name="rope_k",
                               num_heads=c.n_kv_heads, **rope)
            out = g.contrib("GroupQueryAttention",
                            [q3, k3, v3, past_k, past_v, self.seqlens_k, self.total_len, "", "", "", self.bias],
                            3, outputs=[g.name("attn"), present_k, present_v],
                            num_heads=c.n_heads, kv_num_heads=c.n_kv_heads)[0]             # [B, S, q_dim]
        else:
            out = self.standard_attention(q3, k3, v3, past_k, past_v, present_k, present_v)
        self._declare_present(present_k, present_v)
        return g.op("Reshape", [out, g.const([-1, c.q_dim])])

    def head_rmsnorm(self, x: str, n_heads: int, weight: str) -> str:
        """RMSNorm of each head of x [tokens, n_heads * head_dim] by weight [head_dim]."""
        g, c = self.g, self.c
        heads = g.op("Reshape", [x, g.const([-1, n_heads, c.head_dim])])                  # [tokens, heads, hd]
        return g.op("Reshape", [self.rmsnorm(heads, weight), g.const([-1, n_heads * c.head_dim])])

    def _declare_present(self, present_k: str, present_v: str):
        c = self.c
        for name in (present_k, present_v):
            self.g.outputs.append(_value_info(name, ["batch_size", c.n_kv_heads, "total_sequence_length", c.head_dim]))

    def rotate_half(self, x4: str) -> str:
        """HF rope on x [B, S, heads, head_dim]: pairs (i, i + rope_dim/2) of the first rope_dim dims."""
        g, c = self.g, self.c
        half = c.rope_dim // 2
        x1 = g.op("Slice", [x4, g.const([0]), g.const([half]), g.const([3])])
        x2 = g.op("Slice", [x4, g.const([half]), g.const([c.rope_dim]), g.const([3])])
        r1 = g.op("Sub", [g.op("Mul", [x1, self.cos_at]), g.op("Mul", [x2, self.sin_at])])
        r2 = g.op("Add", [g.op("Mul", [x2, self.cos_at]), g.op("Mul", [x1, self.sin_at])])
        parts = [r1, r2]
        if c.rope_dim < c.head_dim:
            parts.append(g.op("Slice", [x4, g.const([c.rope_dim]), g.const([c.head_dim]), g.const([3])]))
        return g.op("Concat", parts, name="rope", axis=3)

    def standard_attention(self, q3, k3, v3, past_k, past_v, present_k, present_v) -> str:
        """Grouped-query attention from MatMul / Softmax: q heads kv*G .. kv*G+G-1 share kv head kv."""
        g, c = self.g, self.c
        group = c.n_heads // c.n_kv_heads
        heads = lambda x, n: g.op("Reshape", [x, g.const([0, 0, n, c.head_dim])])          # [B, S, n, hd]
        rope = self.rotate_half if self.rotary else (lambda x4: x4)
        q4 = rope(heads(q3, c.n_heads))
        k4 = rope(heads(k3, c.n_kv_heads))
        new_k = g.op("Transpose", [k4], perm=[0, 2, 1, 3])                                 # [B, kv, S, hd]
        new_v = g.op("Transpose", [heads(v3, c.n_kv_heads)], perm=[0, 2, 1, 3])
        g.op("Concat", [past_k, new_k], outputs=[present_k], axis=2)                       # [B, kv, T, hd]
        g.op("Concat", [past_v, new_v], outputs=[present_v], axis=2)
        q5 = g.op("Reshape", [g.op("Transpose", [q4], perm=[0, 2, 1, 3]),
                              g.const([0, c.n_kv_heads, group, -1, c.head_dim])])           # [B, kv, G, S, hd]
        q5 = g.op("Mul", [q5, g.const(1.0 / np.sqrt(c.head_dim), np.float32)])
        k_t = g.op("Transpose", [g.op("Unsqueeze", [present_k, g.const([2])])], perm=[0, 1, 2, 4, 3])  # [B,kv,1,hd,T]
        scores = g.op("Add", [g.op("MatMul", [q5, k_t], name="scores"), self.bias])         # [B, kv, G, S, T]
        probs = g.op("Softmax", [scores], axis=-1)
        out = g.op("MatMul", [probs, g.op("Unsqueeze", [present_v, g.const([2])])])         # [B, kv, G, S, hd]
        out = g.op("Reshape", [out, g.const([0, c.n_heads, -1, c.head_dim])])              # [B, H, S, hd]
        return g.op("Reshape", [g.op("Transpose", [out], perm=[0, 2, 1, 3]), self.shape_bs_any])  # [B, S, q_dim]


class _GPT2Decoder(_Decoder):
    """GPT-2 (GGUF `gpt2`, tensor names as llama.cpp writes them), with _Decoder's inputs,
    outputs, matmuls and attention (one K/V head per head, no rope):

        h = token_embd[input_ids] + position_embd[position_ids]                [B*S, dim]
        per layer i:  h += attn_output(attention(split3(attn_qkv(LN_attn_norm(h)))))     (all with bias)
                      h += ffn_down(gelu_tanh(ffn_up(LN_ffn_norm(h))))
        logits = output(LN_output_norm(h))             output.weight, or token_embd when tied
    """

    rotary = False

    def build(self):
        g, c = self.g, self.c
        ids, mask, positions, past = self.graph_inputs()
        self.say("embedding")
        table = g.initializer("position_embd.weight", self.w.f32("position_embd.weight")[: self.max_positions])
        h = g.op("Add", [self.embedding(ids), g.op("Gather", [table, positions], name="position_embd")])
        h = g.op("Reshape", [h, g.const([-1, c.dim])])                                    # [B*S, dim]
        self.attention_inputs(mask, positions)

        xn = self.layernorm(h, "blk.0.attn_norm")
        for i in range(c.n_layers):
            self.say(f"layer {i + 1}/{c.n_layers}")
            blk = f"blk.{i}."
            qkv = self.linear(xn, [blk + "attn_qkv.weight"], [blk + "attn_qkv.bias"])[0]  # [B*S, 3 * dim]
            q, k, v = self.split(qkv, [c.dim] * 3)
            attn = self.attention(i, q, k, v, *past[i])                                   # [B*S, dim]
            out = self.linear(attn, [blk + "attn_output.weight"], [blk + "attn_output.bias"])[0]
            xn, h = self.add_layernorm(out, h, blk + "ffn_norm")
            up = self.linear(xn, [blk + "ffn_up.weight"], [blk + "ffn_up.bias"])[0]       # [B*S, ffn_dim]
            down = self.linear(self.gelu_tanh(up), [blk + "ffn_down.weight"], [blk + "ffn_down.bias"])[0]
            next_norm = f"blk.{i + 1}.attn_norm" if i + 1 < c.n_layers else "output_norm"
            xn, h = self.add_layernorm(down, h, next_norm)
        self.output_logits(xn)

    def layernorm(self, x: str, name: str) -> str:
        """LayerNorm of x [tokens, dim] by `name`.weight and `name`.bias (ONNX LayerNormalization)."""
        g = self.g
        w = g.initializer(name + ".weight", self.w.f32(name + ".weight"))
        b = g.initializer(name + ".bias", self.w.f32(name + ".bias"))
        return g.op("LayerNormalization", [x, w, b], name="layernorm", axis=-1, epsilon=float(self.c.norm_eps))

    def add_layernorm(self, x: str, residual: str, name: str):
        """(LayerNorm(residual + x), residual + x)."""
        g = self.g
        if g.use_contrib_ops:
            w = g.initializer(name + ".weight", self.w.f32(name + ".weight"))
            b = g.initializer(name + ".bias", self.w.f32(name + ".bias"))
            normed, _, _, total = g.contrib("SkipLayerNormalization", [x, residual, w, b], 4,
                                            name="add_layernorm", epsilon=float(self.c.norm_eps))
            return normed, total
        total = g.op("Add", [residual, x], name="residual")
        return self.layernorm(total, name), total

    def gelu_tanh(self, x: str) -> str:
        """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): GPT-2's GELU (FastGelu with contrib ops)."""
        g = self.g
        if g.use_contrib_ops:
            return g.contrib("FastGelu", [x], name="gelu")
        inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [g.op("Mul", [g.op("Mul", [x, x]), x]),
                                                         g.const(0.044715, np.float32)])]),
                             g.const(np.sqrt(2.0 / np.pi), np.float32)])
        half_x = g.op("Mul", [x, g.const(0.5, np.float32)])
        return g.op("Mul", [half_x, g.op("Add", [g.op("Tanh", [inner]), g.const(1.0, np.float32)])], name="gelu")


def _value_info(name, shape):
    from onnx import helper
    return helper.make_tensor_value_info(name, FLOAT, shape)


# -- genai_config.json -----------------------------------------------------------------------

def write_genai_config(out_dir: str, gguf_file, config, max_positions: int) -> str:
    """The config onnxruntime-genai reads to run model.onnx (and our OrtBackend reads too)."""
    meta = gguf_file.metadata
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id", eos)
    pad = meta.get("tokenizer.ggml.padding_token_id", eos)
    genai = {
        "model": {
            "bos_token_id": int(bos if bos is not None else 0),
            "context_length": int(max_positions),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": int(config.head_dim),
                "hidden_size": int(config.dim),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": int(config.n_heads),
                "num_hidden_layers": int(config.n_layers),
                "num_key_value_heads": int(config.n_kv_heads),
            },
            "eos_token_id": int(eos if eos is not None else 0),
            "pad_token_id": int(pad if pad is not None else 0),
            "type": config.arch,
            "vocab_size": int(config.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": int(max_positions),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    path = os.path.join(out_dir, GENAI_CONFIG)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(genai, f, indent=4)
    return path
