"""What every benchmark worker shares: the prompt, the timing loop, peak RSS, the bytes a decode
step reads."""
from __future__ import annotations

import statistics
import time

PROMPT_TEXT = ("The history of computing is a story of people, machines and ideas. From the abacus "
               "to the analytical engine, from vacuum tubes to transistors, each step made "
               "calculation faster and cheaper. ")


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids.extend(tokenizer.encode(PROMPT_TEXT))
    return ids[:n_tokens]


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def spread(values) -> list[float]:
    """[min, median, max] of the runs' values: how far a median can be trusted on a busy machine."""
    values = list(values)
    return [min(values), statistics.median(values), max(values)]


def time_engine(prefill, decode_step, prompt_tokens, gen_tokens, repeats, t_process_start):
    """Median prefill and decode tok/s over `repeats` runs of one engine, and under "spread" the
    [min, median, max] of prefill tok/s, decode tok/s and time to first token.

    prefill(): runs the prompt as a fresh sequence and returns the decoding state;
    decode_step(state): generates one greedy token and returns the next state. The first
    prefill's end also stamps the process's start-to-first-token time."""
    prefill_rates, decode_rates, start_to_first_token = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = prefill()
        prefill_rates.append(prompt_tokens / (time.perf_counter() - t0))
        if start_to_first_token is None:
            start_to_first_token = time.time() - t_process_start
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            state = decode_step(state)
        decode_rates.append(gen_tokens / (time.perf_counter() - t0))
    prefill_tok_s = statistics.median(prefill_rates)
    return {"prefill_tok_s": prefill_tok_s, "decode_tok_s": statistics.median(decode_rates),
            "ttft_s": prompt_tokens / prefill_tok_s, "start_to_first_token_s": start_to_first_token,
            "peak_rss_mb": peak_rss_mb(),
            "spread": {"prefill_tok_s": spread(prefill_rates), "decode_tok_s": spread(decode_rates),
                       "ttft_s": spread(prompt_tokens / r for r in prefill_rates)}}


def decode_weight_bytes(gguf_file) -> int:
    """Bytes of weights one decode step reads: every tensor once, except that only one row of a
    separate token embedding is read (a tied one is read whole, as the output matrix)."""
    total = sum(info.n_bytes for info in gguf_file.tensors.values())
    embd = gguf_file.tensors.get("token_embd.weight")
    if embd is not None and "output.weight" in gguf_file.tensors:
        total -= embd.n_bytes
    return total
