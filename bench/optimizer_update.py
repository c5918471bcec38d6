"""Cost of one guarded AdamW update on SmolLM2-135M (CPU fp32): reftjax vs plain optax vs torch.

    python bench/optimizer_update.py [--repeats 5]

Times, on the same parameter tree with constant gradients, the minimum of `--repeats` calls of:
  * `reftjax.steps._apply_update` (clip 1.0 + AdamW, skipped as a whole when the loss or the
    gradient norm is not finite) jitted with the state donated, as in every step;
  * the same optax chain without the guard (what the guard costs);
  * torch `clip_grad_norm_` + `AdamW` (default foreach implementation, 2 threads).
Prints one JSON line (seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def best_update_seconds(fn, state, repeats: int, clock=time.perf_counter) -> tuple:
    """The fastest of `repeats` timed calls of `fn(state) -> (state, out)` after an untimed first one (compile), the
    state threaded through every call (it is donated), and the final state."""
    import jax

    state, out = fn(state)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        state, out = fn(state)
        jax.block_until_ready((state, out))
        best = min(best, clock() - t0)
    return state, best


def steady_min(times: list[float]) -> float:
    """The fastest of timed steps after the first (warm-up: torch's AdamW state is created on its first step)."""
    return min(times[1:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax
    import torch

    from reftjax.hf import load_model
    from reftjax.host import cpu_description
    from reftjax.steps import OptimConfig, _apply_update, init_state, make_optimizer

    params = {"policy": load_model("default").params}
    tx = make_optimizer(OptimConfig(learning_rate=1e-5, schedule="constant", warmup_ratio=0.0), 1000)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)

    def timed(fn, state):
        return best_update_seconds(lambda st: fn(st, grads), state, args.repeats)

    def plain(st, g):
        updates, opt_state = tx.update(g, st.opt_state, st.params)
        return st.replace(params=optax.apply_updates(st.params, updates), opt_state=opt_state), optax.tree.norm(g)

    state = init_state(jax.tree.map(jnp.copy, params), tx, jax.random.key(0))
    state, guarded = timed(jax.jit(lambda st, g: _apply_update(st, g, tx, jnp.float32(1.0)), donate_argnums=0), state)
    state, unguarded = timed(jax.jit(plain, donate_argnums=0), state)

    torch.set_num_threads(2)
    tparams = [torch.nn.Parameter(torch.zeros(x.shape)) for x in jax.tree.leaves(params)]
    for p in tparams:
        p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.AdamW(tparams, lr=1e-5, weight_decay=0.0)
    times = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(tparams, 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    result = {"bench": "optimizer_update", "params": sum(p.numel() for p in tparams),
              "reftjax_guarded_s": round(guarded, 3), "optax_unguarded_s": round(unguarded, 3),
              "torch_adamw_s": round(steady_min(times), 3), "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps({**result, "cpu": cpu_description()}))
    return result


if __name__ == "__main__":
    main()
