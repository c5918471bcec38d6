"""Input-pipeline throughput on GSM8K train; prints one JSON line.

    python bench/data_pipeline.py [--tokenizer default] [--batch-size 8] [--repeats 3]

Measures (medians over repeats): tokenization (format + batch encode + length
limits) in examples/s and tokens/s, and SFT batch assembly by the Loader (NumPy
collate, no device transfer) in real tokens/s, against the ~125 tokens/s of a
PyTorch SFT step on this class of machine (REFERENCE.md). Also reports target
lengths with and without GSM8K calculator annotations.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from reftjax.data import (Loader, LoaderConfig, PromptConfig, TokenizeConfig, load_examples,
                          tokenize_examples)
from reftjax.hf import load_tokenizer
from reftjax.host import cpu_description

SFT_STEP_TOKENS_PER_S = 125.0


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def pipeline_figures(n_examples: int, real_tokens: int, tokenize_s: float, counts: list[tuple[int, int]],
                     epoch_s: float) -> dict:
    """The rate keys from the median times: `tokenize_s` (one tokenization of `n_examples` of `real_tokens`) and
    `epoch_s` (one Loader epoch whose batches had `counts`: (real tokens, slots incl. padding) each); the ratio is
    the slower stage's real tokens/s over the SFT step's 125."""
    loader_real = sum(c[0] for c in counts)
    return {"tokenize_s": round(tokenize_s, 3),
            "tokenize_examples_per_s": round(n_examples / tokenize_s, 1),
            "tokenize_tokens_per_s": round(real_tokens / tokenize_s),
            "loader_batches_per_s": round(len(counts) / epoch_s, 1),
            "loader_tokens_per_s": round(loader_real / epoch_s),
            "loader_padding_fraction": round(1 - loader_real / sum(c[1] for c in counts), 3),
            "ratio_vs_sft_step_125_tok_s": round(
                min(real_tokens / tokenize_s, loader_real / epoch_s) / SFT_STEP_TOKENS_PER_S)}


def mean_length(rows) -> float:
    """The mean token count of `rows` (the targets), to one decimal."""
    return round(float(np.mean([len(t) for t in rows])), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", default="default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group-by-length", type=int, default=0)
    parser.add_argument("--seq-buckets", default=None,
                        help="comma-separated SFT buckets (default: powers of two up to 700)")
    args = parser.parse_args()

    start = time.perf_counter()
    examples = load_examples("gsm8k", split="train")
    load_s = time.perf_counter() - start
    tok = load_tokenizer(args.tokenizer)
    buckets = None if args.seq_buckets is None else tuple(int(x) for x in args.seq_buckets.split(","))
    cfg = TokenizeConfig(seq_buckets=buckets)
    tok_s, ds = _median_time(lambda: tokenize_examples(examples, tok, PromptConfig(), cfg),
                             args.repeats)
    real_tokens = int(ds.seq_lengths.sum())
    raw = tokenize_examples(examples, tok, PromptConfig(strip_annotations=False), cfg)

    def one_epoch():
        loader = Loader(ds, LoaderConfig(batch_size=args.batch_size, seed=0, num_epochs=1,
                                           group_by_length=args.group_by_length))
        return [(int(b["attn_mask"].sum()), b["tokens"].size) for b in loader]

    epoch_s, counts = _median_time(one_epoch, args.repeats)
    fig = pipeline_figures(len(examples), real_tokens, tok_s, counts, epoch_s)
    print(json.dumps({
        "cpu": cpu_description(),
        "bench": "data_pipeline", "dataset": "gsm8k:train", "examples": len(examples),
        "tfds_load_s": round(load_s, 2),
        **fig,
        "loader_batch_size": args.batch_size, "seq_buckets": list(cfg.seq_sizes),
        "group_by_length": args.group_by_length,
        "target_tokens_mean_stripped": mean_length(ds.target),
        "target_tokens_mean_annotated": mean_length(raw.target),
        "dropped_over_limits_stripped": ds.stats["dropped"],
        "dropped_over_limits_annotated": raw.stats["dropped"],
    }), flush=True)


if __name__ == "__main__":
    main()
