"""LSTM language models: Keras and PyTorch models -> our converters -> GGUF -> the Numba backend,
compared with the frameworks that define the models, at every position, for batch 1 and batch 8.

Tolerance: TOL = 1e-5 absolute on logits (PyTorch) and on probabilities (Keras). Both sides compute
in float32 from the same float32 weights; they differ only in summation order and in the gate
nonlinearities' last bits, about 1e-7 relative to logits of magnitude ~1-10 here, so 1e-5 holds
with a wide margin while any layout mistake (gate order, a missing bias, a transposed kernel)
shows as errors of order 0.1. The same TOL compares our own paths with each other (stepping vs the
whole-sequence pass, cache reuse vs a fresh run): products of different sizes may go through the
serial or the threaded dot product, whose summation orders differ.
"""
from __future__ import annotations

import os
import re

os.environ.setdefault("KERAS_BACKEND", "torch")   # Keras 3 on PyTorch (no TensorFlow); before keras loads

import numpy as np
import pytest
import torch

from lmengine.converters import lstm_gguf as layout
from lmengine.converters.errors import ConversionError
from lmengine.converters.gguf_file import GGUFFile
from lmengine.converters.keras_lstm import convert_keras
from lmengine.converters.lstm_gguf import load_vocabulary
from lmengine.converters.lstm_import import convert_lstm_model
from lmengine.converters.torch_lstm import convert_torch_lstm, torch_lstm_from_gguf
from lmengine.backends.lstm_backend import LSTMBackend
from lmengine.config import config_from_gguf
from lmengine.errors import (ContextLengthError, InvalidParameterError, MetadataError, TensorShapeError,
                           TokenIdError)
from lmengine.lstm_tokenizer import CharTokenizer, WordTokenizer, tokenizer_from_gguf
from lmengine.config import LSTMConfig

TOL = 1e-5
N_POS = 12          # positions per test sequence
BATCH = 8


def char_vocab(n: int) -> list:
    """n distinct one-character tokens (CJK ideographs past ASCII, so any n up to 20000 works)."""
    return [chr(0x21 + i) if i < 94 else chr(0x4E00 + i) for i in range(n)]


def word_vocab(n: int) -> list:
    return [f"w{i}" for i in range(n)]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def random_ids(vocab: int, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int64)


# --- PyTorch models -----------------------------------------------------------------------------

class TorchLM(torch.nn.Module):
    """Embedding -> nn.LSTM(num_layers, batch_first) -> Linear: the model users bring."""

    def __init__(self, vocab, emb, hidden, n_layers, batch_first):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, emb)
        self.rnn = torch.nn.LSTM(emb, hidden, num_layers=n_layers, batch_first=batch_first)
        self.fc = torch.nn.Linear(hidden, vocab)
        self.batch_first = batch_first

    def forward(self, ids):                       # ids [b, s] -> logits [b, s, V]
        x = self.embed(ids)
        if not self.batch_first:
            x = x.transpose(0, 1)
        y, _ = self.rnn(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.fc(y)


def make_torch_lm(vocab, emb=16, hidden=32, n_layers=1, batch_first=True, seed=0) -> TorchLM:
    torch.manual_seed(seed)
    model = TorchLM(vocab, emb, hidden, n_layers, batch_first).eval()
    with torch.no_grad():                         # biases away from zero, so that both are checked
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(ids)).numpy()


def run_ours(path, ids: np.ndarray, **kwargs) -> tuple:
    """Our logits [b, n, V] three ways: one sequence at a time (batch 1), all b sequences in one
    call (batch b), and stepping all b slots token by token with forward_batch."""
    b, n = ids.shape
    backend = LSTMBackend(path, n_ctx=64, n_slots=b, **kwargs)
    single = np.stack([backend.forward(0, ids[i], 0, all_logits=True) for i in range(b)])
    batched = np.stack(backend.forward_sequences(list(range(b)), list(ids), [0] * b, all_logits=True))
    slots = np.arange(b)
    stepped = np.stack([backend.forward_batch(slots, ids[:, t], np.full(b, t)) for t in range(n)], axis=1)
    return single, batched, stepped


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("lstm")


@pytest.mark.parametrize("n_layers,batch_first,vocab", [(1, True, 50), (2, False, 50), (1, False, 5000),
                                                        (2, True, 5000)])
def test_torch_lm_matches_pytorch(tmp, n_layers, batch_first, vocab):
    model = make_torch_lm(vocab, n_layers=n_layers, batch_first=batch_first, seed=n_layers)
    sd_path = tmp / f"torch_{n_layers}_{batch_first}_{vocab}.pt"
    torch.save(model.state_dict(), sd_path)
    path = tmp / f"torch_{n_layers}_{batch_first}_{vocab}.gguf"
    tokens = char_vocab(vocab) if vocab <= 100 else word_vocab(vocab)
    convert_torch_lstm(sd_path, path, tokens, {"batch_first": batch_first}, progress=None)

    ids = random_ids(vocab, (BATCH, N_POS), seed=vocab)
    expected = torch_logits(model, ids)                                   # [8, 12, V]
    single, batched, stepped = run_ours(path, ids)
    np.testing.assert_allclose(single, expected, rtol=0, atol=TOL)        # batch 1
    np.testing.assert_allclose(batched, expected, rtol=0, atol=TOL)       # batch 8
    np.testing.assert_allclose(stepped, batched, rtol=0, atol=TOL)       # token by token == whole pass


def test_ragged_batch_equals_one_by_one(tmp):
    model = make_torch_lm(50, n_layers=2, seed=3)
    path = tmp / "ragged.gguf"
    convert_torch_lstm(model.state_dict(), path, char_vocab(50), progress=None)
    backend = LSTMBackend(path, n_ctx=64, n_slots=4)
    seqs = [random_ids(50, n, seed=n) for n in (7, 1, 12, 4)]
    batched = backend.forward_sequences([0, 1, 2, 3], seqs, [0, 0, 0, 0], all_logits=True)
    for seq, got in zip(seqs, batched):
        np.testing.assert_allclose(got, torch_logits(model, seq[None])[0], rtol=0, atol=TOL)
    last = backend.forward_sequences([0, 1, 2, 3], seqs, [0, 0, 0, 0], all_logits=False)
    for seq, got in zip(seqs, last):
        np.testing.assert_allclose(got, torch_logits(model, seq[None])[0, -1:], rtol=0, atol=TOL)


# --- Keras models -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras():
    import keras
    return keras


def make_keras_lm(keras, vocab, seed=0, emb=16, units=128):
    """The issue's model: Embedding(vocab, emb) -> LSTM(128) -> Dense(vocab, softmax), compiled with
    sparse_categorical_crossentropy, with random weights (biases too)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(vocab, emb),
                              keras.layers.LSTM(units), keras.layers.Dense(vocab, activation="softmax")])
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(0.0, 0.3, w.shape).astype("float32"))
    return model


def keras_probabilities(keras, model, ids: np.ndarray) -> np.ndarray:
    """The model's output for every prefix ids[:, :t+1]: [b, n, V] (the LSTM returns the last step)."""
    return np.stack([keras.ops.convert_to_numpy(model(ids[:, :t + 1])) for t in range(ids.shape[1])], axis=1)


@pytest.fixture(scope="module", params=[50, 5000])
def keras_lm(request, keras, tmp):
    vocab = request.param
    model = make_keras_lm(keras, vocab, seed=vocab)
    path = tmp / f"keras_{vocab}.keras"
    model.save(path)
    return vocab, model, path


def test_keras_lm_matches_keras(keras, keras_lm, tmp):
    vocab, model, src = keras_lm
    path = tmp / f"keras_{vocab}.gguf"
    tokens = char_vocab(vocab) if vocab <= 100 else word_vocab(vocab)
    convert_keras(src, path, tokens, progress=None)
    ids = random_ids(vocab, (BATCH, N_POS), seed=vocab + 1)
    expected = keras_probabilities(keras, model, ids)
    single, batched, stepped = run_ours(path, ids)
    np.testing.assert_allclose(softmax(single), expected, rtol=0, atol=TOL)
    np.testing.assert_allclose(softmax(batched), expected, rtol=0, atol=TOL)
    np.testing.assert_allclose(stepped, batched, rtol=0, atol=TOL)
    cfg = LSTMConfig.from_gguf(GGUFFile(path))
    assert (cfg.vocab_size, cfg.emb_dim, cfg.hidden_sizes, cfg.output_activation, cfg.source) == \
        (vocab, 16, (128,), "softmax", "keras")


@pytest.mark.parametrize("keras_lm", [50], indirect=True)
def test_keras_h5_formats_give_the_same_file(keras, keras_lm, tmp):
    """Legacy .h5 (architecture inside) and .weights.h5 (architecture inferred) convert to the same
    tensors as the .keras archive."""
    vocab, model, src = keras_lm
    tokens = char_vocab(vocab)
    files = {}
    for name in ("a.keras", "b.h5", "c.weights.h5"):
        if name.endswith(".weights.h5"):
            model.save_weights(tmp / name)
        else:
            model.save(tmp / name)                # .h5: the legacy full-model format
        out = tmp / (name + ".gguf")
        convert_keras(tmp / name, out, tokens, progress=None)
        files[name] = GGUFFile(out)
    ref = files["a.keras"]
    for f in files.values():
        assert set(f.tensors) == set(ref.tensors)
        for name in ref.tensors:
            assert np.array_equal(np.asarray(f.tensor_bytes(name)), np.asarray(ref.tensor_bytes(name))), name
        assert f.get(layout.KEY_OUTPUT_ACTIVATION) == "softmax"


def test_keras_stacked_functional_with_linear_head(keras, tmp):
    """Two stacked LSTMs of different sizes, a Dropout, TimeDistributed(Dense) + Activation, as a
    Functional model: logits equal the model's output (probabilities) at every position."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(40, 12)(inp)
    x = keras.layers.LSTM(24, return_sequences=True, name="z_first")(x)      # names out of alphabetical
    x = keras.layers.Dropout(0.5)(x)                                          # order: the converter must
    x = keras.layers.LSTM(20, return_sequences=True, name="a_second")(x)     # follow the model's order
    x = keras.layers.TimeDistributed(keras.layers.Dense(40))(x)
    out = keras.layers.Activation("softmax")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(5)
    for w in model.weights:
        w.assign(rng.normal(0.0, 0.3, w.shape).astype("float32"))
    model.save(tmp / "stacked.keras")
    convert_keras(tmp / "stacked.keras", tmp / "stacked.gguf", char_vocab(40), progress=None)
    ids = random_ids(40, (3, 9), seed=9)
    expected = keras.ops.convert_to_numpy(model(ids))                    # [3, 9, 40] (sequences)
    _, batched, _ = run_ours(tmp / "stacked.gguf", ids)
    np.testing.assert_allclose(softmax(batched), expected, rtol=0, atol=TOL)
    assert LSTMConfig.from_gguf(GGUFFile(tmp / "stacked.gguf")).hidden_sizes == (24, 20)
    model.save_weights(tmp / "stacked.weights.h5")                          # architecture inferred
    convert_keras(tmp / "stacked.weights.h5", tmp / "stacked_w.gguf", char_vocab(40), progress=None)
    a, b = GGUFFile(tmp / "stacked.gguf"), GGUFFile(tmp / "stacked_w.gguf")
    assert all(np.array_equal(np.asarray(a.tensor_bytes(n)), np.asarray(b.tensor_bytes(n))) for n in a.tensors)


def test_keras_unsupported_layers_are_named(keras, tmp):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(30, 8),
                              keras.layers.GRU(16), keras.layers.Dense(30, activation="softmax")])
    model.save(tmp / "gru.keras")
    with pytest.raises(ConversionError, match="GRU"):
        convert_keras(tmp / "gru.keras", tmp / "gru.gguf", char_vocab(30), progress=None)
    model = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(30, 8),
                              keras.layers.LSTM(16, go_backwards=True), keras.layers.Dense(30)])
    model.save(tmp / "back.keras")
    with pytest.raises(ConversionError, match="go_backwards"):
        convert_keras(tmp / "back.keras", tmp / "back.gguf", char_vocab(30), progress=None)


# --- weight types -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def q_model(tmp):
    """A 2-layer PyTorch LM with rows of multiples of 32 (Q8_0 blocks), converted three ways."""
    model = make_torch_lm(3000, emb=32, hidden=64, n_layers=2, seed=7)
    paths = {}
    for out_type in ("F32", "F16", "Q8_0"):
        paths[out_type] = tmp / f"q_{out_type}.gguf"
        convert_torch_lstm(model.state_dict(), paths[out_type], word_vocab(3000), out_type=out_type, progress=None)
    return model, paths


def reference_logits(path, ids: np.ndarray) -> np.ndarray:
    """PyTorch modules on the GGUF's weights dequantized by the gguf package."""
    embedding, layers, head = torch_lstm_from_gguf(path)
    with torch.inference_mode():
        x = embedding(torch.from_numpy(ids))
        for lstm in layers:
            x, _ = lstm(x)
        return head(x).numpy()


@pytest.mark.parametrize("out_type", ["F32", "F16", "Q8_0"])
def test_quantized_weights_match_dequantized_reference(q_model, out_type):
    _, paths = q_model
    f = GGUFFile(paths[out_type])
    assert {info.type_name for name, info in f.tensors.items() if len(info.shape) == 2} == {out_type}
    ids = random_ids(3000, (BATCH, N_POS), seed=11)
    expected = reference_logits(paths[out_type], ids)
    single, batched, stepped = run_ours(paths[out_type], ids, fast=False)
    np.testing.assert_allclose(single, expected, rtol=0, atol=TOL)
    np.testing.assert_allclose(batched, expected, rtol=0, atol=TOL)
    np.testing.assert_allclose(stepped, batched, rtol=0, atol=TOL)


def test_q8_fast_path_stays_close(q_model):
    """fast=True quantizes activations to 8 bits per 32-block for the large Q8_0 products (the
    3000 x 64 output layer here). Each activation moves by at most amax/254 of its block; with
    |w| ~ 0.3 * N(0,1) over 64 inputs that bounds the logit error near 0.03 (observed ~0.01)."""
    _, paths = q_model
    ids = random_ids(3000, (2, N_POS), seed=12)
    exact = np.stack(LSTMBackend(paths["Q8_0"], n_ctx=64, n_slots=2, fast=False)
                     .forward_sequences([0, 1], list(ids), [0, 0], all_logits=True))
    fast = np.stack(LSTMBackend(paths["Q8_0"], n_ctx=64, n_slots=2, fast=True)
                    .forward_sequences([0, 1], list(ids), [0, 0], all_logits=True))
    assert np.abs(fast - exact).max() < 0.05


def test_q8_falls_back_to_f16_for_rows_not_whole_blocks(tmp):
    model = make_torch_lm(50, emb=16, hidden=32, seed=1)           # rows of 16 values: not Q8_0 blocks
    path = tmp / "fallback.gguf"
    summary = convert_torch_lstm(model.state_dict(), path, char_vocab(50), out_type="Q8_0", progress=None)
    assert summary["types"][layout.TOKEN_EMBD] == "F16" and summary["types"][layout.lstm_ih(0)] == "F16"
    assert summary["types"][layout.lstm_hh(0)] == "Q8_0" and summary["types"][layout.OUTPUT] == "Q8_0"
    ids = random_ids(50, (2, 6), seed=2)
    _, batched, _ = run_ours(path, ids, fast=False)
    np.testing.assert_allclose(batched, reference_logits(path, ids), rtol=0, atol=TOL)


# --- the recurrent cache ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp):
    model = make_torch_lm(50, n_layers=2, seed=21)
    path = tmp / "small.gguf"
    convert_torch_lstm(model.state_dict(), path, char_vocab(50), progress=None)
    return model, path


def test_extend_equals_fresh_and_start_zero_resets(small):
    model, path = small
    ids = random_ids(50, 10, seed=1)
    backend = LSTMBackend(path, n_ctx=32, n_slots=2)
    backend.forward(0, random_ids(50, 5, seed=2), 0)                  # something else first
    backend.forward(0, ids[:4], 0)                                    # start 0: reset
    part = backend.forward(0, ids[4:7], 4, all_logits=True)           # extend
    last = backend.forward(0, ids[7:], 7)
    fresh = backend.forward(1, ids, 0, all_logits=True)
    np.testing.assert_allclose(part, fresh[4:7], rtol=0, atol=TOL)
    np.testing.assert_allclose(last[0], fresh[-1], rtol=0, atol=TOL)
    np.testing.assert_allclose(fresh, torch_logits(model, ids[None])[0], rtol=0, atol=TOL)
    assert backend.lengths.tolist() == [10, 10]


def test_recurrent_state_cannot_rewind(small):
    _, path = small
    backend = LSTMBackend(path, n_ctx=32, n_slots=2)
    ids = random_ids(50, 6, seed=3)
    backend.forward(0, ids, 0)
    with pytest.raises(InvalidParameterError, match="extend"):
        backend.forward(0, ids[2:], 2)
    with pytest.raises(InvalidParameterError):
        backend.forward_batch([0], [1], [3])
    with pytest.raises(InvalidParameterError, match="cannot be cut"):
        backend.copy_slot(0, 1, 3)
    assert not backend.supports_rewind


def test_repeating_the_last_token_returns_its_logits(small):
    """An engine that recomputes the last cached token (start_pos = n - 1) gets the same logits,
    and the state is not advanced twice."""
    _, path = small
    backend = LSTMBackend(path, n_ctx=32, n_slots=2)
    ids = random_ids(50, 8, seed=4)
    first = backend.forward(0, ids, 0)
    again = backend.forward(0, ids[-1:], 7)
    np.testing.assert_array_equal(again, first)
    more = backend.forward(0, np.concatenate([ids[-1:], [5, 6]]), 7, all_logits=True)
    fresh = backend.forward(1, np.concatenate([ids, [5, 6]]), 0, all_logits=True)
    np.testing.assert_allclose(more, fresh[7:], rtol=0, atol=TOL)


def test_copy_slot_and_mixed_batch_step(small):
    model, path = small
    backend = LSTMBackend(path, n_ctx=32, n_slots=3)
    ids = random_ids(50, 6, seed=5)
    backend.forward(0, ids[:5], 0)
    backend.copy_slot(0, 1, 5)
    # slot 0 and 1 extend the same prefix with different tokens; slot 2 starts a new sequence.
    logits = backend.forward_batch([0, 1, 2], [ids[5], 7, 9], [5, 5, 0])
    np.testing.assert_allclose(logits[0], torch_logits(model, ids[None])[0, -1], rtol=0, atol=TOL)
    np.testing.assert_allclose(logits[1], torch_logits(model, np.r_[ids[:5], 7][None])[0, -1], rtol=0, atol=TOL)
    np.testing.assert_allclose(logits[2], torch_logits(model, np.array([[9]]))[0, -1], rtol=0, atol=TOL)


def test_bad_requests_raise_engine_errors(small):
    _, path = small
    backend = LSTMBackend(path, n_ctx=8, n_slots=2)
    with pytest.raises(TokenIdError, match="50"):
        backend.forward(0, [1, 50], 0)
    with pytest.raises(TokenIdError):
        backend.forward_batch([0], [-1], [0])
    with pytest.raises(ContextLengthError):
        backend.forward(0, list(range(9)), 0)
    with pytest.raises(InvalidParameterError, match="slot"):
        backend.forward(2, [1], 0)
    with pytest.raises(InvalidParameterError, match="twice"):
        backend.forward_batch([1, 1], [1, 2], [0, 0])
    with pytest.raises(InvalidParameterError):
        backend.forward(0, [], 0)
    assert backend.lengths.tolist() == [0, 0]


def test_token_ids_are_checked_before_the_compiled_code(small):
    """forward / forward_batch guard the kernels (which read embedding row E[token]) with the one
    token-id check: out of range, bools (True is not token 1) and floats, in lists or arrays, on
    the compiled decode step and on the general path; nothing changes when they refuse."""
    _, path = small
    backend = LSTMBackend(path, n_ctx=8, n_slots=2)
    n = backend.vocab_size
    for bad, message in [(n, f"token id {n} is outside the vocabulary [0, {n})"),
                         (True, f"token id True is a bool, not an integer in the vocabulary [0, {n})"),
                         (np.False_, f"token id False is a bool, not an integer in the vocabulary [0, {n})"),
                         (1.0, f"token id 1.0 is not an integer in the vocabulary [0, {n})")]:
        for call in (lambda: backend.forward(0, [1, bad], 0), lambda: backend.forward(0, np.array([bad]), 0),
                     lambda: backend.forward_batch([0, 1], [2, bad], [0, 0]),
                     lambda: backend.forward_batch(np.array([0]), np.array([bad]), np.array([0])),
                     lambda: backend.forward_sequences([0, 1], [[1], [bad]], [0, 0])):
            with pytest.raises(TokenIdError, match=re.escape(message)):
                call()
    assert backend.lengths.tolist() == [0, 0]
    logits = backend.forward_batch([0, 1], np.array([2, 3], np.int32), [0, 0])   # NumPy integers are ids
    np.testing.assert_allclose(logits[1], backend.forward(1, [3], 0)[0], rtol=0, atol=TOL)


def test_threads_do_not_change_results(tmp):
    model = make_torch_lm(5000, emb=32, hidden=64, seed=8)          # products big enough for threads
    path = tmp / "threads.gguf"
    convert_torch_lstm(model.state_dict(), path, word_vocab(5000), progress=None)
    ids = random_ids(5000, (4, 6), seed=1)
    one = run_ours(path, ids, n_threads=1)[1]
    two = run_ours(path, ids, n_threads=2)[1]
    np.testing.assert_allclose(one, two, rtol=0, atol=TOL)


# --- files, configs, tokenizers -----------------------------------------------------------------

def test_config_and_tokenizer_from_the_file(small):
    _, path = small
    f = GGUFFile(path)
    cfg = config_from_gguf(f)
    assert isinstance(cfg, LSTMConfig)
    assert (cfg.vocab_size, cfg.emb_dim, cfg.hidden_sizes, cfg.n_layers, cfg.state_size) == (50, 16, (32, 32), 2, 64)
    assert cfg.output_activation == "linear" and cfg.source == "pytorch" and cfg.tokenizer_kind == "char"
    tok = tokenizer_from_gguf(f)
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == 50
    text = "".join(char_vocab(50)[i] for i in (3, 1, 4, 1, 5))
    assert tok.encode(text) == [3, 1, 4, 1, 5] and tok.decode([3, 1, 4, 1, 5]) == text


def test_word_vocabulary_with_specials_round_trips(tmp):
    model = make_torch_lm(8, seed=2)
    vocab = {"type": "word", "tokens": ["<unk>", "<eos>", "the", "cat", "sat", "on", "mat", "."],
             "unk_token": "<unk>", "eos_token": "<eos>", "lowercase": True}
    path = tmp / "words.gguf"
    convert_torch_lstm(model.state_dict(), path, vocab, progress=None)
    tok = tokenizer_from_gguf(GGUFFile(path))
    assert isinstance(tok, WordTokenizer)
    assert tok.encode("The cat sat on the dog .<eos>") == [2, 3, 4, 5, 2, 0, 7, 1]
    assert tok.decode([2, 3, 4, 1], skip_special_tokens=True) == "the cat sat"
    assert tok.eos_id == 1 and tok.eot_ids == frozenset({1}) and tok.unk_id == 0 and tok.is_special(0)


def test_vocabulary_forms_and_size_checks(tmp):
    assert load_vocabulary(["a", "b", "<eos>"]).kind == "word"           # a multi-char ordinary token
    v = load_vocabulary({"tokens": ["a", "b", "<eos>"], "eos_token": "<eos>"})
    assert v.kind == "char" and v.special == {"eos": 2}
    v = load_vocabulary({"the": 1, "cat": 2})                              # Keras word_index: 0 reserved
    assert v.tokens[1:] == ["the", "cat"] and v.unused_ids == {0}
    model = make_torch_lm(50, seed=1)
    with pytest.raises(ConversionError, match="only 50"):
        convert_torch_lstm(model.state_dict(), tmp / "big.gguf", char_vocab(60), progress=None)
    convert_torch_lstm(model.state_dict(), tmp / "pad.gguf", char_vocab(45), progress=None)
    f = GGUFFile(tmp / "pad.gguf")
    assert f.get("tokenizer.ggml.tokens")[45] == "<unused_45>" and f.get("tokenizer.ggml.token_type")[45] == 5
    with pytest.raises(ConversionError, match="vocabulary is needed"):
        convert_torch_lstm(model.state_dict(), tmp / "none.gguf", None, progress=None)


def test_state_dict_shapes_that_are_not_an_lstm_lm_are_rejected(tmp):
    model = make_torch_lm(50, seed=1)
    sd = dict(model.state_dict())
    with pytest.raises(ConversionError, match="outside Embedding"):
        convert_torch_lstm({**sd, "norm.weight": torch.ones(32)}, tmp / "x.gguf", char_vocab(50), progress=None)
    bi = torch.nn.LSTM(16, 32, bidirectional=True)
    bad = {**{k: v for k, v in sd.items() if not k.startswith("rnn.")},
           **{"rnn." + k: v for k, v in bi.state_dict().items()}}
    with pytest.raises(ConversionError, match="bidirectional"):
        convert_torch_lstm(bad, tmp / "x.gguf", char_vocab(50), progress=None)
    proj = torch.nn.LSTM(16, 32, proj_size=8)
    with pytest.raises(ConversionError, match="proj_size"):
        convert_torch_lstm({"rnn." + k: v for k, v in proj.state_dict().items()}, tmp / "x.gguf",
                           char_vocab(50), progress=None)


def test_ambiguous_names_need_a_description(tmp):
    """Embedding [V, 32] and head [V, 32] with uninformative names: the description decides."""
    model = make_torch_lm(50, emb=32, hidden=32, seed=4)
    sd = model.state_dict()
    renamed = {"a.weight": sd["fc.weight"], "a.bias": sd["fc.bias"], "b.weight": sd["embed.weight"],
               **{k: v for k, v in sd.items() if k.startswith("rnn.")}}
    with pytest.raises(ConversionError, match="description"):
        convert_torch_lstm(renamed, tmp / "amb.gguf", char_vocab(50), progress=None)
    convert_torch_lstm(renamed, tmp / "amb.gguf", char_vocab(50), {"embedding": "b.weight", "output": "a"},
                       progress=None)
    ids = random_ids(50, (1, 7), seed=3)
    np.testing.assert_allclose(run_ours(tmp / "amb.gguf", ids)[1], torch_logits(model, ids), rtol=0, atol=TOL)


def test_broken_files_fail_at_load_with_the_name(tmp, monkeypatch):
    model = make_torch_lm(50, seed=1)
    original = layout.LSTMWeights.named_tensors

    def without_bias(self):
        return ((n, a) for n, a in original(self) if n != layout.OUTPUT_BIAS)

    monkeypatch.setattr(layout.LSTMWeights, "named_tensors", without_bias)
    convert_torch_lstm(model.state_dict(), tmp / "nobias.gguf", char_vocab(50), progress=None)
    monkeypatch.undo()
    with pytest.raises(TensorShapeError, match="output.bias"):
        LSTMBackend(tmp / "nobias.gguf", n_ctx=8, n_slots=1)
    monkeypatch.setattr(layout, "KEY_HIDDEN_SIZES", "lstm.something_else")
    convert_torch_lstm(model.state_dict(), tmp / "nohidden.gguf", char_vocab(50), progress=None)
    monkeypatch.undo()
    with pytest.raises(MetadataError, match="hidden_sizes"):
        config_from_gguf(GGUFFile(tmp / "nohidden.gguf"))


def test_convert_progress_lines(tmp):
    model = make_torch_lm(50, seed=1)
    lines = []
    torch.save(model.state_dict(), tmp / "p.pt")
    convert_lstm_model(tmp / "p.pt", tmp / "p.gguf", char_vocab(50), progress=lines.append)
    assert any("blk.0.lstm_ih.weight" in line for line in lines) and lines[-1].startswith("wrote ")


# --- the LLM API end to end ---------------------------------------------------------------------

def torch_greedy(model: TorchLM, prompt: np.ndarray, n: int) -> list:
    """PyTorch's own greedy continuation, stepping nn.LSTM with its (h, c) state."""
    with torch.inference_mode():
        x = model.embed(torch.from_numpy(prompt)[None])
        y, state = model.rnn(x if model.batch_first else x.transpose(0, 1))
        out = []
        for _ in range(n):
            token = int(model.fc(y[-1] if not model.batch_first else y[:, -1]).reshape(-1).argmax())
            out.append(token)
            x = model.embed(torch.tensor([[token]]))
            y, state = model.rnn(x, state)
    return out


def test_llm_generate_stream_logits_perplexity(tmp):
    from lmengine import LLM, SamplingParams
    model = make_torch_lm(60, n_layers=2, seed=31)
    path = tmp / "llm.gguf"
    chars = char_vocab(60)
    convert_torch_lstm(model.state_dict(), path, {"type": "char", "tokens": chars}, progress=None)
    llm = LLM(str(path), n_ctx=128)
    prompt = "".join(chars[i] for i in (5, 9, 2, 33))
    ids = llm.tokenizer.encode(prompt)
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20))
    expected = torch_greedy(model, np.array(ids), 20)
    assert greedy.token_ids == expected and greedy.text == "".join(chars[i] for i in expected)
    assert greedy.finish_reason == "length"
    assert "".join(c.text for c in llm.stream(prompt, SamplingParams(temperature=0, max_tokens=20))) == greedy.text
    prompts = [prompt, "".join(chars[i] for i in (1, 2)), chars[40]]
    params = SamplingParams(temperature=0.9, top_k=20, max_tokens=12, seed=7)
    batched = [c.token_ids for c in llm.generate(prompts, params)]
    assert batched == [llm.generate(p, params).token_ids for p in prompts]
    logits = llm.logits(ids)
    np.testing.assert_allclose(logits, torch_logits(model, np.array([ids]))[0], rtol=0, atol=TOL)
    text_ids = random_ids(60, 30, seed=4)
    log_probs = torch.log_softmax(torch.from_numpy(torch_logits(model, text_ids[None])[0]).double(), -1).numpy()
    nll = -np.mean([log_probs[t, text_ids[t + 1]] for t in range(len(text_ids) - 1)])
    # logits within TOL move each log-probability by at most 2 * TOL, the perplexity by < 1e-4 relative
    assert llm.perplexity(text_ids.tolist()) == pytest.approx(np.exp(nll), rel=1e-4)
