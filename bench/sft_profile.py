"""Where an SFT step's time goes inside XLA: per-op profile of `sft_step` on SmolLM2-135M.

    python bench/sft_profile.py [--batch 8] [--seq 256] [--steps 3] [--top 20]

Runs `--steps` timed steps (reporting wall seconds, minor page faults and resident memory
after each: the host allocator's signature, see reftjax/host.py), then one step under
`jax.profiler.trace`, and prints one JSON line: the top HLO ops by time summed over
threads (with how many times each ran: 30 = once per layer), the totals per op kind
(`ynn_fusion` = YNNPACK GEMMs), and the traced step's wall time. XLA:CPU runs
independent ops concurrently on its threads, so the thread-summed total can exceed
the wall time and two GEMMs sharing the cores each look slower than alone.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reftjax.host import cpu_description, use_hugepage_malloc  # noqa: E402

HOST_ALLOCATOR = use_hugepage_malloc()  # re-executes once, before the heavy imports: reftjax/host.py
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _rss_bytes() -> int:
    """Resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def op_figures(events: list[dict], names: dict[str, str], top: int) -> dict:
    """The profile keys from the trace: each HLO op of the program (`names`: op -> op_name) with its complete ("X")
    events' count and seconds (durations in microseconds, summed over threads), their total, the `top` ops by
    seconds, and the seconds per op kind (the op's name less its ".N" suffix), the 12 largest."""
    per_op = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") == "X" and e["name"] in names:
            per_op[e["name"]][0] += 1
            per_op[e["name"]][1] += e.get("dur", 0.0) / 1e6
    kinds = collections.defaultdict(float)
    for op, (_, sec) in per_op.items():
        kinds[re.sub(r"\.\d+$", "", op)] += sec
    top_ops = sorted(per_op.items(), key=lambda kv: -kv[1][1])[:top]
    return {"ops_s_thread_summed": round(sum(v[1] for v in per_op.values()), 2),
            "top_ops": [{"op": op, "runs": c, "s": round(sec, 3), "name": names[op]} for op, (c, sec) in top_ops],
            "by_kind_s": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:12]}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from decode_profile import _op_names
    from reftjax.hf import load_model
    from reftjax.steps import OptimConfig, init_state, make_optimizer, make_sft_step

    model = load_model("default")
    cfg = model.config
    b, t = args.batch, args.seq
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(b, t)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens), "attn_mask": jnp.ones((b, t), jnp.int32),
             "loss_mask": jnp.ones((b, t), jnp.int32)}
    tx = make_optimizer(OptimConfig(learning_rate=1e-5, schedule="constant", warmup_ratio=0.0), 1000)
    state = init_state({"policy": model.params}, tx, jax.random.key(0))
    step = make_sft_step(cfg, tx)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    steps = []
    for _ in range(args.steps):
        f0, s = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        steps.append({"s": round(time.perf_counter() - s, 2),
                      "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
                      "rss_gb": round(_rss_bytes() / 1e9, 2)})
    with tempfile.TemporaryDirectory() as d:
        s = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            state, m = step(state, batch)
            jax.block_until_ready(m)
        traced_s = time.perf_counter() - s
        trace = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = _op_names(step.lower(state, batch).compile().as_text())  # same program; compiled after the timing
    print(json.dumps({
        "cpu": cpu_description(),
        "bench": "sft_profile", "batch": b, "seq": t, "host_allocator": HOST_ALLOCATOR,
        "steps": steps, "traced_step_s": round(traced_s, 2),
        **op_figures(events, names, args.top),
        "load_avg_1m": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
