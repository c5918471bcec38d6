"""Grader throughput and jit-callback overhead; prints one JSON line.

Run: `python bench/graders.py [--batch 256] [--repeats 5]` (needs ../shared/data).
Reports medians: N-CoT and P-CoT completions graded per second at the batch size, N-CoT grading
time at batch 64, and the per-batch overhead of `grade_in_jit` (jit + io_callback + transfer)
over calling the host reward function directly. `grade_share_of_rollout(rollout_fn, ...)` gives
the share of a rollout+grade step spent grading once a rollout callable exists.
"""
import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from reftjax.graders.callback import grade_in_jit, make_reward_fn
from reftjax.graders.reft import ReftGrader, reft_target
from reftjax.graders.sandbox import SandboxPool
from reftjax.host import cpu_description
from reftjax.metrics import median_seconds

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reft"


def _char_decode(rows):
    return ["".join(map(chr, row)) for row in rows]


def _encode(texts, width):
    ids = np.zeros((len(texts), width), np.int32)
    mask = np.zeros((len(texts), width), np.int32)
    for b, text in enumerate(texts):
        codes = [ord(c) for c in text[:width]]
        ids[b, : len(codes)], mask[b, : len(codes)] = codes, 1
    return ids, mask


def grade_share_of_rollout(rollout_fn, host_fn, ids, mask, idx, repeats=5):
    """Share of (rollout + grading) time spent grading; `rollout_fn()` runs one rollout."""
    rollout = median_seconds(lambda: jax.block_until_ready(rollout_fn()), repeats)
    grade = median_seconds(lambda: host_fn(ids, mask, idx), repeats)
    return grade / (rollout + grade)


def grader_figures(b: int, *, ncot_s: float, ncot64_s: float, pcot_s: float, direct_s: float, in_jit_s: float,
                   in_pure_s: float) -> dict:
    """The keys from the median seconds: completions graded per second at batch `b` (N-CoT, P-CoT), N-CoT's batch
    of 64 in ms, the host reward function called directly in ms, and each jitted callback's time over it in ms."""
    return {"ncot_per_s": b / ncot_s, "ncot_batch64_ms": 1e3 * ncot64_s, "pcot_per_s": b / pcot_s,
            "host_fn_ms": 1e3 * direct_s, "callback_overhead_ms": 1e3 * (in_jit_s - direct_s),
            "pure_callback_overhead_ms": 1e3 * (in_pure_s - direct_s)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    b = args.batch
    nl = json.loads((DATA / "svamp_nl.json").read_text())[:b]
    py = json.loads((DATA / "svamp_python_sdp.json").read_text())[:b]
    # Half right, half wrong answers: both code paths are exercised.
    nl_texts = [reft_target(x["answer_cot"], x["answer_value"] if i % 2 else "1") for i, x in enumerate(nl)]
    ncot = ReftGrader()
    out = {"batch": b, "devices": jax.device_count()}
    ncot_s = median_seconds(lambda: ncot.grade_batch(nl, nl_texts), args.repeats)
    ncot64_s = median_seconds(lambda: ncot.grade_batch(nl[:64], nl_texts[:64]), args.repeats)
    with SandboxPool() as pool:
        pcot = ReftGrader(cot="python", pool=pool)
        texts = [x["answer_cot"] for x in py]
        pcot.grade_batch(py[:8], texts[:8])  # start the fork-servers
        pcot_s = median_seconds(lambda: pcot.grade_batch(py, texts), args.repeats)
        out["sandbox_workers"] = len(pool._servers)
        out["sandbox_isolation"] = pool.isolation
    ids, mask = _encode(nl_texts, 512)
    idx = np.arange(b, dtype=np.int32)
    host_fn = make_reward_fn(ncot, nl, _char_decode)
    step = jax.jit(lambda i, m, e: grade_in_jit(host_fn, i, m, e))
    pure = jax.jit(lambda i, m, e: jax.pure_callback(
        host_fn, jax.ShapeDtypeStruct((b,), jnp.float32), i, m, e))
    dev = [jnp.asarray(x) for x in (ids, mask, idx)]
    jax.block_until_ready((step(*dev), pure(*dev)))
    direct = median_seconds(lambda: host_fn(ids, mask, idx), args.repeats * 4)
    in_jit = median_seconds(lambda: jax.block_until_ready(step(*dev)), args.repeats * 4)
    in_pure = median_seconds(lambda: jax.block_until_ready(pure(*dev)), args.repeats * 4)
    out.update(grader_figures(b, ncot_s=ncot_s, ncot64_s=ncot64_s, pcot_s=pcot_s, direct_s=direct, in_jit_s=in_jit,
                              in_pure_s=in_pure))
    out["cpu"] = cpu_description()
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
