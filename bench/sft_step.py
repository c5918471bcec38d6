"""Benchmark: reftjax `sft_step` vs a plain PyTorch training step on SmolLM2-135M.

Batch 8 x 256 tokens (all real: random ids, full loss mask), fp32, AdamW, CPU.
Contenders alternate in one process (torch with 2 threads) and the medians of
`--repeats` timed steps each are reported, after warm-up/compilation.

    python bench/sft_step.py            # one JSON line

Keys: reftjax_tokens_per_s, torch_tokens_per_s, ratio_vs_torch, compile_s,
mfu_reftjax, mfu_torch (3 x forward FLOPs per token over the GEMM peak measured here), the
per-step times and the 1-minute load average at start and end (the 2 cores are often shared).
Memory: one run reached 11.9 GB resident (reftjax + torch models, optimizers, activations) and
was OOM-killed on the 24 GB machine while a 10 GB benchmark ran beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from reftjax.host import tune_cpu_allocator  # noqa: E402

HOST_ALLOCATOR_TUNED = tune_cpu_allocator()  # before numpy/JAX/torch start threads: reftjax/host.py

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--remat", default="none")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from reftjax.hf import load_model, local_hf_dir
    from reftjax.metrics import measured_peak_flops
    from reftjax.steps import OptimConfig, init_state, make_optimizer, make_sft_step

    torch.set_num_threads(2)
    load_start = os.getloadavg()[0]
    b, t = args.batch, args.seq
    model = load_model("default", remat=args.remat)
    cfg = model.config
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, size=(b, t)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens), "attn_mask": jnp.ones((b, t), jnp.int32),
             "loss_mask": jnp.ones((b, t), jnp.int32)}
    tx = make_optimizer(OptimConfig(learning_rate=1e-5, schedule="constant", warmup_ratio=0.0), 1000)
    state = init_state({"policy": model.params}, tx, jax.random.key(0))
    step = make_sft_step(cfg, tx)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0

    tm = AutoModelForCausalLM.from_pretrained(local_hf_dir("default"), dtype=torch.float32)
    tm.train()
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-5, weight_decay=0.0)
    ids = torch.tensor(tokens, dtype=torch.long)

    def torch_step():
        out = tm(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch_step()  # warm-up
    jt, tt = [], []
    for _ in range(args.repeats):
        s = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        jt.append(time.perf_counter() - s)
        s = time.perf_counter()
        torch_step()
        tt.append(time.perf_counter() - s)
    peak = measured_peak_flops()
    n_tok = b * t
    flops = 3 * cfg.flops_per_token(t // 2) * n_tok  # forward + backward (2x)
    j, to = statistics.median(jt), statistics.median(tt)
    print(json.dumps({
        "bench": "sft_step", "model": "SmolLM2-135M-Instruct", "batch": b, "seq": t, "dtype": "float32",
        "remat": args.remat, "host_allocator_tuned": HOST_ALLOCATOR_TUNED, "reftjax_step_s": round(j, 3), "torch_step_s": round(to, 3),
        "reftjax_tokens_per_s": round(n_tok / j, 1), "torch_tokens_per_s": round(n_tok / to, 1),
        "ratio_vs_torch": round(to / j, 3), "compile_s": round(compile_s, 1),
        "peak_gflops": round(peak / 1e9, 1), "mfu_reftjax": round(flops / j / peak, 3),
        "mfu_torch": round(flops / to / peak, 3), "loss": float(m["loss"]), "repeats": args.repeats,
        "load_avg_1m_start": round(load_start, 2), "load_avg_1m": round(os.getloadavg()[0], 2),
        "reftjax_steps_s": [round(x, 2) for x in jt], "torch_steps_s": [round(x, 2) for x in tt]}))


if __name__ == "__main__":
    main()
