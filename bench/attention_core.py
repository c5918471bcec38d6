"""The attention core alone (SmolLM2-135M shapes: 8 x 256 tokens, 9 query / 3 KV heads of 64), x 30 layers.

    python bench/attention_core.py [--repeats 8]

Times forward and forward + backward of `reftjax.models.llama._attend` (causal, grouped-query,
softmax in float32, one layer's probabilities materialised; since session 8 the backward is
`attention_core`'s custom VJP, which recomputes them) and of torch's fused
`scaled_dot_product_attention(is_causal=True)` (2 threads, K/V repeated to 9 heads), multiplied
by 30 layers: the share of an SFT step that the attention core accounts for (companion of
bench/sft_breakdown.py). Prints one JSON line of seconds (minimum of `--repeats`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def layers_seconds(fn, repeats: int, layers: int) -> float:
    """`layers` x the fastest of `repeats` timed calls of one layer's `fn`, after an untimed first call (compile /
    warm-up), rounded to ms."""
    from reftjax.metrics import min_seconds

    fn()
    return round(layers * min_seconds(fn, repeats), 3)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from reftjax.host import cpu_description
    from reftjax.models.llama import _attend, attention_mask

    b, t, h, kv, d, layers = 8, 256, 9, 3, 64, 30
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)).astype(np.float32)) for n in (h, kv, kv))
    slots = jnp.arange(t)
    mask = attention_mask(slots, slots, jnp.ones((b, t), jnp.int32), None)

    def best(fn):
        return layers_seconds(fn, args.repeats, layers)

    fwd = jax.jit(lambda q, k, v: _attend(q, k, v, mask))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(_attend(q, k, v, mask) ** 2), argnums=(0, 1, 2)))
    result = {"bench": "attention_core", "layers": layers,
              "reftjax_fwd_s": best(lambda: jax.block_until_ready(fwd(q, k, v))),
              "reftjax_fwd_bwd_s": best(lambda: jax.block_until_ready(grad(q, k, v)))}

    torch.set_num_threads(2)
    tq = torch.tensor(np.asarray(q)).transpose(1, 2).contiguous().requires_grad_()
    tk, tv = (torch.tensor(np.asarray(x)).transpose(1, 2).repeat_interleave(h // kv, 1).contiguous().requires_grad_()
              for x in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_fwd():
        with torch.no_grad():
            sdpa(tq, tk, tv, is_causal=True)

    def torch_fwd_bwd():
        (sdpa(tq, tk, tv, is_causal=True) ** 2).sum().backward()

    result.update(torch_sdpa_fwd_s=best(torch_fwd), torch_sdpa_fwd_bwd_s=best(torch_fwd_bwd),
                  load_avg_1m=round(os.getloadavg()[0], 2))
    print(json.dumps({**result, "cpu": cpu_description()}))
    return result


if __name__ == "__main__":
    main()
