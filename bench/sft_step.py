"""Benchmark: reftjax `sft_step` vs a plain PyTorch training step on SmolLM2-135M.

Batch 8 x 256 tokens (all real: random ids, full loss mask), fp32 (or `--dtype bfloat16`), AdamW, CPU (or CUDA).
Both contenders run in one process (torch with 2 threads), after warm-up/compilation, and the
medians of `--repeats` timed steps each are reported.

On a GPU (`JAX_PLATFORMS=cuda`) torch runs on CUDA too, each of its steps ending in a synchronize as reftjax's ends
in block_until_ready. `--dtype bfloat16` is mixed precision on both sides: float32 weights and optimizer state,
bf16 compute (reftjax `load_model(dtype="bfloat16")`, as the gpu/tpu presets; torch `autocast(bfloat16)`), and the
MFU is against the measured bf16 matmul rate. float32 on a GPU: JAX's default precision may use TF32 matmuls where
torch's default does not (the JSON line records torch's setting).

Schedule (`--schedule`): `blocked` (default) runs each contender in blocks of `--block`
consecutive timed steps, alternating blocks (so slow drifts of the machine hit both), and
times each block's first step separately (`*_switch_steps_s`, not in the medians): that step
pays for the memory the other framework just freed (the kernel zeroes and compacts it into
huge pages: ~3.5 s of system time per reftjax step after a torch step, BUILD_NOTES session 7),
which a training loop running only one framework never sees. `alternate` is the old
one-step-each schedule. Per-step system CPU time is reported for both (`*_sys_s`).

    python bench/sft_step.py --repeats 6           # one JSON line
    JAX_PLATFORMS=cuda python bench/sft_step.py --dtype bfloat16 --batch 32 --seq 512

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
import resource
import statistics
import time

from reftjax.host import cpu_description, use_hugepage_malloc  # noqa: E402

HOST_ALLOCATOR = use_hugepage_malloc()  # re-executes once, before the heavy imports: reftjax/host.py

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # (on a GPU: JAX would hold 75% of it, torch runs too)


def run_schedule(fns: dict, timed, repeats: int, schedule: str, block: int) -> dict:
    """Run the contenders `fns` (name -> step) by `schedule` until each has `repeats` timed steps; `timed(fn)` runs
    one step and returns its (wall, system) seconds. Per name: `steps` and `sys` of the timed steps, and `switch`,
    the wall time of each block's first step (blocked schedule), which pays for the other framework's freed memory
    and is in no median."""
    runs = {name: {"fn": fn, "steps": [], "sys": [], "switch": []} for name, fn in fns.items()}
    last = runs[list(fns)[-1]]
    while len(last["steps"]) < repeats:
        for r in runs.values():
            if schedule == "blocked":
                r["switch"].append(timed(r["fn"])[0])
            for _ in range(1 if schedule == "alternate" else min(block, repeats - len(r["steps"]))):
                w, sys_s = timed(r["fn"])
                r["steps"].append(w)
                r["sys"].append(sys_s)
    return runs


def step_figures(model_cfg, batch: int, seq: int, *, reftjax_steps: list[float], torch_steps: list[float],
                 compile_wall_s: float, peak: float) -> dict:
    """The timing keys from the timed steps (the switch steps and warm-ups are not among them): medians, tokens/s
    (batch x seq tokens a step, all real), `ratio_vs_torch` (reftjax's speed over torch's), `compile_s` and the
    MFUs (3 x forward FLOPs: forward + backward 2x, attention at mean context seq/2, over `peak` FLOP/s)."""
    n_tok = batch * seq
    flops = 3 * model_cfg.flops_per_token(seq // 2) * n_tok  # forward + backward (2x)
    j, to = statistics.median(reftjax_steps), statistics.median(torch_steps)
    return {"reftjax_step_s": round(j, 3), "torch_step_s": round(to, 3),
            "reftjax_tokens_per_s": round(n_tok / j, 1), "torch_tokens_per_s": round(n_tok / to, 1),
            # the first call's wall time less a steady step, as rollout.py and ppo_iteration.py report it (it was
            # the first call's whole wall time: compile plus one step)
            "ratio_vs_torch": round(to / j, 3), "compile_s": round(compile_wall_s - j, 1),
            "mfu_reftjax": round(flops / j / peak, 3), "mfu_torch": round(flops / to / peak, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per contender")
    ap.add_argument("--schedule", choices=("blocked", "alternate"), default="blocked")
    ap.add_argument("--block", type=int, default=3, help="timed steps per block (blocked schedule)")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="compute dtype of both contenders (weights and optimizer state stay float32)")
    ap.add_argument("--head-chunk-rows", type=int, default=512,
                    help="sft_step's fused head + loss chunk (0: full logits + sft_loss)")
    args = ap.parse_args()
    if args.repeats < 1 or args.block < 1:  # (--block 0 ran untimed steps forever)
        ap.error("--repeats and --block must be >= 1")

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
    model = load_model("default", dtype=args.dtype, remat=args.remat)
    cfg = model.config
    device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/sft_step.py: JAX runs on a GPU but this torch has no CUDA; install a CUDA torch")
    # before either contender runs (after the torch steps it once read 79 of 115 GFLOP/s)
    peak = measured_peak_flops(dtype=args.dtype)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, size=(b, t)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens), "attn_mask": jnp.ones((b, t), jnp.int32),
             "loss_mask": jnp.ones((b, t), jnp.int32)}
    tx = make_optimizer(OptimConfig(learning_rate=1e-5, schedule="constant", warmup_ratio=0.0), 1000)
    state = init_state({"policy": model.params}, tx, jax.random.key(0))
    step = make_sft_step(cfg, tx, head_chunk_rows=args.head_chunk_rows)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0

    tm = AutoModelForCausalLM.from_pretrained(local_hf_dir("default"), dtype=torch.float32).to(device)
    tm.train()
    # the fused kernel (one pass over all parameters), torch's fastest AdamW here, like optax's single program
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def torch_step():
        with autocast:
            out = tm(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    torch_step()  # warm-up

    def reftjax_step():
        nonlocal state, m
        state, m = step(state, batch)
        jax.block_until_ready(m)

    def timed(fn):
        r0, s = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        return time.perf_counter() - s, resource.getrusage(resource.RUSAGE_SELF).ru_stime - r0.ru_stime

    runs = run_schedule({"reftjax": reftjax_step, "torch": torch_step}, timed, args.repeats, args.schedule, args.block)
    jt, tt = runs["reftjax"]["steps"], runs["torch"]["steps"]
    peak_first = peak
    # the faster of the measurements before and after the contenders
    peak = measured_peak_flops(remeasure=True, dtype=args.dtype)
    fig = step_figures(cfg, b, t, reftjax_steps=jt, torch_steps=tt, compile_wall_s=compile_s, peak=peak)
    print(json.dumps({
        "cpu": cpu_description(),
        "bench": "sft_step", "model": "SmolLM2-135M-Instruct", "batch": b, "seq": t, "dtype": args.dtype,
        "device": jax.devices()[0].device_kind, "torch_device": device,
        "torch_allow_tf32": torch.backends.cuda.matmul.allow_tf32 if device == "cuda" else None,
        "remat": args.remat, "head_chunk_rows": args.head_chunk_rows, "host_allocator": HOST_ALLOCATOR,
        **fig, "peak_gflops": round(peak / 1e9, 1), "peak_gflops_first": round(peak_first / 1e9, 1),
        "loss": float(m["loss"]), "repeats": args.repeats,
        "load_avg_1m_start": round(load_start, 2), "load_avg_1m": round(os.getloadavg()[0], 2),
        "schedule": args.schedule, "block": args.block if args.schedule == "blocked" else 1,
        "reftjax_steps_s": [round(x, 2) for x in jt], "torch_steps_s": [round(x, 2) for x in tt],
        "reftjax_sys_s": round(statistics.median(runs["reftjax"]["sys"]), 2),
        "torch_sys_s": round(statistics.median(runs["torch"]["sys"]), 2),
        "reftjax_switch_steps_s": [round(x, 2) for x in runs["reftjax"]["switch"]],
        "torch_switch_steps_s": [round(x, 2) for x in runs["torch"]["switch"]]}))


if __name__ == "__main__":
    main()
