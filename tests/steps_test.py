"""Training steps: PPO/GRPO learn a toy reward (1 and 8 devices), non-finite skips, SFT accumulation/donation."""
import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reftjax import sharding
from reftjax.checkpoint import CheckpointConfig, Checkpointer
from reftjax.models import ModelConfig, init_params, init_value_head
from reftjax.rollout import SamplingConfig, rollout
from reftjax.steps import OptimConfig, PPOConfig, init_rl_params, init_state, make_experience_fn, make_optimizer, \
    make_ppo_step, make_schedule, make_sft_step, ppo_updates_per_step, schedule_value, completion_hidden, policy_outputs

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                  eos_token_ids=(1,))
TARGET = 5  # reward 1 iff the first sampled token is TARGET
MAX_ITERS = 40


@functools.lru_cache(maxsize=None)
def _host_policy(seed=0):
    return jax.tree.map(np.asarray, init_params(CFG, jax.random.key(seed)))


def _mesh():
    return sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))


def _place(tree, mesh):
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    return sharding.put(tree, jax.tree.map(lambda _: sharding.replicated(mesh), tree))


def _rl_run(algo: str, mesh=None, iters=MAX_ITERS, critic="shared"):
    """Train on the toy reward; returns the per-iteration mean rewards and the step metrics."""
    n = 4 if algo == "grpo" else 1
    pc = PPOConfig(algo=algo, group_size=max(n, 2) if algo == "grpo" else 1, minibatch_size=8, kl_coef=0.0,
                   ppo_epochs=2, critic=critic)
    tx = make_optimizer(OptimConfig(learning_rate=3e-3, schedule="constant", warmup_ratio=0.0), iters)
    ref = sharding.place_params(_host_policy(), CFG, mesh)
    params = {"policy": sharding.place_params(_host_policy(), CFG, mesh)}
    if algo == "ppo":
        params["value_head"] = _place(jax.tree.map(np.asarray, init_value_head(CFG, jax.random.key(2))), mesh)
        if critic == "separate":
            params["critic"] = sharding.place_params(_host_policy(), CFG, mesh)
    state = init_state(params, tx, jax.random.key(3))
    prompts = np.full((16 // n, 4), 3, np.int32)
    prompts = jnp.asarray(prompts) if mesh is None else sharding.shard_batch(prompts, mesh)
    scfg = SamplingConfig(max_new_tokens=2, eos_ids=(1,), pad_id=0, n=n)
    exp_fn, step = make_experience_fn(CFG, pc), make_ppo_step(CFG, tx, pc)
    rewards = []
    for it in range(iters):
        r = rollout(state.params["policy"], prompts, jnp.ones_like(prompts), jax.random.fold_in(jax.random.key(9), it),
                    model_cfg=CFG, cfg=scfg)
        exp, em = exp_fn(state.params, ref, r, jnp.zeros(16, jnp.int32), (r.tokens_BxN[:, 0] == TARGET) * 1.0)
        state, m = step(state, exp)
        rewards.append(float(em["reward"]))
        if np.mean(rewards[-3:]) > 0.9 and len(rewards) >= 3:
            break
    return rewards, m


@functools.lru_cache(maxsize=None)
def _ppo_rewards(n_devices: int):
    return _rl_run("ppo", _mesh() if n_devices == 8 else None)[0]


@pytest.mark.parametrize("n_devices", [1, 8])
def test_ppo_learns_target_token(n_devices):
    rewards = _ppo_rewards(n_devices)
    assert rewards[0] < 0.3, rewards
    assert np.mean(rewards[-3:]) > 0.9 and len(rewards) <= MAX_ITERS, rewards


def test_ppo_sharded_matches_single_device():
    one, eight = _ppo_rewards(1), _ppo_rewards(8)
    np.testing.assert_allclose(eight, one, atol=1e-6)


def test_ppo_with_a_separate_critic_learns_target_token():
    rewards, m = _rl_run("ppo", critic="separate")
    assert rewards[0] < 0.3 and np.mean(rewards[-3:]) > 0.9, rewards
    assert int(m["skipped"]) == 0


def test_grpo_learns_target_token():
    rewards, m = _rl_run("grpo")
    assert rewards[0] < 0.3 and np.mean(rewards[-3:]) > 0.9, rewards
    assert int(m["skipped"]) == 0


def test_experience_and_losses_match_numpy_kl_rewards_gae_whitening_and_coefficients():
    """The step-level wiring against NumPy, with a reference policy other than the policy and non-default gamma and
    lambda (a mutation review found the KL's sign, gamma/lambda swapped, whitening without the mean removed,
    `vf_coef`, GRPO's std scaling and its KL coefficient all unchecked: the other step tests compare the code
    with itself). PPO: the KL-shaped reward (score on the last real token), GAE, whitened advantages, the
    critic's explained variance (1 - var(R - V) / var(R), Bessel-corrected, floored at -1) and
    loss = pg + vf_coef * vf. GRPO: group advantages (g - mean) / (std + 1e-4) and loss = pg + kl_coef * k3."""
    from reftjax.steps import _rl_loss

    pc = PPOConfig(minibatch_size=4, kl_coef=0.05, gamma=0.9, gae_lambda=0.8)
    params = {"policy": jax.tree.map(jnp.asarray, _host_policy()),
              "value_head": init_value_head(CFG, jax.random.key(2))}
    ref = jax.tree.map(jnp.asarray, _host_policy(1))
    prompts = jnp.full((8, 4), 3, jnp.int32)
    r = rollout(params["policy"], prompts, jnp.ones_like(prompts), jax.random.key(4), model_cfg=CFG,
                cfg=SamplingConfig(max_new_tokens=6, eos_ids=(1,)))
    scores = np.random.RandomState(0).rand(8).astype(np.float32)
    scores[3] = 1.0  # a correct answer: `accuracy` counts the scores of 1
    exp, em = make_experience_fn(CFG, pc)(params, ref, r, jnp.zeros(8, jnp.int32), jnp.asarray(scores))
    m = np.asarray(exp.mask_BxN) > 0
    assert 8 < m.sum() < m.size  # some rows stopped early: the mask matters
    old, lref, v = (np.asarray(x, np.float64) for x in (exp.logp_old_BxN, exp.logp_ref_BxN, exp.values_old_BxN))
    assert np.abs(old - lref)[m].min() > 0  # the KL term is not zero
    rew = np.where(m, -pc.kl_coef * (old - lref), 0.0)
    rew[np.arange(8), [np.flatnonzero(row).max() for row in m]] += scores
    v = np.where(m, v, 0.0)
    adv, last = np.zeros_like(v), np.zeros(8)
    for t in reversed(range(v.shape[1])):
        nxt = v[:, t + 1] if t + 1 < v.shape[1] else 0.0
        last = rew[:, t] + pc.gamma * nxt - v[:, t] + pc.gamma * pc.gae_lambda * last
        adv[:, t] = last
    ret = adv + v
    np.testing.assert_allclose(np.asarray(exp.returns_BxN)[m], ret[m], rtol=1e-5, atol=1e-5)
    a = adv[m]
    np.testing.assert_allclose(np.asarray(exp.advantages_BxN)[m], (a - a.mean()) / np.sqrt(a.var(ddof=1) + 1e-8),
                               rtol=1e-4, atol=1e-4)
    # whiten_advantages=False: the raw GAE advantages (the flag was read by no test: third mutation review)
    raw = make_experience_fn(CFG, dataclasses.replace(pc, whiten_advantages=False))(
        params, ref, r, jnp.zeros(8, jnp.int32), jnp.asarray(scores))[0]
    np.testing.assert_allclose(np.asarray(raw.advantages_BxN)[m], a, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(raw.advantages_BxN)[~m])
    want = max(-1.0, 1.0 - np.var(ret[m] - v[m], ddof=1) / (np.var(ret[m], ddof=1) + 1e-8))
    np.testing.assert_allclose(float(em["value_explained_variance"]), want, rtol=1e-4, atol=1e-5)
    # TRL's reward_std (Bessel-corrected, over the batch); no groups of samples here, so no frac_reward_zero_std
    np.testing.assert_allclose(float(em["reward_std"]), np.std(scores, ddof=1), rtol=1e-5)
    assert "frac_reward_zero_std" not in em
    # the rest of the row the loop logs (a second mutation review found each unchecked): accuracy (scores of 1), the
    # KL(old || ref) summed over each row's valid tokens and averaged over rows, the mean length, the finished share,
    # and the decode-vs-teacher-forced log-prob gap: the largest over valid tokens, padding left out
    from reftjax.steps import experience_metrics

    assert float(em["accuracy"]) == pytest.approx(1 / 8)
    np.testing.assert_allclose(float(em["kl"]), np.mean(np.where(m, old - lref, 0.0).sum(1)), rtol=1e-5)
    assert float(em["response_length"]) == pytest.approx(m.sum(1).mean())
    finished = np.array([(np.asarray(r.tokens_BxN)[b][m[b]] == 1).any() for b in range(8)])
    assert float(em["finished"]) == pytest.approx(finished.mean()) and 0 < finished.mean() < 0.5
    gap = np.where(m, np.arange(m.size).reshape(m.shape) / 100.0, 1e3).astype(np.float32)
    noisy = r.replace(logprobs_BxN=exp.logp_old_BxN + gap)
    np.testing.assert_allclose(float(experience_metrics(exp, noisy)["rollout_logp_maxdiff"]), gap[m].max(), rtol=1e-5)
    for vf_coef in (5.0, 0.5):
        loss, lm = _rl_loss(params, exp, CFG, dataclasses.replace(pc, vf_coef=vf_coef))
        np.testing.assert_allclose(float(loss), float(lm["pg_loss"]) + vf_coef * float(lm["vf_loss"]), rtol=1e-6)
        assert float(lm["vf_loss"]) > 1e-3
    # the update's metrics (second mutation review): entropy is the masked mean of the per-token entropies and
    # explained_variance that of the values the update computes (not the experience's old values, made other here,
    # against returns near them), and a critic-only update's loss is vf_coef x the value loss (a sharper head than
    # the initial one: entropies that differ by token)
    sharp = {**params, "policy": {**params["policy"], "lm_head": jax.tree.map(lambda x: 30.0 * x,
                                                                               params["policy"]["lm_head"])}}
    logp_now, now, ent = policy_outputs(sharp, CFG, exp.tokens_BxL, exp.attn_mask_BxL, m.shape[1], True,
                                        with_entropy=True, head_chunk_rows=pc.head_chunk_rows)
    noise = np.random.RandomState(1).randn(2, *m.shape)
    probe_ret = np.where(m, np.asarray(now, np.float64) + 0.3 * noise[0], 0.0)
    off = jnp.asarray(np.where(m, noise[1], 0.0), jnp.float32)
    probe = dataclasses.replace(exp, returns_BxN=jnp.asarray(probe_ret, jnp.float32),
                                values_old_BxN=exp.values_old_BxN + off)
    loss, lm = _rl_loss(sharp, probe, CFG, dataclasses.replace(pc, critic_only=True))
    np.testing.assert_allclose(float(lm["entropy"]), np.asarray(ent, np.float64)[m].mean(), rtol=1e-5)
    assert abs(np.asarray(ent)[m].mean() - np.asarray(ent).mean()) > 1e-3
    r_m, err = probe_ret[m], probe_ret[m] - np.asarray(now, np.float64)[m]
    want = 1.0 - np.var(err, ddof=1) / (np.var(r_m, ddof=1) + 1e-8)
    assert -1.0 < want < 0.99, want
    np.testing.assert_allclose(float(lm["explained_variance"]), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(loss), pc.vf_coef * float(lm["vf_loss"]), rtol=1e-6)
    # critic-only: no gradient reaches the policy, though value_grad_to_backbone is True (the value loss would train
    # the shared trunk, and its gradient would enter the global-norm clip of the head's update: third mutation review)
    g = jax.jit(jax.grad(lambda p: _rl_loss(p, probe, CFG, dataclasses.replace(pc, critic_only=True))[0]))(sharp)
    assert pc.value_grad_to_backbone and not any(np.any(np.asarray(x)) for x in jax.tree.leaves(g["policy"]))
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(g["value_head"]))
    # the config's value clip and loss aggregation reach both losses (clip_range_value and clip_eps were both 0.2 in
    # every step test, loss_agg always the default: third mutation review); NumPy on the update's own values/logps
    vn, vo = np.asarray(now, np.float64), np.asarray(probe.values_old_BxN, np.float64)
    rho = np.exp(np.asarray(logp_now, np.float64) - np.asarray(probe.logp_old_BxN, np.float64))
    a_t = np.asarray(probe.advantages_BxN, np.float64)

    def agg_np(per, how):
        if how == "token-mean":
            return per[m].mean()
        return np.mean([per[b][m[b]].mean() if m[b].any() else 0.0 for b in range(len(m))])

    for c, how in ((0.2, "seq-mean-token-mean"), (0.5, "token-mean")):
        _, lc = _rl_loss(sharp, probe, CFG, dataclasses.replace(pc, critic_only=True, clip_range_value=c, loss_agg=how))
        vc = np.clip(vn, vo - c, vo + c)
        want_vf = 0.5 * agg_np(np.maximum((vn - probe_ret) ** 2, (vc - probe_ret) ** 2), how)
        np.testing.assert_allclose(float(lc["vf_loss"]), want_vf, rtol=1e-5)
        want_pg = agg_np(np.maximum(-a_t * rho, -a_t * np.clip(rho, 0.8, 1.2)), how)
        np.testing.assert_allclose(float(lc["pg_loss"]), want_pg, rtol=1e-5, atol=1e-6)
    # clip_eps_high reaches PPO's policy loss too (only the GRPO path was checked; regression review): ratios of
    # exp(0.3) on every token, clipped at 1.2 or 1.28 wherever the (whitened) advantage is positive
    moved_ppo = dataclasses.replace(exp, logp_old_BxN=exp.logp_old_BxN - 0.3 * jnp.asarray(m, jnp.float32))
    sym, high, same = (float(_rl_loss(params, moved_ppo, CFG, dataclasses.replace(pc, clip_eps_high=h))[1]["pg_loss"])
                       for h in (None, 0.28, 0.2))
    assert high != pytest.approx(sym, abs=1e-4) and same == sym

    grpo = dataclasses.replace(pc, algo="grpo", group_size=4, kl_coef=0.04)
    r2 = rollout(params["policy"], prompts[:2], jnp.ones_like(prompts[:2]), jax.random.key(4), model_cfg=CFG,
                 cfg=SamplingConfig(max_new_tokens=6, eos_ids=(1,), n=4))  # GRPO's groups: 4 samples per prompt
    g_scores = np.array([1, 0, 0, 0.1, 1, 1, 0, 0.1], np.float32)
    exp2, gm = make_experience_fn(CFG, grpo)(params, ref, r2, jnp.zeros(8, jnp.int32), jnp.asarray(g_scores))
    assert "value_explained_variance" not in gm
    assert float(gm["frac_reward_zero_std"]) == 0.0
    np.testing.assert_allclose(float(gm["reward_std"]), np.std(g_scores, ddof=1), rtol=1e-5)
    same = np.array([0.1, 0.1, 0.1, 0.1, 1, 0, 1, 1], np.float32)  # the first group's samples scored alike: no signal
    assert float(make_experience_fn(CFG, grpo)(params, ref, r2, jnp.zeros(8, jnp.int32), jnp.asarray(same))[1][
        "frac_reward_zero_std"]) == 0.5
    # PPO sampling 4 completions per prompt without share_prompt: the same groups, given the rollout's n (the training
    # loop passes it; PPO logged none: session 37's Known limits); without it, no groups, as above
    ppo_n = make_experience_fn(CFG, pc, samples_per_prompt=4)(params, ref, r2, jnp.zeros(8, jnp.int32),
                                                              jnp.asarray(same))[1]
    assert float(ppo_n["frac_reward_zero_std"]) == 0.5 and "value_explained_variance" in ppo_n
    g = g_scores.reshape(2, 4).astype(np.float64)
    want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()
    m2 = np.asarray(exp2.mask_BxN) > 0
    np.testing.assert_allclose(np.asarray(exp2.advantages_BxN)[:, 0], want, rtol=1e-5, atol=1e-5)
    # first update: new == old
    d = np.asarray(exp2.logp_ref_BxN, np.float64) - np.asarray(exp2.logp_old_BxN, np.float64)
    k3 = np.where(m2, np.exp(d) - d - 1, 0.0)
    agg = np.mean(k3.sum(1) / np.maximum(m2.sum(1), 1))
    assert agg > 1e-4
    loss, lm = _rl_loss({"policy": params["policy"]}, exp2, CFG, grpo)
    np.testing.assert_allclose(float(loss), float(lm["pg_loss"]) + grpo.kl_coef * agg, rtol=1e-5, atol=1e-7)
    # token-mean (TRL "bnpo") reaches the GRPO loss too (every step test ran the default: third mutation review):
    # on-policy, -sum_b A_b n_b / N + beta * mean over all valid tokens of k3
    loss_t, _ = _rl_loss({"policy": params["policy"]}, exp2, CFG, dataclasses.replace(grpo, loss_agg="token-mean"))
    want_t = -np.sum(want * m2.sum(1)) / m2.sum() + grpo.kl_coef * k3[m2].mean()
    np.testing.assert_allclose(float(loss_t), want_t, rtol=1e-5, atol=1e-6)
    assert abs(want_t - float(loss)) > 1e-3
    # on-policy (ratio 1) the surrogate is -mean_b(A_b): each row's own advantage, also for the rows that stopped
    # before the last slot (whose slots past EOS hold 0); group advantages sum to 0 (second mutation review)
    assert m2.sum(1).min() < m2.shape[1] and float(lm["pg_loss"]) == pytest.approx(-np.mean(want), abs=1e-6)
    # kl_coef=0: the experience puts logp_old in the reference's place, so kl_k3 read KL(new || old) (non-zero after
    # the first update) under the name of the KL to the reference; it reads 0, as the docs say (review, session 30)
    loss0, lm0 = _rl_loss({"policy": params["policy"]}, exp2, CFG, dataclasses.replace(grpo, kl_coef=0.0))
    assert float(lm0["kl_k3"]) == 0.0 and float(loss0) == pytest.approx(float(lm0["pg_loss"]), rel=1e-6)
    # TRL's knobs, wired through the config: scale_rewards (Dr. GRPO's "none": the group mean removed only; "batch":
    # the batch's standard deviation) and clip_eps_high (DAPO's clip-higher, active once the ratio moves off 1)
    for scale, want in (("none", g - g.mean(1, keepdims=True)),
                        ("batch", (g - g.mean(1, keepdims=True)) / (g.std(ddof=1) + 1e-4))):
        e = make_experience_fn(CFG, dataclasses.replace(grpo, scale_rewards=scale))(
            params, ref, r2, jnp.zeros(8, jnp.int32), jnp.asarray(g_scores))[0]
        np.testing.assert_allclose(np.asarray(e.advantages_BxN)[:, 0], want.ravel(), rtol=1e-5, atol=1e-5)
    moved = dataclasses.replace(exp2, logp_old_BxN=exp2.logp_old_BxN - 0.3 * jnp.asarray(m2, jnp.float32))
    pol = {"policy": params["policy"]}
    sym, high = (float(_rl_loss(pol, moved, CFG, dataclasses.replace(grpo, clip_eps_high=h))[1]["pg_loss"])
                 for h in (None, 0.28))
    assert high != pytest.approx(sym, abs=1e-4)
    assert float(_rl_loss(pol, moved, CFG, dataclasses.replace(grpo, clip_eps_high=0.2))[1]["pg_loss"]) == sym
    with pytest.raises(ValueError, match="scale_rewards='none' is GRPO's advantage scaling; algo='rloo'"):
        dataclasses.replace(grpo, algo="rloo", scale_rewards="none")
    with pytest.raises(ValueError, match="clip_eps_high must be > 0"):
        dataclasses.replace(grpo, clip_eps_high=0.0)


def test_nonfinite_advantage_skips_every_ppo_update(tmp_path):
    pc = PPOConfig(minibatch_size=4, kl_coef=0.0, ppo_epochs=2)
    tx = make_optimizer(OptimConfig(learning_rate=3e-3, schedule="constant", warmup_ratio=0.0), 10)
    params = {"policy": jax.tree.map(jnp.asarray, _host_policy()),
              "value_head": init_value_head(CFG, jax.random.key(2))}
    state = init_state(params, tx, jax.random.key(3))
    prompts = jnp.full((8, 4), 3, jnp.int32)
    r = rollout(state.params["policy"], prompts, jnp.ones_like(prompts), jax.random.key(4), model_cfg=CFG,
                cfg=SamplingConfig(max_new_tokens=2, eos_ids=(1,)))
    exp, _ = make_experience_fn(CFG, pc)(state.params, params["policy"], r, jnp.zeros(8, jnp.int32),
                                         jnp.ones(8, jnp.float32))
    clean = exp
    exp = exp.replace(advantages_BxN=exp.advantages_BxN.at[:, 0].set(jnp.nan))  # every minibatch sees a NaN
    before = jax.tree.map(np.asarray, (state.params, state.opt_state, state.step))
    new, m = make_ppo_step(CFG, tx, pc)(state, exp)
    after = jax.tree.map(np.asarray, (new.params, new.opt_state, new.step))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert int(new.skipped) == int(m["skipped"]) == int(m["updates"]) == 4  # 2 epochs x 2 minibatches
    assert ppo_updates_per_step(pc, 8) == 4  # what the RL loop sizes its learning-rate schedule with
    # a non-finite gradient under a finite loss (a bf16 overflow) is skipped too: nothing else tests that half
    from reftjax.steps import _apply_update

    inf = jax.tree.map(jnp.zeros_like, new.params)  # (`state` was donated to the step)
    inf["value_head"] = jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), inf["value_head"])
    kept, um = _apply_update(new, inf, tx, jnp.float32(1.0))
    assert int(um["skipped"]) == 1 and int(kept.step) == int(after[2])
    # a non-finite loss under finite gradients (an overflow where the gradient is 0) is skipped too
    kept, um = _apply_update(new, jax.tree.map(jnp.zeros_like, new.params), tx, jnp.float32(jnp.nan))
    assert int(um["skipped"]) == 1 and int(kept.step) == int(after[2])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after[0]), jax.tree.leaves(kept.params)))
    ck = Checkpointer(CheckpointConfig(str(tmp_path)))  # the params stayed finite: it may be saved
    assert ck.save(1, new)
    nan_state = new.replace(params=jax.tree.map(lambda x: x * jnp.nan, new.params))  # what an unguarded update gives
    assert not ck.save(2, nan_state)
    ck.close()
    assert ck.all_steps() == [1]
    # one row's NaN: the minibatches holding it are skipped, the others applied, and the figures are the applied
    # ones' means (one skipped minibatch made every mean NaN, logged as null)
    one = clean.replace(advantages_BxN=clean.advantages_BxN.at[0, 0].set(jnp.nan))
    fresh = init_state({"policy": jax.tree.map(jnp.asarray, _host_policy()),
                        "value_head": init_value_head(CFG, jax.random.key(2))}, tx, jax.random.key(3))
    _, m = make_ppo_step(CFG, tx, pc)(fresh, one)
    assert int(m["skipped"]) == 2 and int(m["updates"]) == 4  # row 0 is in one minibatch per epoch
    for key in ("loss", "pg_loss", "vf_loss", "entropy", "clipfrac", "grad_norm"):
        assert np.isfinite(float(m[key])), key
    # means over the 2 applied minibatches, not over all 4: the ratio is 1 in the first epoch and near it in the second
    assert float(m["ratio_mean"]) == pytest.approx(1.0, abs=0.05)
    assert np.isnan(float(make_ppo_step(CFG, tx, pc)(new, exp)[1]["loss"]))  # all skipped: still says so


# ----------------------------------------------------------------------------- SFT


def _sft_batch(rows=8, seq=12, seed=0):
    tok = np.random.RandomState(seed).randint(2, 32, (rows, seq)).astype(np.int32)
    loss_mask = np.ones_like(tok)
    loss_mask[:, :4] = 0  # prompt tokens are not trained on
    loss_mask[::3, -3:] = 0
    return {"tokens": tok, "attn_mask": np.ones_like(tok), "loss_mask": loss_mask}


def _sft_state(tx, mesh=None):
    return init_state({"policy": sharding.place_params(_host_policy(), CFG, mesh)}, tx, jax.random.key(1))


SFT_TX = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0), 10)


def test_sft_grad_accumulation_matches_full_batch():
    # Adam's first update is ~lr*sign(g) for |g| >> eps, which turns float noise in near-zero
    # gradients into lr-sized differences; a larger eps keeps the update proportional to g there.
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0, eps=1e-4), 10)
    batch = jax.tree.map(jnp.asarray, _sft_batch())
    out = []
    for accum in (1, 2):
        st, m = make_sft_step(CFG, tx, accum_steps=accum)(_sft_state(tx), batch)
        out.append((st.params, float(m["loss"]), float(m["grad_norm"]), float(m["token_accuracy"])))
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_allclose(out[0][1:], out[1][1:], rtol=1e-5)
    assert out[0][3] > 0  # (the accuracy of 2 micro-batches is their summed correct count over all tokens)


def test_sft_loss_decreases_and_compiles_once_with_donation():
    step = make_sft_step(CFG, SFT_TX)
    batch = jax.tree.map(jnp.asarray, _sft_batch())
    st, losses = _sft_state(SFT_TX), []
    for _ in range(8):
        old = st
        st, m = step(st, batch)
        losses.append(float(m["loss"]))
        assert old.params["policy"]["lm_head"]["kernel"].is_deleted()  # the donated buffers were reused
    assert step._cache_size() == 1
    assert losses[-1] < 0.6 * losses[0] and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert int(st.step) == 8 and int(st.skipped) == 0


def test_the_steps_call_no_deprecated_optax_api():
    # optax 0.2.8 deprecates optax.global_norm (the update's grad norm used it); a deprecated call is one that a
    # later optax removes, breaking every step of a fresh install. A fresh step traces its update here.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=DeprecationWarning, module="optax")
        make_sft_step(CFG, SFT_TX)(_sft_state(SFT_TX), jax.tree.map(jnp.asarray, _sft_batch()))


def test_numpy_unplaced_and_placed_batches_share_one_program():
    """One program whether the batch comes as NumPy, as jnp arrays JAX may still move, or placed on the device (JAX
    keys its cache on commitment: a placed batch after a NumPy one compiled the step again)."""
    step = make_sft_step(CFG, SFT_TX)
    st = _sft_state(SFT_TX)
    for put in (np.asarray, jnp.asarray, lambda a: jax.device_put(a, jax.devices()[0])):
        st, _ = step(st, jax.tree.map(put, _sft_batch()))
    assert step._cache_size() == 1 and int(st.step) == 3


def test_params_donated_by_a_step_are_refused_by_name_when_used_again():
    """README's example built a state from `model.params` and then used them again: after the first step the
    buffers were donated, and a rollout on them ran a compiled program on freed memory (INVALID_ARGUMENT on one
    device, a segfault on an 8-device mesh; library-user review, session 28). Now a ValueError names the array."""
    params = sharding.place_params(_host_policy(), CFG)
    prompts = jnp.full((2, 3), 3, jnp.int32)
    scfg = SamplingConfig(max_new_tokens=2, eos_ids=(1,), pad_id=0)
    rollout(params, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG, cfg=scfg)  # compiled
    step = make_sft_step(CFG, SFT_TX)
    state, _ = step(init_state({"policy": params}, SFT_TX, jax.random.key(1)), _sft_batch())
    with pytest.raises(ValueError, match=r"^rollout: \d+ argument array\(s\) were deleted, e\.g\. params\['\w+'\]"
                                         r".*donated to an earlier step.*jax\.tree\.map\(jnp\.copy, params\)"):
        rollout(params, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG, cfg=scfg)
    old = state
    state, _ = step(state, _sft_batch())
    with pytest.raises(ValueError, match=r"sft_step: .* were deleted, e\.g\. state\.\w+"):  # (by name: session 34)
        step(old, _sft_batch())
    assert int(state.step) == 2


def test_numpy_params_are_committed_so_the_second_step_does_not_compile_again():
    """init_state committed only jax.Array leaves: NumPy params gave uncommitted state leaves, the first step
    returned committed ones and every program compiled a second time (library-user review, session 28)."""
    step = make_sft_step(CFG, SFT_TX)
    state = init_state({"policy": _host_policy()}, SFT_TX, jax.random.key(1))
    assert all(x.committed for x in jax.tree.leaves(state))
    for _ in range(3):
        state, _ = step(state, _sft_batch())
    assert step._cache_size() == 1
    # on JAX's default device, with the counters and optimizer state: device 0 clashed with them (regression review)
    if jax.device_count() > 1:
        with jax.default_device(jax.devices()[3]):
            state = init_state({"policy": _host_policy()}, SFT_TX, jax.random.key(1))
            state, _ = step(state, _sft_batch())
        assert {d.id for x in jax.tree.leaves(state) for d in x.devices()} == {3}


def test_shard_batch_names_rows_that_do_not_split_over_the_mesh():
    mesh = _mesh()
    with pytest.raises(ValueError, match=r"shard_batch: 6 rows do not split over the mesh's data x fsdp = 8 devices"):
        sharding.shard_batch(_sft_batch(rows=6), mesh)
    placed = sharding.shard_batch(_sft_batch(rows=16), mesh)
    assert placed["tokens"].sharding.spec == sharding.batch_spec(2)


def test_sft_huge_lr_nonfinite_loss_is_skipped():
    tx = make_optimizer(OptimConfig(learning_rate=1e36, schedule="constant", warmup_ratio=0.0, grad_clip=1e30), 10)
    step = make_sft_step(CFG, tx)
    batch = jax.tree.map(jnp.asarray, _sft_batch())
    st, _ = step(_sft_state(tx), batch)  # params ~1e36: the next forward overflows
    before = jax.tree.map(np.asarray, (st.params, st.opt_state))
    st, m = step(st, batch)
    assert not np.isfinite(float(m["loss"])) and int(m["skipped"]) == 1 and int(st.skipped) == 1
    assert int(st.step) == 1
    after = jax.tree.map(np.asarray, (st.params, st.opt_state))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_sft_sharded_matches_single_device():
    # eps 1e-4 for the reason given in test_sft_grad_accumulation_matches_full_batch: with eps 1e-8, Adam
    # turns reduction-order noise in a near-zero gradient into an lr-sized step (seen: 1 of 1024 embedding
    # entries 2e-5 apart after the attention dots changed layout).
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0, eps=1e-4), 10)
    mesh = _mesh()
    host = _sft_batch(rows=8)
    out = []
    for m in (None, mesh):
        step = make_sft_step(CFG, tx, accum_steps=2)
        st = _sft_state(tx, m)
        batch = jax.tree.map(jnp.asarray, host) if m is None else sharding.shard_batch(host, m)
        for _ in range(3):
            st, metrics = step(st, batch)
        out.append((jax.tree.map(np.asarray, st.params), float(metrics["loss"])))
    emb = st.params["policy"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec != jax.sharding.PartitionSpec()  # really sharded
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5)


def test_sft_fused_head_matches_full_logits_on_one_and_8_devices():
    """sft_step's fused chunked head + cross-entropy (6 chunks here) trains like full logits + sft_loss,
    on one device and with the batch and params sharded over 8 devices."""
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0, eps=1e-4), 10)
    host = _sft_batch(rows=8)
    out = {}
    for mesh in (None, _mesh()):
        for rows in (0, 8):
            step = make_sft_step(CFG, tx, head_chunk_rows=rows)
            st = _sft_state(tx, mesh)
            batch = jax.tree.map(jnp.asarray, host) if mesh is None else sharding.shard_batch(host, mesh)
            metrics = []
            for _ in range(3):
                st, m = step(st, batch)
                metrics.append([float(m[k]) for k in ("loss", "token_accuracy", "grad_norm")])
            out[(mesh is None, rows)] = (jax.tree.map(np.asarray, st.params), np.array(metrics))
    ref_params, ref_metrics = out[(True, 0)]
    assert ref_metrics[-1, 0] < ref_metrics[0, 0]
    for key, (params, metrics) in out.items():
        np.testing.assert_allclose(metrics, ref_metrics, rtol=1e-5, err_msg=str(key))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=str(key))


def test_state_lives_on_the_mesh_and_steps_after_a_restore(tmp_path):
    """Every TrainState leaf (step, skipped and rng too) is placed on the params' mesh, so a state restored
    from a checkpoint (Orbax commits each leaf to its recorded sharding) still runs: a step counter left
    on one device made the first step after a resume fail on any multi-device run."""
    from reftjax.checkpoint import abstract_like

    mesh = _mesh()
    st = _sft_state(SFT_TX, mesh)
    for path, leaf in jax.tree_util.tree_flatten_with_path(st)[0]:
        assert isinstance(leaf.sharding, jax.sharding.NamedSharding) and leaf.sharding.mesh == mesh, \
            jax.tree_util.keystr(path)
    ck = Checkpointer(CheckpointConfig(str(tmp_path)))
    ck.save(1, st)
    restored, _, _ = ck.restore_latest(abstract_like(st))
    ck.close()
    step = make_sft_step(CFG, SFT_TX)
    batch = sharding.shard_batch(_sft_batch(rows=8), mesh)
    a, ma = step(restored, batch)
    b, mb = step(st, batch)
    assert int(a.step) == 1 and float(ma["loss"]) == float(mb["loss"])


@pytest.mark.parametrize("to_backbone", [True, False])
def test_value_gradient_reaches_backbone_only_when_asked(to_backbone):
    """PPOConfig.value_grad_to_backbone=False: the value head still learns, the shared backbone gets nothing."""
    from reftjax.steps import policy_outputs

    params = {"policy": jax.tree.map(jnp.asarray, _host_policy()),
              "value_head": init_value_head(CFG, jax.random.key(2))}
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 32, (2, 6)), jnp.int32)

    def value_sum(p):
        _, values, _ = policy_outputs(p, CFG, tokens, jnp.ones_like(tokens), 3, True,
                                      value_grad_to_backbone=to_backbone)
        return jnp.sum(values ** 2)

    g = jax.grad(value_sum)(params)
    backbone = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g["policy"]))
    head = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g["value_head"]))
    assert head > 0
    assert (backbone > 0) == to_backbone, backbone


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_zero_kl_coef_skips_reference_forward_and_changes_nothing_else(algo):
    """kl_coef=0: the reference is never read (ref params may be garbage) and the experience equals the one
    computed with a real reference forward whose KL term is multiplied by 0."""
    from reftjax.steps import make_experience

    group = 2 if algo == "grpo" else 1
    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    other = jax.tree.map(jnp.asarray, _host_policy(1))
    params = {"policy": policy}
    if algo == "ppo":
        params["value_head"] = init_value_head(CFG, jax.random.key(2))
    prompts = jnp.full((4, 3), 3, jnp.int32)
    r = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG,
                cfg=SamplingConfig(max_new_tokens=4, eos_ids=(1,), pad_id=0, n=group))
    scores = jnp.arange(4 * group, dtype=jnp.float32) % 2
    cfg0 = PPOConfig(algo=algo, kl_coef=0.0, group_size=max(group, 2) if algo == "grpo" else 1)
    garbage = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), other)
    skipped = make_experience(params, garbage, r, scores, model_cfg=CFG, cfg=cfg0)
    assert np.all(np.isfinite(np.asarray(skipped.advantages_BxN)))
    np.testing.assert_array_equal(skipped.logp_ref_BxN, skipped.logp_old_BxN)
    # the same batch with a real (different) reference: everything but logp_ref is identical at kl_coef 0
    real = make_experience(params, other, r, scores, model_cfg=CFG,
                           cfg=PPOConfig(algo=algo, kl_coef=1e-30, group_size=cfg0.group_size))
    assert float(jnp.max(jnp.abs(real.logp_ref_BxN - real.logp_old_BxN))) > 1e-3  # the reference did differ
    for name in ("logp_old_BxN", "values_old_BxN", "advantages_BxN", "returns_BxN"):
        np.testing.assert_allclose(getattr(skipped, name), getattr(real, name), rtol=1e-5, atol=1e-6, err_msg=name)


def test_value_head_lr_scale_scales_only_the_critic_update():
    """OptimConfig.value_head_lr_scale=k: the value head moves k times as far as with 1.0 (AdamW, NumPy-checkable
    first step: |update| = lr * k per weight for a nonzero gradient), the policy exactly as far; 1.0 keeps the
    plain two-part optimizer state (old checkpoints stay loadable)."""
    params = {"policy": {"w": jnp.ones((3,))}, "value_head": {"summary": {"kernel": jnp.ones((2, 1))}},
              "critic": {"w": jnp.ones((2,))}}  # a separate critic trunk (PPOConfig.critic="separate")
    grads = {"policy": {"w": jnp.array([0.1, -0.2, 0.3])},
             "value_head": {"summary": {"kernel": jnp.array([[0.5], [-1e-3]])}},
             "critic": {"w": jnp.array([0.2, -0.4])}}
    out = {}
    for scale in (1.0, 7.0):
        tx = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0,
                                        value_head_lr_scale=scale, grad_clip=1e9), 1)
        state = tx.init(params)
        assert len(state) == (2 if scale == 1.0 else 3)
        out[scale], _ = tx.update(grads, state, params)
    # first Adam step: m/sqrt(v) = sign(g) (eps aside), so the update is -lr * sign(g)
    np.testing.assert_allclose(out[1.0]["policy"]["w"], -1e-2 * np.sign([0.1, -0.2, 0.3]), rtol=1e-4)
    np.testing.assert_allclose(out[7.0]["policy"]["w"], out[1.0]["policy"]["w"], rtol=0, atol=0)
    np.testing.assert_allclose(out[7.0]["value_head"]["summary"]["kernel"],
                               7.0 * np.asarray(out[1.0]["value_head"]["summary"]["kernel"]), rtol=1e-6)
    np.testing.assert_allclose(out[1.0]["value_head"]["summary"]["kernel"], [[-1e-2], [1e-2]], rtol=1e-3)
    # the separate trunk is the critic's too: it trained at the policy's lr while its head had the critic's
    np.testing.assert_allclose(out[7.0]["critic"]["w"], 7.0 * np.asarray(out[1.0]["critic"]["w"]), rtol=1e-6)
    np.testing.assert_allclose(out[1.0]["critic"]["w"], [-1e-2, 1e-2], rtol=1e-3)
    with pytest.raises(ValueError, match="value_head_lr_scale"):
        OptimConfig(value_head_lr_scale=0.0)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_experience_from_rollout_matches_the_recomputed_one_without_the_policy_forward(algo):
    """PPOConfig.experience_from_rollout: logp_old (and PPO's old values, returned by rollout(value_head=...)) come
    from the decode path; the experience equals the one from a teacher-forced forward within 1e-4, and the program
    has one forward fewer (counted as dot_general ops in the jaxpr)."""
    from reftjax.steps import make_experience

    group = 2 if algo == "grpo" else 1
    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    ref = jax.tree.map(jnp.asarray, _host_policy(1))
    params = {"policy": policy}
    vh = None
    if algo == "ppo":
        vh = jax.tree.map(lambda x: x * 20.0, init_value_head(CFG, jax.random.key(2)))  # values of order 1
        params["value_head"] = vh
    prompts = jnp.asarray(np.random.default_rng(0).integers(2, 32, (4, 5)), jnp.int32)
    pmask = jnp.ones_like(prompts).at[0, :2].set(0)  # one left-padded row
    scfg = SamplingConfig(max_new_tokens=6, eos_ids=(1,), pad_id=0, n=group)
    r = rollout(policy, prompts, pmask, jax.random.key(0), model_cfg=CFG, cfg=scfg, value_head=vh)
    plain = rollout(policy, prompts, pmask, jax.random.key(0), model_cfg=CFG, cfg=scfg)
    np.testing.assert_array_equal(r.tokens_BxN, plain.tokens_BxN)  # the critic does not change sampling
    np.testing.assert_array_equal(r.logprobs_BxN, plain.logprobs_BxN)
    assert plain.values_BxN is None and (r.values_BxN is None) == (algo != "ppo")
    scores = jnp.arange(4 * group, dtype=jnp.float32) % 2
    base = PPOConfig(algo=algo, group_size=max(group, 2) if algo == "grpo" else 1)
    fast = dataclasses.replace(base, experience_from_rollout=True)
    want = make_experience(params, ref, r, scores, model_cfg=CFG, cfg=base)
    got = make_experience(params, ref, r, scores, model_cfg=CFG, cfg=fast)
    keep = np.asarray(r.mask_BxN) > 0  # after the stop the losses never read either (rollout writes 0 there)
    assert 0 < keep.sum() < keep.size
    for name in ("logp_old_BxN", "logp_ref_BxN", "values_old_BxN", "advantages_BxN", "returns_BxN"):
        np.testing.assert_allclose(np.where(keep, getattr(got, name), 0), np.where(keep, getattr(want, name), 0),
                                   rtol=1e-4, atol=1e-4, err_msg=name)
    if algo == "ppo":
        assert float(jnp.max(jnp.abs(want.values_old_BxN))) > 0.1  # the values compared are not all ~0

    def dots(cfg):
        jaxpr = jax.make_jaxpr(lambda p: make_experience(p, ref, r, scores, model_cfg=CFG, cfg=cfg))(params)
        return str(jaxpr).count("dot_general")

    assert dots(fast) < dots(base)
    if algo == "ppo":
        with pytest.raises(ValueError, match="value_head"):
            make_experience(params, ref, plain, scores, model_cfg=CFG, cfg=fast)


def test_rl_config_rejects_experience_from_rollout_with_a_modified_sampler():
    from reftjax.config import RLConfig

    fast = PPOConfig(experience_from_rollout=True)
    RLConfig(ppo=fast, sampling=SamplingConfig(max_new_tokens=8, temperature=1.0))
    RLConfig(ppo=dataclasses.replace(fast, temperature=0.7), sampling=SamplingConfig(max_new_tokens=8, temperature=0.7))
    for bad in (dict(top_k=5), dict(top_p=0.9)):
        with pytest.raises(ValueError, match="experience_from_rollout"):
            RLConfig(ppo=fast, sampling=SamplingConfig(max_new_tokens=8, **bad))
    with pytest.raises(ValueError, match="greedy"):
        RLConfig(sampling=SamplingConfig(max_new_tokens=8, greedy=True))
    with pytest.raises(ValueError, match="ppo.temperature"):  # the update would score another distribution
        RLConfig(sampling=SamplingConfig(max_new_tokens=8, temperature=0.7))


def test_bf16_log_probs_at_a_temperature_are_those_of_the_float32_logits_over_t():
    """The rollout samples from float32 logits / T. The update divided the bf16 hidden states by T instead, which
    rounds them: at T 0.6 its log-probs were up to 0.1 away from the sampling distribution's (helper review). Both
    head paths now scale the float32 logits."""
    from reftjax.models.llama import lm_logits

    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                      num_kv_heads=2, eos_token_ids=(1,), tie_word_embeddings=False, dtype="bfloat16",
                      param_dtype="float32")
    p = init_params(cfg, jax.random.key(0))
    p["lm_head"]["kernel"] = p["lm_head"]["kernel"] * 15.0  # peaked logits, as a trained model's
    toks = jnp.asarray(np.random.default_rng(0).integers(2, 512, (2, 24)), jnp.int32)
    n = 16
    h = completion_hidden(p, cfg, toks, jnp.ones_like(toks), n)
    assert h.dtype == jnp.bfloat16
    for temp in (0.6, 1.3):
        exact = jax.nn.log_softmax(lm_logits(p, cfg, h).astype(jnp.float32) / temp, axis=-1)
        exact = jnp.take_along_axis(exact, toks[:, -n:, None], -1)[..., 0]
        for rows in (0, 8):
            logp, _, _ = policy_outputs({"policy": p}, cfg, toks, jnp.ones_like(toks), n, False,
                                        head_chunk_rows=rows, temperature=temp)
            np.testing.assert_allclose(logp, exact, atol=1e-4, err_msg=f"T {temp}, head_chunk_rows {rows}")


def test_rl_log_probs_are_those_of_the_sampling_temperature():
    """With temperature T the rollout samples from softmax(logits / T): the experience's logp_old (and the update's
    log-probs, same function) must be those of that distribution, equal to the decode path's within 1e-4. Before,
    they were taken at T = 1 while the samples came from T, an uncorrected off-policy update."""
    from reftjax.steps import make_experience

    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    prompts = jnp.asarray(np.random.default_rng(0).integers(2, 32, (2, 5)), jnp.int32)
    scfg = SamplingConfig(max_new_tokens=6, eos_ids=(1,), pad_id=0, temperature=0.5, n=2)
    r = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG, cfg=scfg)
    keep = np.asarray(r.mask_BxN) > 0
    for head_chunk_rows in (0, 8):
        cfg = PPOConfig(algo="grpo", group_size=2, temperature=0.5, kl_coef=0.0, head_chunk_rows=head_chunk_rows)
        exp = make_experience({"policy": policy}, policy, r, jnp.zeros(4), model_cfg=CFG, cfg=cfg)
        np.testing.assert_allclose(np.asarray(exp.logp_old_BxN)[keep], np.asarray(r.logprobs_BxN)[keep], atol=1e-4)
        # (the rollout's own settings would refuse T = 1: here as a hand-built rollout, to show what it guards)
        at_one = make_experience({"policy": policy}, policy, r.replace(sampling=None), jnp.zeros(4), model_cfg=CFG,
                                 cfg=dataclasses.replace(cfg, temperature=1.0))
        assert np.abs(np.asarray(at_one.logp_old_BxN) - np.asarray(r.logprobs_BxN))[keep].max() > 0.05


def test_critic_only_step_moves_the_value_head_and_not_the_policy():
    """PPOConfig.critic_only (critic warm-up): the policy stays bitwise identical even with the value gradient
    allowed into the backbone; the value head moves and its loss falls over repeated steps on one batch."""
    from reftjax.steps import make_experience

    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    params = {"policy": policy, "value_head": init_value_head(CFG, jax.random.key(2))}
    prompts = jnp.full((8, 3), 3, jnp.int32)
    r = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG,
                cfg=SamplingConfig(max_new_tokens=4, eos_ids=(1,), pad_id=0))
    cfg = PPOConfig(critic_only=True, value_grad_to_backbone=True, minibatch_size=4, kl_coef=0.0)
    exp = make_experience(params, policy, r, jnp.arange(8, dtype=jnp.float32) % 2, model_cfg=CFG, cfg=cfg)
    ocfg = OptimConfig(learning_rate=1e-2, schedule="linear", warmup_ratio=0.5, weight_decay=0.1)
    tx = make_optimizer(ocfg, 20, separate_critic_state=True)
    state = init_state(jax.tree.map(jnp.copy, params), tx, jax.random.key(3))
    opt0 = jax.tree.map(np.asarray, state.opt_state)
    step = make_ppo_step(CFG, tx, cfg)
    losses_seen = []
    for _ in range(5):
        state, m = step(state, exp)
        losses_seen.append(float(m["vf_loss"]))
    for a, b in zip(jax.tree.leaves(state.params["policy"]), jax.tree.leaves(policy)):
        np.testing.assert_array_equal(a, b)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(state.params["value_head"]), jax.tree.leaves(params["value_head"])))
    assert moved > 1e-3 and losses_seen[-1] < losses_seen[0]
    # the policy's AdamW state (moments, step count, schedule position) is exactly the initial one;
    # the critic's advanced once per update: 5 steps x 2 epochs x 2 minibatches
    inner0, inner = opt0[1].inner_states, state.opt_state[1].inner_states
    for a, b in zip(jax.tree.leaves(inner["policy"]), jax.tree.leaves(inner0["policy"])):
        np.testing.assert_array_equal(a, b)
    counts = [int(x) for x in jax.tree.leaves(inner["critic"]) if np.ndim(x) == 0]
    assert counts and all(c == 5 * 2 * 2 for c in counts), counts
    with pytest.raises(ValueError, match="separate_critic_state"):  # one shared AdamW state: refused
        tx1 = make_optimizer(ocfg, 20)
        make_ppo_step(CFG, tx1, cfg)(init_state(jax.tree.map(jnp.copy, params), tx1, jax.random.key(3)), exp)
    with pytest.raises(ValueError, match="critic_only"):
        PPOConfig(algo="grpo", group_size=2, critic_only=True)


def test_policy_update_after_critic_warmup_is_adams_first_step():
    """After critic-only steps the policy's first update equals a fresh optimizer's first update (same
    gradient, bias correction of step 1); a shared step count would scale it by ~3 (m/sqrt(v) with
    count >> 1 and one gradient in the moments: (1-b1)/sqrt(1-b2) = 3.16)."""
    from reftjax.steps import make_experience

    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    params = {"policy": policy, "value_head": init_value_head(CFG, jax.random.key(2))}
    prompts = jnp.full((8, 3), 3, jnp.int32)
    r = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG,
                cfg=SamplingConfig(max_new_tokens=4, eos_ids=(1,), pad_id=0))
    # one minibatch, one epoch, no value gradient into the trunk: the policy gradient does not depend on
    # the (warmed-up) value head or on the minibatch order
    base = dict(value_grad_to_backbone=False, minibatch_size=8, ppo_epochs=1, kl_coef=0.0)
    cfg, warm_cfg = PPOConfig(**base), PPOConfig(critic_only=True, **base)
    exp = make_experience(params, policy, r, jnp.arange(8, dtype=jnp.float32) % 2, model_cfg=CFG, cfg=cfg)
    tx = make_optimizer(OptimConfig(learning_rate=1e-3, schedule="constant", warmup_ratio=0.0), 1,
                        separate_critic_state=True)
    fresh = make_ppo_step(CFG, tx, cfg)(init_state(jax.tree.map(jnp.copy, params), tx, jax.random.key(3)), exp)[0]
    state = init_state(jax.tree.map(jnp.copy, params), tx, jax.random.key(3))
    warm = make_ppo_step(CFG, tx, warm_cfg)
    for _ in range(4):
        state, _ = warm(state, exp)
    after = make_ppo_step(CFG, tx, cfg)(state, exp)[0]
    step_fresh = jax.tree.map(lambda a, b: a - b, fresh.params["policy"], policy)
    step_after = jax.tree.map(lambda a, b: a - b, after.params["policy"], policy)
    biggest = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(step_fresh))
    assert biggest > 5e-4  # an Adam first step moves each weight by ~lr
    # equal up to the minibatch row order (float summation) and Adam's g / (|g| + eps) on tiny gradients
    for a, b in zip(jax.tree.leaves(step_after), jax.tree.leaves(step_fresh)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    size = lambda t: sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(t))  # noqa: E731
    assert 0.97 < size(step_after) / size(step_fresh) < 1.03


def test_separate_critic_starts_as_the_shared_one_and_only_the_value_loss_trains_it():
    """PPOConfig.critic="separate": init_rl_params copies the policy into params["critic"], so the first experience
    equals the shared-critic one; afterwards the policy loss reaches only the policy and the value loss only the
    critic trunk + value head (checked by zeroing each loss's signal in turn)."""
    from reftjax.steps import _rl_loss, make_experience

    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    sep_cfg = PPOConfig(critic="separate", kl_coef=0.05, minibatch_size=8)
    shared_cfg = dataclasses.replace(sep_cfg, critic="shared")
    sep = init_rl_params(policy, CFG, sep_cfg, jax.random.key(2))
    shared = init_rl_params(policy, CFG, shared_cfg, jax.random.key(2))
    assert set(sep) == {"policy", "value_head", "critic"} and set(shared) == {"policy", "value_head"}
    trunk = {k: v for k, v in policy.items() if k != "lm_head"}  # (CFG is untied: the critic needs no head)
    for a, b in zip(jax.tree.leaves(sep["critic"]), jax.tree.leaves(trunk), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a is not b  # a copy: donating the state cannot alias the policy's buffers
    sep["value_head"] = shared["value_head"] = jax.tree.map(lambda x: x * 20.0, shared["value_head"])
    prompts = jnp.asarray(np.random.default_rng(0).integers(2, 32, (8, 4)), jnp.int32)
    r = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG,
                cfg=SamplingConfig(max_new_tokens=5, eos_ids=(1,), pad_id=0))
    scores = jnp.arange(8, dtype=jnp.float32) % 2
    ref = jax.tree.map(jnp.asarray, _host_policy(1))
    # jitted, as the loop runs it (eagerly, this test's scans compiled one by one; session 57 row 5)
    experience = jax.jit(functools.partial(make_experience, model_cfg=CFG), static_argnames="cfg")
    exp = experience(sep, ref, r, scores, cfg=sep_cfg)
    want = experience(shared, ref, r, scores, cfg=shared_cfg)
    for name in ("logp_old_BxN", "values_old_BxN", "advantages_BxN", "returns_BxN"):
        np.testing.assert_allclose(getattr(exp, name), getattr(want, name), rtol=1e-6, atol=1e-6, err_msg=name)
    assert float(jnp.max(jnp.abs(exp.values_old_BxN))) > 0.1

    grad = jax.jit(jax.grad(lambda p, mb: _rl_loss(p, mb, CFG, sep_cfg)[0]))

    def grads(mb):
        return grad(sep, mb)

    def biggest(tree):
        return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))

    no_adv = grads(exp.replace(advantages_BxN=jnp.zeros_like(exp.advantages_BxN)))  # value loss only
    assert biggest(no_adv["policy"]) == 0.0
    assert biggest(no_adv["critic"]) > 0 and biggest(no_adv["value_head"]) > 0
    # values already equal the returns (up to the recomputation's float noise): the policy loss alone
    no_vf = grads(exp.replace(returns_BxN=exp.values_old_BxN))
    assert biggest(no_vf["policy"]) > 0
    for part in ("critic", "value_head"):
        assert biggest(no_vf[part]) < 1e-4 * biggest(no_adv[part]), part


def test_a_separate_critic_drops_the_untied_head_and_runs_begun_with_it_resume_bitwise(tmp_path, caplog):
    """The critic trunk used to copy the policy's untied lm_head, which it never reads: ~0.5B parameters plus AdamW
    moments at 7-8B for nothing (helper review, session 40). init_rl_params now leaves it out, and a checkpoint
    written with it (the old layout) restores without it: training on from there gives, bitwise, what the old
    layout gives (the dead head's zero gradient adds nothing to the critic's clipping norm)."""
    from reftjax.steps import make_experience, ppo_step

    cfg_m = CFG  # untied: its lm_head is the one left out
    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    cfg = PPOConfig(critic="separate", kl_coef=0.05, minibatch_size=4)
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, grad_clip=0.05, schedule="constant", warmup_ratio=0.0), 10)
    new = init_rl_params(jax.tree.map(jnp.copy, policy), cfg_m, cfg, jax.random.key(2))
    assert "lm_head" in new["policy"] and set(new["critic"]) == set(policy) - {"lm_head"}
    old = {**new, "critic": {**new["critic"], "lm_head": jax.tree.map(jnp.copy, policy["lm_head"])}}
    prompts = jnp.asarray(np.random.default_rng(0).integers(2, 32, (8, 4)), jnp.int32)
    ref = jax.tree.map(jnp.asarray, init_params(cfg_m, jax.random.key(1)))

    def step(state, i):
        r = rollout(state.params["policy"], prompts, jnp.ones_like(prompts), jax.random.key(i), model_cfg=cfg_m,
                    cfg=SamplingConfig(max_new_tokens=5, eos_ids=(1,), pad_id=0))
        exp = make_experience(state.params, ref, r, jnp.arange(8, dtype=jnp.float32) % 3 / 2, model_cfg=cfg_m,
                              cfg=cfg)
        return ppo_step(state, exp, model_cfg=cfg_m, tx=tx, cfg=cfg)[0]

    state = step(init_state(old, tx, jax.random.key(3)), 0)
    with Checkpointer(CheckpointConfig(str(tmp_path))) as ck:
        ck.save(1, state)
    abstract = init_state(jax.eval_shape(lambda: new), tx, jax.random.key(3), abstract=True)
    with Checkpointer(CheckpointConfig(str(tmp_path))) as ck, caplog.at_level("INFO", "reftjax.checkpoint"):
        resumed, _, at = ck.restore_latest(abstract)
    assert at == 1 and "holds 3 leaves this version no longer keeps (params/critic/lm_head/kernel, ...)" in caplog.text
    assert jax.tree.structure(resumed) == jax.tree.structure(abstract)
    want = jax.device_get(step(state, 1))
    got = jax.device_get(step(resumed, 1))
    drop = lambda t: {**t, "critic": {k: v for k, v in t["critic"].items() if k != "lm_head"}}  # noqa: E731
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(drop(want.params)), strict=True):
        np.testing.assert_array_equal(a, b)
    def moments(t):  # every optimizer leaf but the dead head's (by path: CFG's embedding has the head's shape)
        leaves = jax.tree_util.tree_flatten_with_path(t)[0]
        return [x for p, x in leaves if "['critic']['lm_head']" not in jax.tree_util.keystr(p)]

    want_moments, got_moments = moments(want.opt_state), moments(got.opt_state)
    assert len(want_moments) == len(got_moments) == len(jax.tree.leaves(got.opt_state)) > 2 * len(jax.tree.leaves(new))
    for a, b in zip(got_moments, want_moments, strict=True):
        np.testing.assert_array_equal(a, b)


def test_ppo_minibatches_are_a_fresh_permutation_each_epoch():
    """`ppo_step` draws each epoch's row order from the state's key (`jax.random.split(state.rng, epochs + 1)[1:]`,
    one permutation per epoch): the same step run minibatch by minibatch in that order, each minibatch a one-update
    `ppo_step` of its rows, gives the same policy. Every epoch in row order (a mutant) passed the suite, whose PyTorch
    parity test tries all splits (mutation review, session 44); it lands measurably apart from the reference. The
    step and the one-update steps are other programs, so they agree to rounding: 4e-6 under the suite's XLA:CPU
    emitters (tests/conftest.py), the in-order mutant 0.4 away."""
    from reftjax.steps import make_experience, ppo_step

    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    prompts = jnp.asarray(np.random.default_rng(1).integers(2, 32, (8, 4)), jnp.int32)
    r = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG,
                cfg=SamplingConfig(max_new_tokens=5, eos_ids=(1,), pad_id=0))
    scores, ref = jnp.arange(8, dtype=jnp.float32) % 3 / 2, jax.tree.map(jnp.asarray, _host_policy(1))
    tx = make_optimizer(OptimConfig(learning_rate=3e-2, schedule="constant", warmup_ratio=0.0), 100)
    cfg = PPOConfig(kl_coef=0.05, minibatch_size=2, ppo_epochs=2)
    params = init_rl_params(jax.tree.map(jnp.copy, policy), CFG, cfg, jax.random.key(2))
    state = init_state(params, tx, jax.random.key(3))
    exp = make_experience(state.params, ref, r, scores, model_cfg=CFG, cfg=cfg)
    # jitted: run eagerly, each of the step's primitives compiled a program of its own, and those 17 calls left the
    # process ~5,600 memory maps more (the kernel's cap is 65,530 a process; see BUILD_NOTES, session 44 row 7)
    step = jax.jit(functools.partial(ppo_step, model_cfg=CFG, tx=tx), static_argnames="cfg")
    got, _ = step(state, exp, cfg=cfg)

    def by_hand(orders):
        st = state
        one = dataclasses.replace(cfg, ppo_epochs=1, minibatch_size=None)
        for rows in np.concatenate(orders).reshape(-1, 2):
            st, _ = step(st, jax.tree.map(lambda x: x[np.asarray(rows)], exp), cfg=one)
        return st

    keys = jax.random.split(state.rng, 3)[1:]
    want = by_hand([np.asarray(jax.random.permutation(k, 8)) for k in keys])
    in_order = by_hand([np.arange(8)] * 2)
    gap = lambda a, b: max(float(jnp.max(jnp.abs(x - y)))  # noqa: E731
                           for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
    assert int(got.step) == int(want.step) == 8
    # the state's key moves on (to the split's first key): the next step draws other orders (second mutation review)
    np.testing.assert_array_equal(jax.random.key_data(got.rng), jax.random.key_data(jax.random.split(state.rng, 3)[0]))
    near, apart = gap(got, want), gap(got, in_order)
    assert near < 2e-5 and apart > max(1e-4, 1000 * near), (near, apart)


def test_clip_by_part_norm_against_optax_s_global_clip_of_each_part():
    """The per-part clip in numbers (mutation review, session 44: a critic left unclipped passed the suite, whose
    test above compares policies and Adam hides a gradient's scale on a first step): with a separate critic, optax's
    global clip of the policy alone and of the critic's part (its trunk and the value head) alone; without one,
    optax's global clip of the whole tree, bitwise."""
    from reftjax.steps import clip_by_part_norm

    g = {"policy": {"w": jnp.array([3.0, 4.0])}, "value_head": {"b": jnp.array([0.0, 12.0])},
         "critic": {"w": jnp.array([5.0, 0.0])}}
    out, _ = clip_by_part_norm(1.0).update(g, optax.EmptyState())
    np.testing.assert_allclose(out["policy"]["w"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(out["value_head"]["b"], [0.0, 12 / 13], rtol=1e-6)
    np.testing.assert_allclose(out["critic"]["w"], [5 / 13, 0.0], rtol=1e-6)
    shared = {"policy": g["policy"], "value_head": g["value_head"]}
    ours = clip_by_part_norm(1.0).update(shared, optax.EmptyState())[0]
    theirs = optax.clip_by_global_norm(1.0).update(shared, optax.EmptyState())[0]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)


def test_a_non_finite_critic_gradient_skips_the_update_too():
    """With a separate critic the finite check reads the policy's and the critic's norms; one that read only the
    policy's passed the suite (mutation review, session 44) and would apply a NaN critic gradient, after which every
    step is skipped. Both parts are checked, each alone."""
    from reftjax.steps import _apply_update

    params = {"policy": {"w": jnp.ones(2)}, "value_head": {"b": jnp.zeros(1)}, "critic": {"w": jnp.ones(2)}}
    tx = make_optimizer(OptimConfig(learning_rate=0.1, schedule="constant", warmup_ratio=0.0), 4)
    state = init_state(params, tx, jax.random.key(0))
    fine = jax.tree.map(jnp.ones_like, params)
    for part in ("critic", "policy", "value_head"):
        grads = {**fine, part: jax.tree.map(lambda x: x * jnp.nan, fine[part])}
        new, m = _apply_update(state, grads, tx, jnp.float32(1.0))
        assert int(m["skipped"]) == 1 and int(new.step) == 0 and int(new.skipped) == 1, part
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
            np.testing.assert_array_equal(a, b)
    new, m = _apply_update(state, fine, tx, jnp.float32(1.0))
    assert int(m["skipped"]) == 0 and int(new.step) == 1


def test_a_separate_critic_is_clipped_apart_so_the_value_loss_leaves_the_policy_update_alone():
    """verl and OpenRLHF clip the actor's and the critic's gradients each by its own norm; one global norm over both
    let the value loss (vf_coef 5) shrink every policy update (review, session 37: ~10x at the default clip). With a
    separate critic the policy after a PPO step is the same whatever vf_coef, `grad_norm` is the policy's and
    `critic_grad_norm` the critic's; the shared critic (ReFT) keeps one norm over the whole model. The same up to
    float32 rounding: the two vf_coefs compile two programs, which XLA:CPU's default emitters round alike (bitwise)
    and the legacy ones the suite compiles with (tests/conftest.py) 2e-8 apart; one norm over both moves it 1e-4."""
    from reftjax.steps import make_experience, ppo_step

    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    prompts = jnp.asarray(np.random.default_rng(0).integers(2, 32, (8, 4)), jnp.int32)
    r = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG,
                cfg=SamplingConfig(max_new_tokens=5, eos_ids=(1,), pad_id=0))
    scores, ref = jnp.arange(8, dtype=jnp.float32) % 2, jax.tree.map(jnp.asarray, _host_policy(1))
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, grad_clip=0.05, schedule="constant", warmup_ratio=0.0), 10)

    def after(critic, vf_coef):
        cfg = PPOConfig(critic=critic, kl_coef=0.05, minibatch_size=4, vf_coef=vf_coef)
        params = init_rl_params(jax.tree.map(jnp.copy, policy), CFG, cfg, jax.random.key(2))
        params["value_head"] = jax.tree.map(lambda x: x * 20.0, params["value_head"])  # a large value loss
        state = init_state(params, tx, jax.random.key(3))
        exp = make_experience(state.params, ref, r, scores, model_cfg=CFG, cfg=cfg)
        state, m = ppo_step(state, exp, model_cfg=CFG, tx=tx, cfg=cfg)
        return jax.device_get(state.params["policy"]), jax.device_get(m)

    (p0, m0), (p5, m5) = after("separate", 0.0), after("separate", 5.0)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p5)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert float(m5["grad_norm"]) == pytest.approx(float(m0["grad_norm"]), rel=1e-5)  # the policy's own norm,
    assert float(m0["grad_norm"]) > 0.05  # over the clip
    assert float(m5["critic_grad_norm"]) > 0.05 and float(m0["critic_grad_norm"]) == 0.0  # (vf_coef 0: no signal)
    (s0, n0), (s5, n5) = after("shared", 0.0), after("shared", 5.0)  # one norm: the value loss moves the policy
    assert "critic_grad_norm" not in n5 and float(n5["grad_norm"]) > float(n0["grad_norm"])
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s5))) > 1e-4


def test_separate_critic_config_and_params_must_agree():
    from reftjax.steps import init_rl_params, make_experience

    with pytest.raises(ValueError, match="critic"):
        PPOConfig(critic="separate", experience_from_rollout=True)
    with pytest.raises(ValueError, match="critic"):
        PPOConfig(algo="grpo", group_size=2, critic="separate")
    with pytest.raises(ValueError, match="critic"):
        PPOConfig(critic="own")
    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    assert set(init_rl_params(policy, CFG, PPOConfig(algo="grpo", group_size=2), jax.random.key(0))) == {"policy"}
    shared = init_rl_params(policy, CFG, PPOConfig(), jax.random.key(0))
    prompts = jnp.full((2, 3), 3, jnp.int32)
    r = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG,
                cfg=SamplingConfig(max_new_tokens=2, eos_ids=(1,), pad_id=0))
    with pytest.raises(ValueError, match="init_rl_params"):
        make_experience(shared, policy, r, jnp.zeros(2), model_cfg=CFG, cfg=PPOConfig(critic="separate"))


def test_separate_critic_optimizer_state_is_sharded_like_the_params():
    """make_optimizer(separate_critic_state=True) on 8 fake devices: every AdamW moment of the policy and the
    critic partitions carries its parameter's sharding (found by key path through multi_transform's masks),
    and matches the default layout's moments."""
    mesh = _mesh()
    params = {"policy": sharding.place_params(_host_policy(), CFG, mesh),
              "value_head": _place(jax.tree.map(np.asarray, init_value_head(CFG, jax.random.key(2))), mesh)}
    want = {jax.tree_util.keystr(p): x.sharding for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    sharded = 0
    for separate in (False, True):
        tx = make_optimizer(OptimConfig(), 10, separate_critic_state=separate)
        state = init_state(params, tx, jax.random.key(0))
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
            key = jax.tree_util.keystr(path)
            match = [k for k in want if key.endswith(k)]
            if leaf.ndim == 0:
                assert leaf.sharding.is_fully_replicated, key
            else:
                assert match, key
                assert leaf.sharding.is_equivalent_to(want[max(match, key=len)], leaf.ndim), key
                sharded += not leaf.sharding.is_fully_replicated
    assert sharded > 10  # the policy's moments really are split over the mesh


def _grouped_rollout(cfg, group, prompts=4, new_tokens=6, vh=None):
    """A sampled rollout of `group` samples per prompt (two prompts left-padded), some rows stopped by EOS."""
    policy = init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 32, (prompts, 5)), jnp.int32)
    pmask = jnp.ones_like(tokens).at[0, :2].set(0).at[2, :1].set(0)
    r = rollout(policy, tokens, pmask, jax.random.key(0), model_cfg=cfg, value_head=vh,
                cfg=SamplingConfig(max_new_tokens=new_tokens, eos_ids=(1,), pad_id=0, n=group))
    keep = np.asarray(r.mask_BxN) > 0
    assert 0 < keep.sum() < keep.size  # some rows stopped early: padded completions are packed too
    return policy, r, keep


# Gemma 3's parts: a windowed local layer with its own RoPE base, then a global one (masks picked per layer)
_GEMMA3 = dict(sliding_layers=(True, False), local_rope_theta=1e4, rope_theta=1e6, qk_norm=True, hidden_act="gelu_tanh",
               norm_offset=1.0, embed_scale=True, query_pre_attn_scalar=12.0, sandwich_norms=True,
               model_type="gemma3_text")
# Gemma 2's: soft-capped attention scores and logits (caps low enough to bite on this random model)
_GEMMA2 = dict(sliding_layers=(True, False), hidden_act="gelu_tanh", norm_offset=1.0, embed_scale=True,
               query_pre_attn_scalar=12.0, sandwich_norms=True, attn_logit_softcap=0.5, final_logit_softcap=1.0,
               model_type="gemma2")


@pytest.mark.parametrize("window", [None, 3, "gemma2", "gemma3", "smollm3"])
def test_share_prompt_runs_each_prompt_once_with_the_unpacked_outputs_and_gradients(window, monkeypatch):
    """completion_hidden(share_prompt=g) packs g completions behind one copy of their prompt: the trunk sees
    B/g rows of P + g*N tokens instead of B rows of P + N, and log-probs, values, entropies and their
    gradients equal the unpacked forward's (left-padded prompts, EOS-stopped rows, sliding window, Gemma 3's
    windowed and full layers mixed, Gemma 2's soft-caps, SmolLM3's NoPE layers), with the full-logits head and with
    the chunked one (`losses.fused_token_logprobs`)."""
    from reftjax import steps

    if window in ("gemma2", "gemma3"):
        cfg = dataclasses.replace(CFG, num_layers=2, sliding_window=3, **(_GEMMA2 if window == "gemma2" else _GEMMA3))
    elif window == "smollm3":  # a NoPE layer, then a RoPE one
        cfg = dataclasses.replace(CFG, num_layers=2, rope_layers=(False, True), model_type="smollm3")
    else:
        cfg = dataclasses.replace(CFG, num_layers=2, sliding_window=window)
    g, n_new = 3, 6
    policy, r, keep = _grouped_rollout(cfg, g, new_tokens=n_new)
    params = {"policy": policy, "value_head": jax.tree.map(lambda x: x * 20.0, init_value_head(cfg, jax.random.key(2)))}
    tokens = jnp.concatenate([r.prompt_tokens_BxP, r.tokens_BxN], 1)
    attn = jnp.concatenate([r.prompt_mask_BxP, r.mask_BxN], 1).astype(jnp.int32)
    seen = []
    forward = steps.forward
    monkeypatch.setattr(steps, "forward", lambda p, c, t, *a, **k: (seen.append(t.shape), forward(p, c, t, *a, **k))[1])

    def outputs(p, share, head_rows=0):
        lp, v, ent = steps.policy_outputs(p, cfg, tokens, attn, n_new, True, with_entropy=True, share_prompt=share,
                                          head_chunk_rows=head_rows)
        return jnp.sum(jnp.where(keep, lp + v + ent, 0.0)), (lp, v, ent)

    # (jit-compiled: the eager value_and_grad dispatched ~270 small programs in the first case)
    value_and_grad = jax.jit(jax.value_and_grad(outputs, has_aux=True), static_argnums=(1, 2))
    (total_a, outs_a), grads_a = value_and_grad(params, 1, 0)
    b, p = r.prompt_tokens_BxP.shape
    # packed rows, with the full-logits head and with the chunked head (12 rows x 6 slots in 3 chunks)
    for head_rows in (0, 24):
        seen.clear()
        (total_b, outs_b), grads_b = value_and_grad(params, g, head_rows)
        assert seen == [(b // g, p + g * n_new)]  # (recorded as the call is traced: one new program each)
        assert float(jnp.max(jnp.abs(outs_a[1]))) > 0.1  # values of order 1 are compared
        for name, x, y in zip(("logp", "values", "entropy"), outs_a, outs_b):
            np.testing.assert_allclose(np.where(keep, y, 0), np.where(keep, x, 0), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name} {head_rows}")
        # (the sum cancels: log-probs near -3.5 against entropies near +3.5; float32 noise scales with its terms)
        terms = sum(float(jnp.sum(jnp.where(keep, jnp.abs(x), 0.0))) for x in outs_a)
        np.testing.assert_allclose(total_b, total_a, rtol=1e-5, atol=1e-6 * terms)
        for path, x in jax.tree_util.tree_leaves_with_path(grads_a):
            y = functools.reduce(lambda t, k: t[k.key], path, grads_b)
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(x))),
                                       err_msg=f"{path} {head_rows}")
    with pytest.raises(ValueError, match="does not divide"):
        steps.completion_hidden(policy, cfg, tokens[:-1], attn[:-1], n_new, g)


def test_a_library_users_wrong_inputs_get_errors_that_say_what_to_pass():
    """Bare KeyErrors ('value_head', 'layers') and a broadcasting error from deep in the step (library-user review,
    session 34): GRPO-built params in a PPO experience, the whole trainable tree given to rollout, scores_B of the
    wrong length."""
    policy, r, _ = _grouped_rollout(CFG, 2)
    ppo = PPOConfig(group_size=2, kl_coef=0.0)
    experience = make_experience_fn(CFG, ppo)
    grpo_params = init_rl_params(policy, CFG, PPOConfig(algo="grpo", group_size=2), jax.random.key(1))
    scores = jnp.zeros(r.tokens_BxN.shape[:1])
    with pytest.raises(ValueError, match="PPO needs a value head"):
        experience(grpo_params, policy, r, jnp.arange(scores.shape[0]), scores_B=scores)
    with pytest.raises(ValueError, match="trainable tree"):
        experience(policy, policy, r, jnp.arange(scores.shape[0]), scores_B=scores)
    ppo_params = init_rl_params(policy, CFG, ppo, jax.random.key(1))
    with pytest.raises(ValueError, match=r"scores_B has shape \(7,\); one score per rollout row: \(8,\)"):
        experience(ppo_params, policy, r, jnp.arange(scores.shape[0]), scores_B=scores[:-1])
    with pytest.raises(ValueError, match=r"pass state.params\['policy'\]"):
        rollout(ppo_params, r.prompt_tokens_BxP[::2], r.prompt_mask_BxP[::2], jax.random.key(0), model_cfg=CFG,
                cfg=r.sampling)


def test_an_update_refuses_the_experience_of_another_algorithm():
    """A GRPO step given a PPO-built experience trained on GAE advantages, a PPO step given a GRPO one fitted its
    critic to zero returns, silently (session 34's list): the experience records its algorithm."""
    policy, r, _ = _grouped_rollout(CFG, 2)
    scores = jnp.asarray(np.tile([1.0, 0.0], r.tokens_BxN.shape[0] // 2), jnp.float32)
    cfgs = {a: PPOConfig(algo=a, group_size=2, kl_coef=0.0) for a in ("ppo", "grpo", "rloo")}
    built = {}
    for algo, cfg in cfgs.items():
        params = init_rl_params(policy, CFG, cfg, jax.random.key(1))
        exp, _ = make_experience_fn(CFG, cfg)(params, policy, r, jnp.arange(scores.shape[0]), scores_B=scores)
        assert exp.algo == algo
        built[algo] = (params, exp)
    tx = optax.sgd(1e-3)
    for algo, cfg in cfgs.items():
        step = make_ppo_step(CFG, tx, cfg)
        for other, (_, exp) in built.items():
            state = init_state(built[algo][0], tx, jax.random.key(0))  # (lowered, never run: nothing donated)
            if other == algo:
                step.lower(state, exp)  # (traced and lowered: the check passes; compiling adds nothing to it)
            else:
                with pytest.raises(ValueError, match=f"built for algo={other!r}.*runs algo={algo!r}"):
                    step(state, exp)
    unchecked = built["ppo"][1].replace(algo=None)  # (an Experience built by hand: not checked)
    make_ppo_step(CFG, tx, cfgs["grpo"]).lower(init_state(built["grpo"][0], tx, jax.random.key(0)), unchecked)


def _assert_same_update(got, want, before, err_msg=""):
    """Two one-step updates (made with `optax.sgd(1.0)`, so each is minus the gradient) agree to fp32 rounding,
    relative to the largest change, and the step did change the parameters.

    The tests comparing two exact-in-math computations of an update use plain SGD, not the AdamW of training:
    AdamW's first step moves every parameter by about lr * g / (|g| + eps), i.e. by lr whatever the size of its
    gradient, so an element whose gradient is rounding noise moves by +-lr on whichever side the rounding falls,
    and two equal computations may differ there by 2 lr (session 15: 1 of 512 and 1 of 2,048 elements on an AVX2
    host, whose kernels round differently). With SGD the parameter difference is the gradient difference.
    """
    delta = lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64)  # noqa: E731
    d_want, d_got = jax.tree.map(delta, want, before), jax.tree.map(delta, got, before)
    scale = max(float(np.max(np.abs(d))) for d in jax.tree.leaves(d_want))
    assert scale > 1e-3, scale  # the update did move the parameters
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=err_msg),
                 d_got, d_want)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_ppo_step_with_shared_prompts_matches_unpacked_rows_on_1_and_8_devices(algo):
    """PPOConfig.share_prompt (with the chunked vocabulary head): experience and one update over the whole batch
    (mean over rows, so the group-wise shuffle changes nothing) equal the unpacked full-logits ones, on one device
    and on a data=2 x fsdp=4 mesh (4 packed rows of 4 samples)."""
    g = 4
    policy, r, keep = _grouped_rollout(CFG, g, vh=init_value_head(CFG, jax.random.key(2)) if algo == "ppo" else None)
    host_r = jax.device_get(r)
    scores = np.random.default_rng(1).random(4 * g).astype(np.float32)
    base = PPOConfig(algo=algo, group_size=g, minibatch_size=4 * g, ppo_epochs=1, kl_coef=0.05, head_chunk_rows=0)
    tx = optax.sgd(1.0)  # see _assert_same_update
    results = {}
    for share, devices in ((False, 1), (True, 1), (True, 8)):
        mesh = _mesh() if devices == 8 else None
        # the shared runs also chunk the vocabulary head (16 rows x 6 slots in 3 chunks)
        cfg = dataclasses.replace(base, share_prompt=share, head_chunk_rows=32 if share else 0)
        params = {"policy": sharding.place_params(jax.device_get(policy), CFG, mesh)}
        if algo == "ppo":
            params["value_head"] = _place(jax.tree.map(np.asarray, init_value_head(CFG, jax.random.key(2))), mesh)
        ref = sharding.place_params(_host_policy(1), CFG, mesh)
        ro = jax.tree.map(jnp.asarray, host_r) if mesh is None else sharding.shard_batch(host_r, mesh)
        exp, _ = make_experience_fn(CFG, cfg)(params, ref, ro, jnp.zeros(4 * g, jnp.int32), jnp.asarray(scores))
        state, m = make_ppo_step(CFG, tx, cfg)(init_state(params, tx, jax.random.key(3)), exp)
        results[share, devices] = jax.device_get((exp, state.params, m["loss"]))
    want_exp, want_params, want_loss = results[False, 1]
    assert float(np.max(np.abs(want_exp.advantages_BxN))) > 0.1
    for key in ((True, 1), (True, 8)):
        got_exp, got_params, got_loss = results[key]
        for name in ("logp_old_BxN", "logp_ref_BxN", "values_old_BxN", "advantages_BxN", "returns_BxN"):
            np.testing.assert_allclose(np.where(keep, getattr(got_exp, name), 0),
                                       np.where(keep, getattr(want_exp, name), 0), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{key} {name}")
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        _assert_same_update(got_params["policy"], want_params["policy"], jax.device_get(policy), str(key))
        if algo == "ppo":
            _assert_same_update(got_params["value_head"], want_params["value_head"],
                                jax.device_get(init_value_head(CFG, jax.random.key(2))), str(key))


def test_share_prompt_config_checks():
    with pytest.raises(ValueError, match="share_prompt"):
        PPOConfig(algo="grpo", group_size=4, minibatch_size=6, share_prompt=True)
    with pytest.raises(ValueError, match="share_prompt"):
        PPOConfig(algo="ppo", group_size=1, share_prompt=True)
    from reftjax.config import RLConfig

    with pytest.raises(ValueError, match="rl.sampling.n"):
        RLConfig(ppo=PPOConfig(algo="ppo", group_size=4, minibatch_size=8, share_prompt=True))
    assert PPOConfig(algo="grpo", group_size=4, minibatch_size=8, share_prompt=True).prompt_group == 4
    assert PPOConfig(algo="grpo", group_size=4, minibatch_size=8).prompt_group == 1


def test_completion_buckets():
    from reftjax.rollout import completion_buckets

    assert completion_buckets(128, 4) == (32, 64, 96, 128)
    assert completion_buckets(400, 4) == (104, 200, 304, 400)
    assert completion_buckets(12, 4) == (8, 12) and completion_buckets(300, 1) == (300,)
    with pytest.raises(ValueError, match=">= 1"):
        completion_buckets(128, 0)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_trim_to_bucket_drops_only_padding_and_changes_neither_experience_nor_update(algo):
    """Rows that all stop early: the rollout is cut to the smallest bucket holding the longest row, and the
    experience (log-probs, KL, GAE, whitened advantages) and one ppo_step on it equal those on the full-length
    rollout; the cut program has the shorter completion axis."""
    from reftjax.rollout import completion_buckets, trim_to_bucket

    g, new = 4, 64
    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    vh = jax.tree.map(lambda x: x * 20.0, init_value_head(CFG, jax.random.key(2)))
    prompts = jnp.asarray(np.random.default_rng(0).integers(2, 32, (4, 5)), jnp.int32)
    r = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG,
                cfg=SamplingConfig(max_new_tokens=new, eos_ids=tuple(range(1, 9)), pad_id=0, n=g))
    longest = int(jnp.max(r.lengths_B))
    buckets = completion_buckets(new, 4)
    with jax.transfer_guard_host_to_device("disallow"):  # static bounds: no bound sent to the device (audit, s35)
        cut = trim_to_bucket(r, buckets)
    n = cut.tokens_BxN.shape[1]
    assert longest <= n < new and n == min(b for b in buckets if b >= longest), (longest, n)
    assert int(jnp.min(r.lengths_B)) < longest  # rows of different lengths
    assert trim_to_bucket(r, (new,)) is r
    params = {"policy": policy}
    if algo == "ppo":
        params["value_head"] = vh
    cfg = PPOConfig(algo=algo, group_size=g if algo == "grpo" else 1, minibatch_size=4 * g, ppo_epochs=1,
                    kl_coef=0.05)
    tx = optax.sgd(1.0)  # see _assert_same_update
    scores = jnp.asarray(np.random.default_rng(1).random(4 * g), jnp.float32)
    ref = jax.tree.map(jnp.asarray, _host_policy(1))
    out = {}
    for name, ro in (("full", r), ("cut", cut)):
        exp, em = make_experience_fn(CFG, cfg)(params, ref, ro, jnp.zeros(4 * g, jnp.int32), scores)
        state = init_state(jax.tree.map(jnp.copy, params), tx, jax.random.key(3))  # the step donates it
        state, m = make_ppo_step(CFG, tx, cfg)(state, exp)
        out[name] = jax.device_get((exp, em, state.params, m["loss"]))
    (e_full, m_full, p_full, l_full), (e_cut, m_cut, p_cut, l_cut) = out["full"], out["cut"]
    assert e_cut.mask_BxN.shape == (4 * g, n)
    np.testing.assert_array_equal(e_full.mask_BxN[:, n:], 0)
    for name in ("logp_old_BxN", "logp_ref_BxN", "values_old_BxN", "advantages_BxN", "returns_BxN"):
        np.testing.assert_allclose(getattr(e_cut, name), getattr(e_full, name)[:, :n], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert float(np.max(np.abs(e_full.advantages_BxN))) > 0.1
    for k in ("reward", "kl", "response_length"):
        np.testing.assert_allclose(m_cut[k], m_full[k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(l_cut, l_full, rtol=1e-5, atol=1e-6)
    _assert_same_update(p_cut, p_full, jax.device_get(params))


def test_ppo_updates_per_step_counts_epochs_times_minibatches():
    assert ppo_updates_per_step(PPOConfig(minibatch_size=8, ppo_epochs=2), 32) == 8
    assert ppo_updates_per_step(PPOConfig(minibatch_size=32, ppo_epochs=2), 32) == 2
    assert ppo_updates_per_step(PPOConfig(), 32) == ppo_updates_per_step(PPOConfig(), 8) == 2  # ReFT: whole batch
    with pytest.raises(ValueError, match="not a multiple of minibatch_size 8"):
        ppo_updates_per_step(PPOConfig(minibatch_size=8), 12)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 0.5])
def test_host_schedule_value_equals_the_optax_schedule(schedule, warmup_ratio):
    """The learning rate the loop logs (computed on the host) is the one optax applies."""
    for total in (1, 7, 100):
        cfg = OptimConfig(learning_rate=3e-4, schedule=schedule, warmup_ratio=warmup_ratio)
        counts = np.arange(total + 3)
        want = jax.vmap(make_schedule(cfg, total))(counts)
        got = [schedule_value(cfg, total, int(c)) for c in counts]
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=3e-10)
        if schedule != "constant":
            assert got[total] == 0.0 and got[total - 1] > 0.0 or total == 1


def test_share_prompt_refuses_rows_that_do_not_share_a_prompt():
    # share_prompt runs each group's first prompt for the whole group: other prompts in a group were silently replaced
    from reftjax.steps import make_experience

    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    prompts = jnp.asarray(np.random.default_rng(0).integers(2, 32, (4, 5)), jnp.int32)  # 4 different prompts
    r = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG,
                cfg=SamplingConfig(max_new_tokens=4, eos_ids=(1,), pad_id=0))
    cfg = PPOConfig(algo="grpo", group_size=2, share_prompt=True, minibatch_size=4, kl_coef=0.0)
    with pytest.raises(ValueError, match="rows 0..1 do not share one prompt"):  # (a hand-built rollout: n unknown)
        make_experience({"policy": policy}, policy, r.replace(sampling=None), jnp.zeros(4), model_cfg=CFG, cfg=cfg)
    grouped = rollout(policy, prompts[:2], jnp.ones_like(prompts[:2]), jax.random.key(0), model_cfg=CFG,
                      cfg=SamplingConfig(max_new_tokens=4, eos_ids=(1,), pad_id=0, n=2))
    make_experience({"policy": policy}, policy, grouped, jnp.zeros(4), model_cfg=CFG, cfg=cfg)  # prompt-major: fine


def test_weight_decay_spares_norms_and_biases_and_a_zero_clip_means_no_clipping():
    params = {"policy": jax.tree.map(jnp.asarray, _host_policy(0))}
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = make_optimizer(OptimConfig(learning_rate=1.0, schedule="constant", warmup_ratio=0.0, weight_decay=0.1), 10)
    updates, _ = tx.update(zero, tx.init(params), params)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        name = jax.tree_util.keystr(path)
        want = 0.0 if name.endswith("['scale']") or name.endswith("['bias']") else -0.1  # HF Trainer's grouping
        np.testing.assert_allclose(np.asarray(u), want * np.asarray(flat[path]), atol=1e-6, err_msg=name)
    # the tiny policy has no bias: the value head's (and Qwen2's q/k/v) "bias" leaves are spared too (third mutation
    # review: dropping "bias" from the rule went unseen)
    vh = {"value_head": {"summary": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones((1,))}}}
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, vh), tx.init(vh), vh)
    np.testing.assert_allclose(np.asarray(u["value_head"]["summary"]["kernel"]), -0.1, atol=1e-6)
    np.testing.assert_allclose(np.asarray(u["value_head"]["summary"]["bias"]), 0.0, atol=1e-6)
    # grad_clip=0 scaled every gradient to 0 and froze training; it now means no clipping (HF's max_grad_norm)
    big = jax.tree.map(lambda x: jnp.full_like(x, 100.0), params)
    tx0 = make_optimizer(OptimConfig(learning_rate=1.0, schedule="constant", warmup_ratio=0.0, grad_clip=0.0), 10)
    updates, _ = tx0.update(big, tx0.init(params), params)
    assert all(np.allclose(np.asarray(u), -1.0, atol=1e-4) for u in jax.tree.leaves(updates))  # Adam: -lr*sign(g)


def test_sft_reports_zero_tokens_and_refuses_an_accumulation_that_does_not_divide_the_batch():
    attn = np.ones((8, 12), np.int32)
    attn[:, 9:] = 0  # 3 padded positions per row: not real tokens
    batch = jax.tree.map(jnp.asarray, dict(_sft_batch(), loss_mask=np.zeros((8, 12), np.int32), attn_mask=attn))
    step = make_sft_step(CFG, SFT_TX)
    _, m = step(_sft_state(SFT_TX), batch)
    assert float(m["tokens"]) == 0.0 and float(m["loss"]) == 0.0  # the metric read 1 before
    # the count is of predicted tokens: a loss-mask 1 on position 0 (nothing before it predicts it) counts for none
    _, m1 = step(_sft_state(SFT_TX), dict(batch, loss_mask=jnp.ones((8, 12), jnp.int32)))
    assert float(m1["tokens"]) == 8 * 11
    assert float(m["input_tokens"]) == 8 * 9  # what the loop's tokens/s counts
    # a zero head gives uniform logits: the loss is log V per predicted token, whatever the mask (a token count off
    # by one, or another normalisation, moved it unseen: the other SFT tests compared the step with itself; third
    # mutation review)
    flat = _sft_state(SFT_TX)
    flat = flat.replace(params={"policy": {**flat.params["policy"],
                                           "lm_head": jax.tree.map(jnp.zeros_like, flat.params["policy"]["lm_head"])}})
    _, mz = step(flat, jax.tree.map(jnp.asarray, _sft_batch()))
    assert float(mz["loss"]) == pytest.approx(np.log(CFG.vocab_size), rel=1e-6)
    with pytest.raises(ValueError, match="accum_steps=3 must divide the batch of 8 rows"):
        make_sft_step(CFG, SFT_TX, accum_steps=3)(_sft_state(SFT_TX), jax.tree.map(jnp.asarray, _sft_batch()))


def test_experience_refuses_a_rollout_drawn_with_other_settings():
    """RLConfig checks temperature and group size for the CLI; a library user sets SamplingConfig and PPOConfig
    apart, and a mismatch trained silently: group_size 4 over n=2 samples compared two prompts' rewards, T=0.5
    samples were scored at T=1 (helper review). The rollout now carries its settings and the experience checks."""
    from reftjax.steps import make_experience

    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    prompts = jnp.asarray(np.random.default_rng(0).integers(2, 32, (2, 5)), jnp.int32)
    scfg = SamplingConfig(max_new_tokens=4, eos_ids=(1,), pad_id=0, n=2, temperature=0.5, top_k=5)
    r = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG, cfg=scfg)
    assert r.sampling == scfg
    ok = PPOConfig(algo="grpo", group_size=2, temperature=0.5, kl_coef=0.0)

    def run(cfg, ro=r):
        return make_experience({"policy": policy}, policy, ro, jnp.zeros(4), model_cfg=CFG, cfg=cfg)

    run(ok)
    jax.jit(lambda ro: make_experience({"policy": policy}, policy, ro, jnp.zeros(4), model_cfg=CFG, cfg=ok))(r)
    for bad, msg in ((dataclasses.replace(ok, group_size=4), "grpo groups PPOConfig.group_size=4 rows, but the "
                                                              "rollout drew n=2"),
                     (dataclasses.replace(ok, temperature=1.0), "sampled at temperature 0.5 but PPOConfig.temperature"),
                     (dataclasses.replace(ok, experience_from_rollout=True), "top_k 0, top_p 1")):
        with pytest.raises(ValueError, match=msg):
            run(bad)
    greedy = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG,
                     cfg=SamplingConfig(max_new_tokens=4, eos_ids=(1,), pad_id=0, greedy=True))
    with pytest.raises(ValueError, match="the rollout was greedy"):
        run(PPOConfig(kl_coef=0.0), greedy)


def test_rollout_refuses_right_padded_prompts():
    """A tokenizer's default right padding fed to rollout decoded on from pad positions, silently (helper review:
    other tokens and log-probs than the same prompt alone)."""
    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    tokens = jnp.asarray([[5, 6, 7, 0], [5, 6, 7, 8]], jnp.int32)
    right = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.int32)
    cfg = SamplingConfig(max_new_tokens=2, eos_ids=(1,), pad_id=0)
    with pytest.raises(ValueError, match=r"prompt rows \[0\] are not left-padded.*padding_side = 'left'"):
        rollout(policy, tokens, right, jax.random.key(0), model_cfg=CFG, cfg=cfg)
    rollout(policy, tokens[:, ::-1], right[:, ::-1], jax.random.key(0), model_cfg=CFG, cfg=cfg)  # left: fine


def test_an_experience_fn_without_a_reward_fn_asks_for_scores():
    """Without reward_fn and scores_B it failed at run time inside XLA ('NoneType' object is not callable)."""
    policy = jax.tree.map(jnp.asarray, _host_policy(0))
    prompts = jnp.full((2, 3), 3, jnp.int32)
    r = rollout(policy, prompts, jnp.ones_like(prompts), jax.random.key(0), model_cfg=CFG,
                cfg=SamplingConfig(max_new_tokens=2, eos_ids=(1,), pad_id=0))
    params = {"policy": policy, "value_head": init_value_head(CFG, jax.random.key(2))}
    with pytest.raises(ValueError, match="built without a reward_fn: pass scores_B"):
        make_experience_fn(CFG, PPOConfig(kl_coef=0.0))(params, policy, r, jnp.zeros(2, jnp.int32))


def test_gradient_accumulation_sums_in_f32_with_bf16_params():
    """With bf16 params the accumulator was bf16: 1 + 7 x 2^-9 summed as 1 (each 2^-9 rounded away), not the
    1.0156 that the f32 sum rounds to once at the end."""
    from reftjax.steps import accumulate_grads

    params = {"w": jnp.zeros((3,), jnp.bfloat16), "b": jnp.zeros((), jnp.float32)}
    scale = jnp.asarray([1.0] + [2.0 ** -9] * 7, jnp.float32)

    def grad_fn(p, s):
        return {"w": jnp.full((3,), s, jnp.bfloat16), "b": s}, s * 2

    grads, aux = jax.jit(lambda p, m: accumulate_grads(grad_fn, p, m))(params, scale)
    assert grads["w"].dtype == jnp.bfloat16 and grads["b"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(grads["w"], np.float32), np.float32(1.015625))
    np.testing.assert_allclose(float(grads["b"]), 1 + 7 * 2.0 ** -9, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(aux), np.asarray(scale) * 2)


def test_a_state_of_bf16_params_is_warned_about_as_updates_at_fine_tuning_rates_round_away(caplog, monkeypatch):
    """bf16 storage is allowed (`param_dtype`), but an AdamW update of ~lr rounds away below half a bf16 spacing:
    here one update at lr 1e-6 moves every float32 weight and under 5% of bf16 ones (those near 0), and nothing said so
    (tunix-migrant review, session 38: 5 steps changed 1% of bf16 weights, 95% of float32 ones)."""
    import logging

    from reftjax import steps

    monkeypatch.setattr(steps, "_LOW_PRECISION_WARNED", set())  # (once a process: earlier tests may have used it)
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(0, 0.02, (64,)), jnp.float32)}
    tx = make_optimizer(OptimConfig(learning_rate=1e-6, schedule="constant", warmup_ratio=0.0), 10)
    grads = {"w": jnp.ones((64,), jnp.float32)}
    moved = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        caplog.clear()
        p = jax.tree.map(lambda x: x.astype(dtype), params)
        with caplog.at_level(logging.WARNING, logger="reftjax.steps"):
            state = init_state(p, tx, jax.random.key(0))
        warned = [r.getMessage() for r in caplog.records if "rounds away" in r.getMessage()]
        assert bool(warned) == (dtype == jnp.bfloat16), warned
        updates, _ = tx.update(jax.tree.map(lambda g: g.astype(dtype), grads), state.opt_state, state.params)
        new = optax.apply_updates(state.params, updates)
        moved[jnp.dtype(dtype).name] = float(jnp.mean((new["w"] != p["w"]).astype(jnp.float32)))
    assert moved["float32"] == 1.0 and moved["bfloat16"] < 0.05, moved  # (only weights near 0 move in bf16)
    assert "param_dtype='float32', dtype='bfloat16'" in warned[0]
    caplog.clear()  # once a process: a run builds an abstract and a fresh state in every phase (regression review)
    with caplog.at_level(logging.WARNING, logger="reftjax.steps"):
        init_state(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tx, jax.random.key(0), abstract=True)
    assert not caplog.records


def test_out_of_range_rl_and_optimizer_settings_are_refused():
    """Numbers their type allows but the maths does not (session 25's left-alone list): a negative kl_coef rewards
    drifting from the reference, clip_eps 0 stops every update, b2 = 1 divides Adam's bias correction by 0."""
    for bad in (dict(kl_coef=-0.05), dict(gamma=1.5), dict(gae_lambda=-0.1), dict(clip_eps=0.0),
                dict(clip_range_value=-0.2), dict(clip_range_value=0.0), dict(vf_coef=-1.0), dict(head_chunk_rows=-1)):
        with pytest.raises(ValueError, match="need kl_coef >= 0, gamma and gae_lambda in"):
            PPOConfig(**bad)
    for bad in (dict(b1=1.0), dict(b2=1.0), dict(b2=-0.1), dict(eps=-1e-8), dict(weight_decay=-0.01)):
        with pytest.raises(ValueError, match="need 0 <= b1 < 1, 0 <= b2 < 1"):
            OptimConfig(**bad)
    PPOConfig(kl_coef=0.0, gamma=1.0, gae_lambda=1.0, vf_coef=0.0)  # the edges that mean something are kept
    OptimConfig(b1=0.0, eps=0.0)
    with pytest.raises(ValueError, match="need 0 <= warmup_ratio < 1"):  # all warm-up: the main schedule never runs
        OptimConfig(warmup_ratio=1.0)


def test_ppo_config_edges_gamma_0_and_minibatch_0():
    """gamma and gae_lambda take 0 as they take 1 (only 1 was tried); minibatch_size 0 is refused here, not as a
    division by zero in RLConfig's check (mutants moving each bound passed: mutation review, session 56)."""
    assert PPOConfig(gamma=0.0, gae_lambda=0.0).gamma == 0.0
    with pytest.raises(ValueError, match=r"^minibatch_size must be >= 1 or None \(the whole rollout batch\), got 0$"):
        PPOConfig(minibatch_size=0)


@pytest.mark.parametrize("mesh", [None, "fsdp"])
def test_the_abstract_state_a_resume_restores_onto_is_the_fresh_states_layout(mesh):
    """init_state(abstract=True), run_rl's restore target (built from an abstract policy, so nothing is copied):
    the fresh state's tree, shapes, dtypes and shardings, for SFT, GRPO and PPO with a shared or separate critic (its
    own optimizer partitions too), from placed params and from a library user's NumPy params; nothing allocated for
    the optimizer state, and no program compiled (the counters and key compiled one or two, session 33's list). The
    verifier's (rerank.abstract_verifier) too."""
    from reftjax import checkpoint as ckpt
    from reftjax import xla_cache
    from reftjax.rerank import abstract_verifier, init_verifier

    mesh = _mesh() if mesh else None
    placed = sharding.place_params(_host_policy(), CFG, mesh)
    target, tx, key = ckpt.abstract_like({"policy": placed}), make_optimizer(OptimConfig(), 10), jax.random.key(7)
    jax.clear_caches()  # (programs compiled by earlier tests in this process would not be counted again)
    compiles = xla_cache.CompileStats()
    init_state(target, tx, key, abstract=True)
    assert compiles.programs() == 0
    for policy in (placed, _host_policy()):
        for algo, critic, separate in (("sft", None, False), ("grpo", "shared", False), ("ppo", "shared", False),
                                       ("ppo", "separate", False), ("ppo", "separate", True),
                                       ("verifier", None, False)):
            tx = make_optimizer(OptimConfig(learning_rate=1e-3, value_head_lr_scale=0.5), 10,
                                separate_critic_state=separate)
            ppo = PPOConfig(algo=algo, group_size=2, critic=critic) if algo in ("grpo", "ppo") else None
            make = (lambda p: {"policy": p}) if ppo is None else functools.partial(
                init_rl_params, model_cfg=CFG, cfg=ppo, rng=jax.random.key(1))
            key = jax.random.key(7)
            abstract = init_state(ckpt.abstract_like(make(ckpt.abstract_like(policy))), tx, key, abstract=True)
            fresh = init_state(make(jax.tree.map(jnp.copy, policy)), tx, key)
            if algo == "verifier":  # (what run_rerank restores onto)
                abstract = init_state({"verifier": abstract_verifier(policy, CFG, jax.random.key(1))}, tx, key,
                                      abstract=True)
                fresh = init_state({"verifier": init_verifier(policy, CFG, jax.random.key(1))}, tx, key)
            got, want = (jax.tree_util.tree_flatten_with_path(t) for t in (abstract, ckpt.abstract_like(fresh)))
            assert got[1] == want[1], (algo, critic, separate)
            for (path, a), (_, w) in zip(got[0], want[0]):
                assert isinstance(a, jax.ShapeDtypeStruct), path
                assert (a.shape, a.dtype, a.sharding) == (w.shape, w.dtype, w.sharding), (algo, critic, path)


def test_rl_steps_warn_once_about_longrope_on_transformers_per_call_rule(monkeypatch, caplog):
    """A library RL loop given a LongRoPE config on factors="auto" is told to pin one set (the training loop pins
    it); pinned, or any other RoPE, nothing is said (helper review, session 41)."""
    import reftjax.steps as S
    from reftjax.models import RopeScaling

    monkeypatch.setattr(S, "_LONGROPE_WARNED", set())
    longrope = RopeScaling("longrope", 4.0, original_max_position_embeddings=64, short_factor=(1.0,) * 4,
                           long_factor=(2.0,) * 4)
    auto = CFG.replace(rope_scaling=longrope, model_type="phi3")
    pinned = auto.replace(rope_scaling=dataclasses.replace(longrope, factors="long"))
    tx = make_optimizer(OptimConfig(), 10)
    with caplog.at_level("WARNING", logger="reftjax.steps"):
        make_ppo_step(pinned, tx, PPOConfig())
        make_experience_fn(CFG, PPOConfig())
        assert "LongRoPE" not in caplog.text
        make_ppo_step(auto, tx, PPOConfig())
        make_experience_fn(auto, PPOConfig())
    assert caplog.text.count("LongRoPE with factors='auto'") == 1 and "original context of 64" in caplog.text


def test_experience_metrics_of_one_row_near_one_scores_and_barely_split_groups():
    """`experience_metrics` on hand-built experiences, no model (third mutation review): one row has a reward_std of
    0, not the NaN of ddof=1 over one score; a score within 1e-6 below 1 (0.99999994, e.g. a float32 mean of
    correct parts) counts in `accuracy`; a group whose samples differ by 2e-6 did not all score the same (its
    standard deviation, 8.7e-7, is under the 1e-6 the spread is compared with)."""
    from types import SimpleNamespace

    from reftjax.steps import Experience, experience_metrics

    def metrics(scores, group_size=1):
        b = len(scores)
        z = jnp.zeros((b, 3), jnp.float32)
        exp = Experience(jnp.zeros((b, 5), jnp.int32), jnp.ones((b, 5), jnp.int32), jnp.ones((b, 3), jnp.int32),
                         z, z, z, z, z, jnp.asarray(scores, jnp.float32))
        return experience_metrics(exp, SimpleNamespace(finished_B=jnp.ones((b,), bool)), logp_recomputed=False,
                                  group_size=group_size)

    one = metrics([1.0])
    assert float(one["reward_std"]) == 0.0 and float(one["reward"]) == 1.0 and float(one["accuracy"]) == 1.0
    near = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
    assert float(metrics([near, 0.999, 0.0, 1.0])["accuracy"]) == 0.5
    assert float(metrics([0.0, 0.0, 0.0, 2e-6, 0.5, 0.5, 0.5, 0.5], group_size=4)["frac_reward_zero_std"]) == 0.5
