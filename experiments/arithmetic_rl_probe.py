"""Probe: can PPO/GRPO raise the sampled correct rate on a FIXED set of training prompts?

    python -m experiments.arithmetic_rl_probe --algo grpo --lr 1e-4 --group 8 --prompts 32 --iters 30

A diagnostic for the arithmetic experiment (`experiments.arithmetic_reft`): one SFT
warm-up of exactly `--warmup-samples` samples (the experiment's cap; unlike the experiment it does not stop
early at the validation target, so it is a stronger warm-up), then RL iterations that
always sample the same `--prompts` training questions. With the update right, the
sampled correct rate on those prompts must climb (the policy can at least learn these
answers); how fast it climbs measures the RL signal per sample at this model size.
Prints one line every `--print-every` iterations: sampled correct rate, reward, KL to
the warm-up (nats per sequence), entropy, clip fraction and gradient norm.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from experiments import arithmetic_reft as ar
from experiments import arithmetic_task as task


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m experiments.arithmetic_rl_probe", description=__doc__.split("\n")[0])
    ap.add_argument("--algo", choices=("ppo", "grpo"), default="grpo")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO); PPO uses 1")
    ap.add_argument("--prompts", type=int, default=32, help="fixed training prompts sampled every iteration")
    ap.add_argument("--minibatch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup-samples", type=int, default=ar.ExpConfig.warmup_samples)
    ap.add_argument("--seed", type=ar.seed_arg, default=0)
    ap.add_argument("--print-every", type=int, default=4)
    args = ap.parse_args(argv)

    import jax

    from reftjax.models import init_params
    from reftjax.rollout import rollout
    from reftjax.steps import init_rl_params, init_state

    group = args.group if args.algo == "grpo" else 1
    rows = args.prompts * group
    minibatch = min(args.minibatch, rows)  # PPO's 32 rows under the default 64 failed in ExpConfig's check
    if rows % minibatch or (args.algo == "grpo" and (group < 2 or minibatch % group)):
        ap.error(f"--prompts x samples per prompt = {rows} rows must be a multiple of --minibatch {minibatch}"
                 + (f", and --minibatch of --group {group} >= 2" if args.algo == "grpo" else ""))
    cfg = ar.ExpConfig(rl_batch=rows, minibatch_size=minibatch, ppo_lr=args.lr, grpo_lr=args.lr,
                       grpo_group=group if args.algo == "grpo" else 1, eval_every=rows * 16,
                       arm_samples=rows * 16, warmup_samples=args.warmup_samples,
                       arms=("reft",) if args.algo == "ppo" else ("grpo",))  # the one RL arm it probes (checked)
    tok = task.build_tokenizer()
    data = ar.build_data(cfg, tok)
    run = ar.Runner(cfg, data, tok)
    warm, _ = ar.train_sft(run, init_params(run.model_cfg, jax.random.key(args.seed)), cfg.warmup_samples,
                           cfg.warmup_lr, "linear", args.seed)
    print(f"warm-up: greedy val accuracy {run.accuracy(warm, 'val'):.3f}", flush=True)
    tx, pcfg, exp_fn, ppo_step = run.rl_steps(args.algo, args.lr)
    params = init_rl_params(run.copy(warm), run.model_cfg, pcfg, jax.random.key(args.seed + 1000))
    state = init_state(params, tx, jax.random.key(args.seed + 1))
    tokens, mask = data.prompts["train"]
    fixed = np.arange(args.prompts)
    idx = np.repeat(fixed, pcfg.group_size)
    scfg = dataclasses.replace(run.sample, n=pcfg.group_size)
    history = []
    for it in range(args.iters):
        r = rollout(state.params["policy"], tokens[fixed], mask[fixed], jax.random.fold_in(state.rng, it),
                    model_cfg=run.model_cfg, cfg=scfg)
        scores, diag = run.scores(idx, r)
        exp, em = exp_fn(state.params, warm, r, jax.numpy.asarray(idx, jax.numpy.int32), scores)
        state, m = ppo_step(state, exp)
        point = {"iter": it, "correct": diag["correct"], "reward": float(em["reward"]), "kl": float(em["kl"]),
                 "entropy": float(m["entropy"]), "clipfrac": float(m["clipfrac"]), "grad_norm": float(m["grad_norm"])}
        history.append(point)
        if it % args.print_every == 0 or it == args.iters - 1:
            print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items()),
                  flush=True)
    return history


if __name__ == "__main__":
    main()
