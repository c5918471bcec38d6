"""Exact-resume driver for `checkpoint_test.py`: tiny SFT, then PPO, checkpointing every step.

    python tests/resume_driver.py --dir D --out final.npz [--kill PHASE:STEP:WHEN]

SFT (`D/sft`) runs `--sft-steps` steps over a fixed synthetic dataset whose read
position lives in `extras`; PPO (`D/ppo`) starts from the SFT policy (partial
restore, fresh value head, new optimizer) and runs `--ppo-iters` iterations of
rollout -> make_experience (score 1 iff the first sampled token is 5) -> ppo_step,
drawing rollout keys from the checkpointed state rng. Rerunning the same command
resumes from the newest readable checkpoint. `--kill ppo:3:save` SIGKILLs the
process right after the save of PPO iteration 3 has started (files still being
written); WHEN=step kills after the update, before its save. On completion, every
leaf of the final PPO state is written to `--out` (.npz, keys = tree paths).
"""
from __future__ import annotations

import argparse
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np

from reftjax.checkpoint import CheckpointConfig, Checkpointer, abstract_like, restore_params
from reftjax.models import ModelConfig, init_params, init_value_head
from reftjax.rollout import SamplingConfig, rollout
from reftjax.steps import OptimConfig, PPOConfig, init_state, make_experience_fn, make_optimizer, make_ppo_step, \
    make_sft_step

MODEL = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                    eos_token_ids=(1,))
SFT_BATCH, SFT_ROWS, SEQ = 4, 12, 8
PPO_BATCH, PROMPTS, PROMPT_LEN = 8, 24, 4
SAMPLING = SamplingConfig(max_new_tokens=3, eos_ids=(1,), pad_id=0)
PPO = PPOConfig(minibatch_size=4, kl_coef=0.05, ppo_epochs=1)


def _maybe_kill(args, phase: str, step: int, when: str) -> None:
    if args.kill == f"{phase}:{step}:{when}":
        os.kill(os.getpid(), signal.SIGKILL)


def _rows(table: np.ndarray, pos: int, n: int) -> np.ndarray:
    """Rows pos..pos+n of `table`, cycling (the data position is the only loader state)."""
    return table[np.arange(pos, pos + n) % len(table)]


def run_sft(args) -> None:
    tokens = np.random.RandomState(0).randint(2, 32, (SFT_ROWS, SEQ)).astype(np.int32)
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="linear", warmup_ratio=0.2), args.sft_steps)
    def fresh():
        return init_state({"policy": init_params(MODEL, jax.random.key(0))}, tx, jax.random.key(1))

    ckpt = Checkpointer(CheckpointConfig(os.path.join(args.dir, "sft")), config={"phase": "sft"})
    state, extras = fresh(), {"data_pos": 0}
    restored = ckpt.restore_latest(abstract_like(state))
    if restored is not None:
        state, extras, _ = restored
    step_fn = make_sft_step(MODEL, tx)
    for step in range(int(state.step) + 1, args.sft_steps + 1):
        tok = jnp.asarray(_rows(tokens, extras["data_pos"], SFT_BATCH))
        batch = {"tokens": tok, "attn_mask": jnp.ones_like(tok), "loss_mask": jnp.ones_like(tok)}
        state, _ = step_fn(state, batch)
        extras = {"data_pos": extras["data_pos"] + SFT_BATCH}
        _maybe_kill(args, "sft", step, "step")
        ckpt.save(step, state, extras)
        _maybe_kill(args, "sft", step, "save")
    ckpt.close()


def run_ppo(args):
    prompts = np.random.RandomState(1).randint(2, 32, (PROMPTS, PROMPT_LEN)).astype(np.int32)
    tx = make_optimizer(OptimConfig(learning_rate=3e-3, schedule="constant", warmup_ratio=0.0), args.ppo_iters)
    abstract_policy = jax.eval_shape(lambda: init_params(MODEL, jax.random.key(0)))

    def fresh(policy):  # SFT -> PPO hand-off: value head and optimizer start fresh
        return init_state({"policy": policy, "value_head": init_value_head(MODEL, jax.random.key(2))}, tx,
                          jax.random.key(3))

    ref = restore_params(os.path.join(args.dir, "sft"), abstract_policy)
    ckpt = Checkpointer(CheckpointConfig(os.path.join(args.dir, "ppo")), config={"phase": "ppo"})
    state, extras = fresh(jax.tree.map(jnp.copy, ref)), {"data_pos": 0, "ppo_iter": 0}
    restored = ckpt.restore_latest(abstract_like(state))
    if restored is not None:
        state, extras, _ = restored
    exp_fn, ppo_fn = make_experience_fn(MODEL, PPO), make_ppo_step(MODEL, tx, PPO)
    for it in range(extras["ppo_iter"] + 1, args.ppo_iters + 1):
        rng, sub = jax.random.split(state.rng)
        state = state.replace(rng=rng)
        p = jnp.asarray(_rows(prompts, extras["data_pos"], PPO_BATCH))
        r = rollout(state.params["policy"], p, jnp.ones_like(p), sub, model_cfg=MODEL, cfg=SAMPLING)
        scores = (r.tokens_BxN[:, 0] == 5).astype(jnp.float32)
        exp, _ = exp_fn(state.params, ref, r, jnp.zeros(PPO_BATCH, jnp.int32), scores)
        state, _ = ppo_fn(state, exp)
        extras = {"data_pos": extras["data_pos"] + PPO_BATCH, "ppo_iter": it}
        _maybe_kill(args, "ppo", it, "step")
        ckpt.save(it, state, extras)
        _maybe_kill(args, "ppo", it, "save")
    ckpt.close()
    return state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sft-steps", type=int, default=4)
    ap.add_argument("--ppo-iters", type=int, default=4)
    ap.add_argument("--kill", default="", help="PHASE:STEP:WHEN, e.g. ppo:2:save")
    args = ap.parse_args()
    run_sft(args)
    state = run_ppo(args)
    state = state.replace(rng=jax.random.key_data(state.rng))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    np.savez(args.out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


if __name__ == "__main__":
    main()
