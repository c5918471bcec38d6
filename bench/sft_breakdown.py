"""Where an SFT step's time goes: reftjax vs torch, piece by piece (SmolLM2-135M, 8 x 256, fp32, CPU).

    python bench/sft_breakdown.py [REMAT] [REPEATS] [BATCH] [SEQ]   # none|dots|full (default none), 2, 8, 256

Prints one JSON line of median seconds: forward + loss, forward + backward, the trunk alone
(backward of sum(hidden)), the 49152-vocab head + loss alone (hidden states given), reftjax's full
`sft_step`, and the torch equivalents (transformers model, 2 threads). Companion of bench/sft_step.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reftjax.host import cpu_description, use_hugepage_malloc  # noqa: E402


def median_after_warmup(fn, repeats: int, wait=lambda out: out) -> float:
    """The median of `repeats` timed calls of `fn()` after an untimed first one (compile / warm-up), each waited for
    with `wait(out)` inside its timing (JAX dispatches asynchronously), rounded to 10 ms."""
    from reftjax.metrics import median_seconds

    wait(fn())
    return round(median_seconds(lambda: wait(fn()), repeats), 2)


def threaded(step, state, *args):
    """A call of `step(state, *args) -> (state, metrics)` that carries the new state into the next call (the step
    donates its input state), returning the metrics: what `median_after_warmup` times for a training step."""
    box = [state]

    def call():
        box[0], metrics = step(box[0], *args)
        return metrics
    return call


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("remat", nargs="?", default="none", choices=("none", "dots", "full"))
    ap.add_argument("repeats", nargs="?", type=int, default=2)
    ap.add_argument("batch", nargs="?", type=int, default=8)
    ap.add_argument("seq", nargs="?", type=int, default=256)
    args = ap.parse_args(argv)

    host_allocator = use_hugepage_malloc()  # re-executes once, before the heavy imports: reftjax/host.py
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from reftjax import losses
    from reftjax.hf import load_model, local_hf_dir
    from reftjax.models import forward
    from reftjax.steps import OptimConfig, init_state, make_optimizer, make_sft_step

    torch.set_num_threads(2)
    b, t, repeats = args.batch, args.seq, args.repeats
    model = load_model("default", remat=args.remat)
    cfg, params = model.config, model.params
    toks = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(b, t)).astype(np.int32)
    batch = {"tokens": jnp.asarray(toks), "attn_mask": jnp.ones((b, t), jnp.int32),
             "loss_mask": jnp.ones((b, t), jnp.int32)}

    # (the batch is an argument of each program, as in sft_step, not a constant XLA could fold into it)
    def loss_fn(p, batch):
        logits, _ = forward(p, cfg, batch["tokens"], batch["attn_mask"])
        return losses.sft_loss(logits[:, :-1], batch["tokens"][:, 1:], batch["loss_mask"][:, 1:])[0]

    def hidden_fn(p, batch):
        _, h = forward(p, cfg, batch["tokens"], batch["attn_mask"], return_logits=False)
        return jnp.sum(h)

    def head(e, h, batch):
        return losses.sft_loss((h @ e.T)[:, :-1], batch["tokens"][:, 1:], batch["loss_mask"][:, 1:])[0]

    h = jnp.asarray(np.random.default_rng(1).normal(size=(b, t, cfg.hidden_size)).astype(np.float32))
    emb = params["embed_tokens"]["embedding"]
    fwd, vg, vg_h = jax.jit(loss_fn), jax.jit(jax.value_and_grad(loss_fn)), jax.jit(jax.value_and_grad(hidden_fn))
    head_vg = jax.jit(jax.value_and_grad(head, argnums=(0, 1)))
    jax_time = lambda fn: median_after_warmup(fn, repeats, jax.block_until_ready)  # noqa: E731
    res = {"remat": args.remat, "host_allocator": host_allocator, "load0": os.getloadavg()[0],
           "jax_fwd_loss": jax_time(lambda: fwd(params, batch)), "jax_fwd_bwd": jax_time(lambda: vg(params, batch)),
           "jax_fwd_bwd_trunk_only": jax_time(lambda: vg_h(params, batch)),
           "jax_head_fwd_bwd": jax_time(lambda: head_vg(emb, h, batch))}
    tx = make_optimizer(OptimConfig(learning_rate=1e-5, schedule="constant", warmup_ratio=0.0), 1000)
    state = init_state({"policy": jax.tree.map(jnp.copy, params)}, tx, jax.random.key(0))
    res["jax_full_step"] = jax_time(threaded(make_sft_step(cfg, tx), state, batch))

    tmod = AutoModelForCausalLM.from_pretrained(local_hf_dir("default"), dtype=torch.float32)
    tmod.train()
    ids = torch.tensor(toks, dtype=torch.long)
    emb_t = tmod.model.embed_tokens.weight.detach().clone().requires_grad_(True)
    h_t = torch.tensor(np.asarray(h)).requires_grad_(True)

    def torch_fwd_loss():
        with torch.no_grad():
            tmod(input_ids=ids, labels=ids)

    def torch_fwd_bwd():
        tmod(input_ids=ids, labels=ids).loss.backward()
        tmod.zero_grad(set_to_none=True)

    def torch_head():
        logits = h_t @ emb_t.T
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                          ids[:, 1:].reshape(-1)).backward()

    res.update({name: median_after_warmup(fn, repeats) for name, fn in
                (("torch_fwd_loss", torch_fwd_loss), ("torch_fwd_bwd", torch_fwd_bwd),
                 ("torch_head_fwd_bwd", torch_head))})
    res["load1"] = os.getloadavg()[0]
    res["cpu"] = cpu_description()
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
