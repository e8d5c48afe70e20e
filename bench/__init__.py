"""`lmengine.bench`: throughput benchmarks, ours against peer engines in the same run.

    runner.py   `lmengine bench`: the driver, the table, bench_results.json
    worker.py   one measurement in a fresh process (`python -m lmengine.bench.worker`)
    measure.py  the shared timing loop, prompt and peak RSS
    peers.py    llama.cpp, onnxruntime-genai, CTranslate2, transformers
    batch.py    batched decode, ours and peers
    lstm.py     LSTM decode against torch nn.LSTM
    quality.py  KL / top-1 / perplexity of one engine's logits against a reference's
    kquant_quality.py  SmolLM2 quantized by us and by llama.cpp, both engines, over zen.txt

The pytest-benchmark kernel micro-benchmarks (test_kernels_bench.py) and the GPU check
(ort_device_check.py) sit beside them; `pytest bench/` runs the former.
"""
