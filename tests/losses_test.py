"""Tests for reftjax.losses against independent NumPy references.

References are written here from the formulas (explicit Python loops over rows
and time steps, float64), not by calling the module. Tolerances: float32 JAX vs
float64 NumPy at rtol 1e-5 / atol 1e-5 unless stated; gradient checks run in
float64 under ``jax.enable_x64(True)`` (the context manager that replaced
``jax.experimental.enable_x64``).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from reftjax import losses as L

RTOL = ATOL = 1e-5


@functools.cache
def _jitted(fn, static_items):
    return jax.jit(functools.partial(fn, **dict(static_items)))


class _Jit:
    """``J.fn(*arrays, **static)`` calls ``losses.fn`` under ``jax.jit``.

    Keyword arguments are static (strings, ints, flags); positional ones are
    traced. Every value test thus also checks jit-compatibility, and one jit
    compile per function is much cheaper on CPU than eager op-by-op dispatch.
    """

    def __getattr__(self, name):
        fn = getattr(L, name)
        return lambda *args, **static: _jitted(fn, tuple(sorted(static.items())))(*args)


J = _Jit()


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def ragged_mask(rng, B, T, empty_row=True):
    """Right-padded 0/1 masks of random lengths; one full row, one empty row."""
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T  # a completion that hit the length limit (no EOS)
    if empty_row:
        lengths[-1] = 0
    return (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)


def rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------- references


def np_masked_mean(x, m):
    return x[m > 0].astype(np.float64).mean()


def np_masked_var(x, m):
    return x[m > 0].astype(np.float64).var(ddof=1)


def np_kl_rewards(scores, old, ref, m, beta):
    B, T = m.shape
    kl = np.zeros((B, T))
    rew = np.zeros((B, T))
    for b in range(B):
        valid = [t for t in range(T) if m[b, t] > 0]
        for t in valid:
            kl[b, t] = float(old[b, t]) - float(ref[b, t])
            rew[b, t] = -beta * kl[b, t]
        if valid:
            rew[b, valid[-1]] += scores[b]
    return rew, kl


def np_gae(rew, val, m, gamma, lam):
    B, T = m.shape
    adv = np.zeros((B, T))
    for b in range(B):
        v = [float(val[b, t]) if m[b, t] else 0.0 for t in range(T)] + [0.0]
        r = [float(rew[b, t]) if m[b, t] else 0.0 for t in range(T)]
        running = 0.0
        for t in reversed(range(T)):
            running = r[t] + gamma * v[t + 1] - v[t] + gamma * lam * running
            adv[b, t] = running if m[b, t] else 0.0
    ret = np.where(m > 0, adv + np.where(m > 0, val, 0.0), 0.0)
    return adv, ret


def reft_authors_layout(scores, old_lp, ref_lp, val, P_len, eos_at, L_len, beta, gamma, lam):
    """The ReFT authors' ``rollout`` indexing on full prompt+completion rows.

    Arrays are over full sequences of length ``L_len``; ``*_lp`` have
    ``L_len - 1`` entries (logits at p predict token p+1). ``eos_at[b]`` is the
    EOS position in the full row or None. Returns (rew, adv, ret) in the
    full-row layout, transcribed from mwp_ReFT ``train_rl_reft.py``.
    """
    B = len(scores)
    mask = np.zeros((B, L_len))
    mask[:, P_len - 1:-1] = 1
    score_rew = np.zeros((B, L_len))
    score_rew[:, -2] = scores
    for b, tidx in enumerate(eos_at):
        if tidx is not None:
            mask[b, tidx:] = 0
            score_rew[b, tidx:] = 0
            score_rew[b, tidx - 1] = scores[b]
    kl_rew = np.zeros((B, L_len))
    kl_rew[:, :-1] = -(old_lp - ref_lp) * mask[:, :-1]
    rew = score_rew + beta * kl_rew
    val = val * mask
    adv = np.zeros_like(rew)
    for i in range(B):
        delta = -val[i, :-1] + rew[i, :-1] + gamma * val[i, 1:]
        cur = np.zeros_like(delta)
        running = 0.0
        for t in reversed(range(len(delta))):
            running = delta[t] + gamma * lam * running
            cur[t] = running
        cur[:P_len - 1] = 0
        adv[i, :-1] = cur
    ret = adv + val
    return rew * mask, adv * mask, ret * mask, mask


def np_aggregate(per_tok, m, loss_agg):
    if loss_agg == "token-mean":
        return per_tok[m > 0].sum() / (m > 0).sum()
    rows = [per_tok[b][m[b] > 0].sum() / max((m[b] > 0).sum(), 1) for b in range(len(m))]
    return float(np.mean(rows))


def np_log_softmax(z):
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ---------------------------------------------------------------- masked stats


def test_masked_mean_var_whiten_match_numpy():
    rng = np.random.default_rng(0)
    x, m = rand(rng, 6, 9, scale=3.0) + 2.0, ragged_mask(rng, 6, 9)
    close(J.masked_mean(x, m), np_masked_mean(x, m))
    close(J.masked_var(x, m), np_masked_var(x, m))
    vals = x[m > 0].astype(np.float64)
    close(J.masked_var(x, m, unbiased=False), vals.var())
    row_means = [x[b][m[b] > 0].mean() if m[b].any() else 0.0 for b in range(6)]
    close(J.masked_mean(x, m, axis=1), row_means)
    row_vars = [x[b][m[b] > 0].astype(np.float64).var(ddof=1) if m[b].sum() > 1 else 0.0
                for b in range(6)]
    close(J.masked_var(x, m, axis=1), row_vars, rtol=1e-4)
    expected = np.where(m > 0, (x - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8), 0.0)
    w = J.masked_whiten(x, m)
    close(w, expected, rtol=1e-4, atol=1e-5)
    close(J.masked_whiten(x, m, shift_mean=False), np.where(m > 0, expected + vals.mean(), 0.0),
          rtol=1e-4, atol=1e-5)
    assert abs(float(J.masked_mean(w, m))) < 1e-5
    close(J.masked_var(w, m), 1.0, rtol=1e-4)


def test_masked_stats_ignore_garbage_and_empty_mask():
    x = jnp.array([[1.0, 3.0, jnp.inf], [jnp.nan, 0.0, 0.0]])
    m = jnp.array([[1, 1, 0], [0, 0, 0]])
    assert float(J.masked_mean(x, m)) == 2.0
    close(J.masked_mean(x, m, axis=1), [2.0, 0.0])  # empty row -> 0, not NaN
    assert float(J.masked_mean(x, jnp.zeros_like(m))) == 0.0
    assert float(J.masked_var(jnp.ones(3), jnp.array([0, 1, 0]))) == 0.0


def test_whitening_is_global_over_sharded_batch():
    """Inside jit with the batch sharded over 8 devices the stats are global."""
    devices = np.array(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs 8 (fake CPU) devices")
    mesh = jax.sharding.Mesh(devices, ("data",))
    rng = np.random.default_rng(1)
    # Each shard gets its own offset so per-shard whitening would differ.
    x = rand(rng, 16, 5) + np.repeat(np.arange(8.0), 2)[:, None].astype(np.float32)
    m = ragged_mask(rng, 16, 5, empty_row=False)
    spec = NamedSharding(mesh, P("data", None))
    xs, ms = jax.device_put(x, spec), jax.device_put(m, spec)
    w = jax.jit(L.masked_whiten)(xs, ms)
    vals = x[m > 0].astype(np.float64)
    expected = np.where(m > 0, (x - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8), 0.0)
    close(w, expected, rtol=1e-4, atol=1e-5)
    local = np.asarray(J.masked_whiten(x[:2], m[:2]))
    assert not np.allclose(local, expected[:2], atol=1e-2)


# ---------------------------------------------------------------- rewards, GAE


def test_kl_shaped_rewards_match_reference():
    rng = np.random.default_rng(2)
    B, T = 7, 11
    m = ragged_mask(rng, B, T)
    scores = rng.choice([0.0, 0.1, 1.0], size=B).astype(np.float32)
    scores[-1] = 1.0  # the empty row's: it drew 0, so "no score" below checked nothing (mutation review, session 44)
    old, ref = rand(rng, B, T), rand(rng, B, T)
    rew, kl = J.kl_shaped_rewards(scores, old, ref, m, 0.05)
    exp_rew, exp_kl = np_kl_rewards(scores, old, ref, m, 0.05)
    close(rew, exp_rew)
    close(kl, exp_kl)
    assert not np.any(np.asarray(rew)[-1])  # empty row: no score, no KL
    assert np.asarray(rew)[0, -1] == pytest.approx(scores[0] - 0.05 * (old[0, -1] - ref[0, -1]),
                                                     rel=1e-5)  # no EOS: last token


def test_gae_matches_loop_reference():
    rng = np.random.default_rng(3)
    B, T = 6, 13
    m = ragged_mask(rng, B, T)
    rew, val = rand(rng, B, T), rand(rng, B, T)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        adv, ret = J.gae(rew, val, m, gamma=gamma, lam=lam)
        exp_adv, exp_ret = np_gae(rew, val, m, gamma, lam)
        close(adv, exp_adv)
        close(ret, exp_ret)
    assert not np.any(np.asarray(adv)[-1]) and not np.any(np.asarray(ret)[-1])
    # lambda = 1, gamma = 1: advantage = reward-to-go minus value.
    rtg = np.cumsum((rew * m)[:, ::-1], axis=1)[:, ::-1]
    close(adv, np.where(m > 0, rtg - val, 0.0))


def test_rewards_and_gae_match_reft_authors_full_row_layout():
    """Completion-aligned arrays reproduce the authors' full-row indexing."""
    rng = np.random.default_rng(4)
    B, P_len, L_len = 5, 4, 14
    eos_at = [None, 6, 9, P_len, 13]  # no EOS; mid; EOS first token; EOS last token
    scores = np.array([1.0, 0.1, 0.0, 1.0, 0.1])
    old_lp, ref_lp = rng.standard_normal((B, L_len - 1)), rng.standard_normal((B, L_len - 1))
    val = rng.standard_normal((B, L_len))
    beta, gamma, lam = 0.05, 1.0, 0.95
    rew_full, adv_full, ret_full, mask_full = reft_authors_layout(
        scores, old_lp, ref_lp, val, P_len, eos_at, L_len, beta, gamma, lam)
    # Completion token t sits at full position P_len + t, predicted at P_len - 1 + t.
    sl = slice(P_len - 1, L_len - 1)
    m = mask_full[:, sl]
    tokens_are_eos = np.zeros_like(m)
    for b, tidx in enumerate(eos_at):
        if tidx is not None:
            tokens_are_eos[b, tidx - P_len] = 1
    # Mask convention: 1 up to and including EOS.
    for b in range(B):
        ones = np.nonzero(m[b])[0]
        assert ones[0] == 0 and (eos_at[b] is None or tokens_are_eos[b, ones[-1]])
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    rew, _ = J.kl_shaped_rewards(f32(scores), f32(old_lp[:, sl]), f32(ref_lp[:, sl]), m, beta)
    adv, ret = J.gae(rew, f32(val[:, sl]), m, gamma=gamma, lam=lam)
    close(rew, rew_full[:, sl])
    close(adv, adv_full[:, sl], atol=1e-5)
    close(ret, ret_full[:, sl], atol=1e-5)


# ---------------------------------------------------------------- PPO losses


def np_ppo_policy(logp, old, adv, m, eps, loss_agg, eps_high=None):
    eps_high = eps if eps_high is None else eps_high
    B, T = m.shape
    per = np.zeros((B, T))
    clipped = []
    for b in range(B):
        for t in range(T):
            rho = np.exp(float(logp[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            u, c = -a * rho, -a * min(max(rho, 1 - eps), 1 + eps_high)
            per[b, t] = max(u, c)
            if m[b, t]:
                clipped.append(c > u)
    return np_aggregate(per, m, loss_agg), np.mean(clipped)


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean"])
def test_ppo_policy_loss_matches_reference(loss_agg):
    rng = np.random.default_rng(5)
    B, T = 6, 10
    m = ragged_mask(rng, B, T)
    logp, old = rand(rng, B, T, scale=0.3) - 1.0, rand(rng, B, T, scale=0.3) - 1.0
    adv = rand(rng, B, T)
    loss, met = J.ppo_policy_loss(logp, old, adv, m, clip_eps=0.2, loss_agg=loss_agg)
    exp_loss, exp_clip = np_ppo_policy(logp, old, adv, m, 0.2, loss_agg)
    close(loss, exp_loss)
    close(met["clipfrac"], exp_clip)
    assert 0.0 < exp_clip < 1.0
    lr = (logp - old).astype(np.float64)
    close(met["approx_kl"], np_masked_mean(np.exp(lr) - 1 - lr, m))
    close(met["ratio_mean"], np_masked_mean(np.exp(lr), m))
    # DAPO's clip-higher (TRL's epsilon_high): a wider range above 1 than below changes the loss where rho > 1.2
    high, hmet = J.ppo_policy_loss(logp, old, adv, m, clip_eps=0.2, loss_agg=loss_agg, clip_eps_high=0.28)
    exp_high, exp_hclip = np_ppo_policy(logp, old, adv, m, 0.2, loss_agg, eps_high=0.28)
    close(high, exp_high)
    close(hmet["clipfrac"], exp_hclip)
    assert abs(exp_high - exp_loss) > 1e-4 and exp_hclip < exp_clip


def test_ppo_policy_loss_clip_boundaries_and_gradient():
    """Ratio 1.3 with clip 0.2: clipped for A > 0 (no grad), not for A < 0."""
    logp = jnp.log(jnp.array([[1.3, 1.3, 1.1, 0.7, 1.0]]))
    old = jnp.zeros((1, 5))
    adv = jnp.array([[1.0, -1.0, 1.0, -1.0, 2.0]])
    m = jnp.array([[1, 1, 1, 1, 0]])
    f = lambda lp: J.ppo_policy_loss(lp, old, adv, m, 0.2, loss_agg="token-mean")  # noqa: E731
    (loss, met), grad = jax.value_and_grad(f, has_aux=True)(logp)
    # Per token: -1.2 (clipped), +1.3, -1.1, +0.8 (clipped: max(0.7, 0.8)), padding ignored.
    close(loss, (-1.2 + 1.3 - 1.1 + 0.8) / 4)
    close(met["clipfrac"], 0.5)
    g = np.asarray(grad)[0]
    assert g[0] == 0 and g[3] == 0 and g[4] == 0
    close(g[1:3], [1.3 / 4, -1.1 / 4])  # d(-A rho)/dlogp = -A rho, over 4 tokens


def np_value_loss(v, v_old, ret, m, c, loss_agg):
    B, T = m.shape
    per = np.zeros((B, T))
    clipped = []
    for b in range(B):
        for t in range(T):
            vc = min(max(float(v[b, t]), float(v_old[b, t]) - c), float(v_old[b, t]) + c)
            e1, e2 = (float(v[b, t]) - float(ret[b, t])) ** 2, (vc - float(ret[b, t])) ** 2
            per[b, t] = max(e1, e2)
            if m[b, t]:
                clipped.append(e2 > e1)
    return 0.5 * np_aggregate(per, m, loss_agg), np.mean(clipped)


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean"])
def test_ppo_value_loss_matches_reference(loss_agg):
    rng = np.random.default_rng(6)
    B, T = 5, 9
    m = ragged_mask(rng, B, T)
    v_old, ret = rand(rng, B, T), rand(rng, B, T)
    v = v_old + rand(rng, B, T, scale=0.4)
    loss, met = J.ppo_value_loss(v, v_old, ret, m, 0.2, loss_agg=loss_agg)
    exp_loss, exp_clip = np_value_loss(v, v_old, ret, m, 0.2, loss_agg)
    close(loss, exp_loss)
    close(met["vf_clipfrac"], exp_clip)
    assert 0.0 < exp_clip < 1.0


def test_explained_variance():
    rng = np.random.default_rng(7)
    m = ragged_mask(rng, 4, 8)
    ret, v = rand(rng, 4, 8), rand(rng, 4, 8, scale=0.5)
    exp = 1 - np_masked_var(ret - v, m) / (np_masked_var(ret, m) + 1e-8)
    close(J.explained_variance(v, ret, m), exp)
    close(J.explained_variance(ret, ret, m), 1.0)
    close(J.explained_variance(ret + 5.0 * rand(rng, 4, 8), ret, m), -1.0)  # truncated
    # one valid token (a minibatch of one 1-token completion) has no variance to explain: it read 1, a perfect
    # critic, whatever the error (helper review); none reads 0 too
    one = np.zeros((4, 8), np.float32)
    one[2, 0] = 1
    close(J.explained_variance(v, ret, one), 0.0)
    close(J.explained_variance(v, ret, np.zeros_like(one)), 0.0)


def test_entropy_at_a_low_temperature_does_not_cancel():
    """The entropy was `lse - sum(p * z)`, two terms of ~max(z) each: at T = 0.01 (z = logits / T) float32 left 0.36
    nats of error and reported a negative entropy (helper review). Both the full-logits and the fused head paths
    against float64, on logits shaped like an LM's (two near-tied top tokens over a long tail)."""
    rng = np.random.default_rng(3)
    V, D = 4096, 16
    h = rng.normal(size=(2, 3, D)).astype(np.float32)
    w = (rng.normal(size=(V, D)) * 0.3).astype(np.float32)
    w[7], w[9] = 3.0 * h[0, 0] / np.linalg.norm(h[0, 0]), 3.0 * h[0, 0] / np.linalg.norm(h[0, 0]) + 1e-3
    targets = np.zeros((2, 3), np.int32)
    for t_inv in (1.0, 10.0, 100.0):
        z64 = np.einsum("btd,vd->btv", h.astype(np.float64), w.astype(np.float64)) * t_inv
        ls = z64 - z64.max(-1, keepdims=True)
        ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
        ent = -(np.exp(ls) * ls).sum(-1)
        z32 = (np.einsum("btd,vd->btv", h, w) * np.float32(t_inv)).astype(np.float32)
        full = np.asarray(J.token_entropy(z32))
        fused = np.asarray(L.fused_token_logprobs(jnp.asarray(h), jnp.asarray(w), targets, logit_scale=t_inv)[1])
        assert (full >= 0).all() and (fused >= 0).all(), t_inv
        np.testing.assert_allclose(full, ent, atol=5e-5, err_msg=str(t_inv))  # ~1e-5 measured (0.031 before)
        np.testing.assert_allclose(fused, ent, atol=5e-5, err_msg=str(t_inv))


# ---------------------------------------------------------------- logits


def test_token_logprobs_entropy_and_sft_loss():
    rng = np.random.default_rng(8)
    B, T, V = 3, 7, 50
    logits = rand(rng, B, T, V, scale=3.0)
    targets = rng.integers(0, V, size=(B, T))
    targets[0, :3] = logits[0, :3].argmax(-1)  # guarantee some correct predictions
    m = ragged_mask(rng, B, T)
    ls = np_log_softmax(logits)
    exp_lp = np.take_along_axis(ls, targets[..., None], -1)[..., 0]
    close(J.token_logprobs(logits, targets), exp_lp)
    ent = -(np.exp(ls) * ls).sum(-1)
    close(J.token_entropy(logits), ent, rtol=1e-5, atol=1e-5)
    close(J.entropy_from_logits(logits, m), np_masked_mean(ent, m))
    loss, met = J.sft_loss(logits, targets, m)
    close(loss, np_masked_mean(-exp_lp, m))
    acc = np_masked_mean((logits.argmax(-1) == targets).astype(np.float64), m)
    assert 0 < acc < 1
    close(met["token_accuracy"], acc)
    assert float(met["n_tokens"]) == m.sum()


def test_logprobs_stable_and_float32_for_bf16_and_huge_logits():
    rng = np.random.default_rng(9)
    logits = jnp.asarray(rand(rng, 2, 4, 16, scale=5.0), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 16, size=(2, 4)))
    lp = J.token_logprobs(logits, targets)
    assert lp.dtype == jnp.float32
    exp_lp = np.take_along_axis(np_log_softmax(np.asarray(logits, np.float32)),
                                np.asarray(targets)[..., None], -1)[..., 0]
    close(lp, exp_lp)
    assert J.token_entropy(logits).dtype == jnp.float32
    huge = jnp.array([[[1e4, 0.0, -1e4]]], jnp.float32)
    close(J.token_logprobs(huge, jnp.array([[1]])), [[-1e4]], rtol=1e-6)
    close(J.token_entropy(huge), [[0.0]])


def np_fused_head(h, w, targets, m, vocab_major):
    """NumPy float64: token-mean NLL of softmax(h @ W), accuracy, and its gradients wrt h and W."""
    h, w = h.astype(np.float64), w.astype(np.float64)
    W = w if vocab_major else w.T  # [V, D]
    z = h @ W.T
    ls = np_log_softmax(z)
    n = max(m.sum(), 1.0)
    nll = -(np.take_along_axis(ls, targets[..., None], -1)[..., 0] * m).sum() / n
    acc = ((z.argmax(-1) == targets) * m).sum() / n
    dz = (np.exp(ls) - np.eye(z.shape[-1])[targets]) * m[..., None] / n
    dh, dW = dz @ W, np.einsum("btv,btd->vd", dz, h)
    return nll, acc, dh, (dW if vocab_major else dW.T)


@pytest.mark.parametrize("vocab_major", [True, False])
@pytest.mark.parametrize("chunk_rows", [0, 8, 12, 100])
def test_fused_sft_loss_matches_numpy_loss_and_gradients(vocab_major, chunk_rows):
    """Head + cross-entropy in sequence chunks (gradients formed in the forward) equals the NumPy loss,
    accuracy and both gradients, whatever the chunking (1, 6, 4 and 1 chunks of T=12 for B=4)."""
    rng = np.random.default_rng(21)
    B, T, D, V = 4, 12, 6, 40
    h = rand(rng, B, T, D)
    w = rand(rng, V, D) if vocab_major else rand(rng, D, V)
    targets = rng.integers(0, V, size=(B, T))
    zt = h @ (w if vocab_major else w.T).T
    targets[1, :5] = zt[1, :5].argmax(-1)  # some correct predictions
    m = ragged_mask(rng, B, T)

    def f(h, w):
        return L.fused_sft_loss(h, w, targets, m, vocab_major=vocab_major, chunk_rows=chunk_rows)

    (loss, met), (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)
    nll, acc, exp_dh, exp_dw = np_fused_head(h, w, targets, m, vocab_major)
    close(loss, nll)
    assert 0 < acc < 1
    close(met["token_accuracy"], acc)
    assert float(met["n_tokens"]) == m.sum()
    close(dh, exp_dh)
    close(dw, exp_dw)
    # the plain path (full logits + sft_loss) gives the same loss value
    plain = L.sft_loss(jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", h, w), targets, m)[0]
    close(loss, float(plain))


def test_fused_sft_loss_chunks_and_float64_gradient():
    assert [L.head_chunks(8, 256, r) for r in (512, 2048, 0, 1, 3000)] == [4, 1, 1, 256, 1]
    assert L.head_chunks(4, 12, 8) == 6 and L.head_chunks(3, 10, 4) == 5  # a divisor of the length
    rng = np.random.default_rng(22)
    B, T, D, V = 2, 4, 3, 7
    m = ragged_mask(rng, B, T)
    targets = jnp.asarray(rng.integers(0, V, size=(B, T)))
    with jax.enable_x64(True):
        h, w = jnp.asarray(rng.standard_normal((B, T, D))), jnp.asarray(rng.standard_normal((V, D)))
        check_grads(lambda h, w: L.fused_sft_loss(h, w, targets, m, chunk_rows=2)[0], (h, w),
                    order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
        assert L.fused_sft_loss(h, w, targets, m)[0].dtype == jnp.float64



@pytest.mark.parametrize("vocab_major", [True, False])
@pytest.mark.parametrize("chunk_rows", [0, 8, 12, 100])
def test_fused_token_logprobs_match_numpy_values_and_gradients(vocab_major, chunk_rows):
    """The RL head in sequence chunks (logits recomputed in the backward): log-probs of the targets and entropies
    equal NumPy's, and so do the gradients wrt hidden and head under arbitrary cotangents on both outputs. The
    head-major cases scale the logits by 1 / 0.7 (a sampling temperature), the others leave them."""
    scale = 1.0 if vocab_major else 1 / 0.7
    rng = np.random.default_rng(23)
    B, T, D, V = 4, 12, 6, 40
    h = rand(rng, B, T, D)
    w = rand(rng, V, D) if vocab_major else rand(rng, D, V)
    targets = rng.integers(0, V, size=(B, T))
    g_logp, g_ent = rand(rng, B, T), rand(rng, B, T)

    def f(h, w):
        logp, ent = L.fused_token_logprobs(h, w, targets, vocab_major=vocab_major, chunk_rows=chunk_rows,
                                           logit_scale=scale)
        return jnp.sum(logp * g_logp + ent * g_ent), (logp, ent)

    (_, (logp, ent)), (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)
    W = (w if vocab_major else w.T).astype(np.float64)  # [V, D]
    ls = np_log_softmax(scale * (h.astype(np.float64) @ W.T))
    p = np.exp(ls)
    H = -(p * ls).sum(-1)
    close(logp, np.take_along_axis(ls, targets[..., None], -1)[..., 0])
    close(ent, H)
    dz = scale * (g_logp[..., None] * (np.eye(V)[targets] - p) - g_ent[..., None] * p * (ls + H[..., None]))
    tol = dict(rtol=RTOL * scale**2, atol=ATOL * scale**2)  # float32 sums of larger, sharper terms
    close(dh, dz @ W, **tol)
    dW = np.einsum("btv,btd->vd", dz, h)
    close(dw, dW if vocab_major else dW.T, **tol)
    # the plain path (full logits) gives the same values
    z = jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", h, w) * scale
    close(logp, L.token_logprobs(z, targets))
    close(ent, L.token_entropy(z))


def test_fused_token_logprobs_float64_gradient():
    rng = np.random.default_rng(24)
    B, T, D, V = 2, 4, 3, 7
    targets = jnp.asarray(rng.integers(0, V, size=(B, T)))
    a, b = rng.standard_normal((B, T)), rng.standard_normal((B, T))
    with jax.enable_x64(True):
        h, w = jnp.asarray(rng.standard_normal((B, T, D))), jnp.asarray(rng.standard_normal((V, D)))

        def f(h, w):
            logp, ent = L.fused_token_logprobs(h, w, targets, chunk_rows=2, logit_scale=scale)
            return jnp.sum(logp * a + ent * b)

        for scale in (1.0, 1 / 0.7):
            check_grads(f, (h, w), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
        assert L.fused_token_logprobs(h, w, targets)[0].dtype == jnp.float64


@pytest.mark.parametrize("vocab_major", [True, False])
def test_fused_heads_soft_cap_their_logits_as_the_plain_path_with_its_gradients(vocab_major):
    """Gemma 2's final logit soft-cap (cap * tanh(logits / cap)) in the chunked heads: the SFT loss, log-probs and
    entropies and their gradients equal autodiff of the plain path on capped full logits (at temperature 0.7 for
    the RL head), and float64 finite differences agree with the hand-written backward."""
    rng = np.random.default_rng(25)
    B, T, D, V, cap, scale = 4, 12, 6, 40, 1.5, 1 / 0.7
    h = rand(rng, B, T, D)
    w = rand(rng, V, D) if vocab_major else rand(rng, D, V)
    targets = rng.integers(0, V, size=(B, T))
    m = ragged_mask(rng, B, T)
    g_logp, g_ent = rand(rng, B, T), rand(rng, B, T)
    logits = lambda h, w: jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", h, w)  # noqa: E731
    capped = lambda h, w: cap * jnp.tanh(logits(h, w) / cap)  # noqa: E731
    assert float(jnp.max(jnp.abs(logits(h, w)))) > 2 * cap  # the cap bites

    def rl(fused):
        def f(h, w):
            if fused:
                logp, ent = L.fused_token_logprobs(h, w, targets, vocab_major=vocab_major, chunk_rows=8,
                                                   logit_scale=scale, logit_softcap=cap)
            else:
                z = capped(h, w) * scale
                logp, ent = L.token_logprobs(z, targets), L.token_entropy(z)
            return jnp.sum(logp * g_logp + ent * g_ent)
        return f

    def sft(fused):
        if fused:
            return lambda h, w: L.fused_sft_loss(h, w, targets, m, vocab_major=vocab_major, chunk_rows=8,
                                                 logit_softcap=cap)[0]
        return lambda h, w: L.sft_loss(capped(h, w), targets, m)[0]

    for make in (rl, sft):
        (ours, g_ours), (ref, g_ref) = (jax.value_and_grad(make(f), argnums=(0, 1))(h, w) for f in (True, False))
        close(ours, ref)
        for a, b in zip(g_ours, g_ref):
            close(a, b)
    with jax.enable_x64(True):
        h64, w64 = jnp.asarray(h, jnp.float64), jnp.asarray(w, jnp.float64)
        for make in (rl, sft):
            check_grads(make(True), (h64, w64), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- GRPO


def test_grpo_and_rloo_advantages():
    rng = np.random.default_rng(10)
    G = 4
    scores = rng.choice([0.0, 0.1, 1.0], size=12).astype(np.float32)
    scores[8:] = 1.0  # a group with identical scores: zero advantage, no NaN
    exp, exp_unscaled, exp_batch, exp_rloo = [], [], [], []
    batch_std = scores.astype(np.float64).std(ddof=1)
    for g in range(3):
        r = scores[g * G:(g + 1) * G].astype(np.float64)
        for i in range(G):
            exp.append((r[i] - r.mean()) / (r.std(ddof=1) + 1e-4))
            exp_unscaled.append(r[i] - r.mean())
            exp_batch.append((r[i] - r.mean()) / (batch_std + 1e-4))
            exp_rloo.append(r[i] - np.mean([r[j] for j in range(G) if j != i]))
    close(J.grpo_advantages(scores, group_size=G), exp, rtol=1e-5, atol=1e-4)
    close(J.grpo_advantages(scores, group_size=G, scale="none"), exp_unscaled)  # Dr. GRPO
    close(J.grpo_advantages(scores, group_size=G, scale="batch"), exp_batch, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scale must be one of"):
        J.grpo_advantages(scores, group_size=G, scale="std")
    close(J.rloo_advantages(scores, group_size=G), exp_rloo)
    assert not np.any(np.asarray(J.grpo_advantages(scores, group_size=G))[8:])
    with pytest.raises(ValueError, match="multiple of group_size"):
        J.grpo_advantages(scores, group_size=5)
    with pytest.raises(ValueError, match=">= 2"):
        J.rloo_advantages(scores, group_size=1)


def np_grpo(logp, old, ref, adv, m, eps, beta, loss_agg, eps_high=None):
    eps_high = eps if eps_high is None else eps_high
    B, T = m.shape
    per = np.zeros((B, T))
    kls = []
    for b in range(B):
        for t in range(T):
            lp = float(logp[b, t])
            rho = np.exp(lp - float(old[b, t]))
            a = float(adv[b])
            d = float(ref[b, t]) - lp
            k3 = np.exp(d) - d - 1
            per[b, t] = -min(rho * a, min(max(rho, 1 - eps), 1 + eps_high) * a) + beta * k3
            if m[b, t]:
                kls.append(k3)
    return np_aggregate(per, m, loss_agg), np.mean(kls)


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean"])
def test_grpo_loss_matches_reference(loss_agg):
    rng = np.random.default_rng(11)
    B, T = 8, 9
    m = ragged_mask(rng, B, T)
    logp = rand(rng, B, T, scale=0.3) - 1.0
    old = logp + rand(rng, B, T, scale=0.3)
    ref = logp + rand(rng, B, T, scale=0.5)
    adv = J.grpo_advantages(rng.random(B).astype(np.float32), group_size=4)
    loss, met = J.grpo_loss(logp, old, ref, adv, m, 0.2, 0.04, loss_agg=loss_agg)
    exp_loss, exp_kl = np_grpo(logp, old, ref, np.asarray(adv), m, 0.2, 0.04, loss_agg)
    close(loss, exp_loss)
    close(met["kl_k3"], exp_kl)
    assert exp_kl > 0
    # pg_loss is the surrogate alone (it was the whole loss, KL term included, for GRPO/RLOO)
    close(met["pg_loss"], np_grpo(logp, old, ref, np.asarray(adv), m, 0.2, 0.0, loss_agg)[0])
    assert abs(float(met["pg_loss"]) - float(loss)) > 1e-4
    high, _ = J.grpo_loss(logp, old, ref, adv, m, 0.2, 0.04, loss_agg=loss_agg, clip_eps_high=0.28)
    exp_high = np_grpo(logp, old, ref, np.asarray(adv), m, 0.2, 0.04, loss_agg, eps_high=0.28)[0]
    close(high, exp_high)
    assert abs(exp_high - exp_loss) > 1e-4  # (the clip above 1 is active somewhere)
    with pytest.raises(ValueError, match="loss_agg"):
        J.grpo_loss(logp, old, ref, adv, m, loss_agg="sum")
    # near the reference k3 ~ d^2 / 2; exp(d) - d - 1 cancelled to exactly 0 in float32 (review, session 30)
    d = np.float32(3e-4)
    _, near = J.grpo_loss(logp, logp, logp + d, np.zeros(B, np.float32), m, 0.2, 0.04, loss_agg=loss_agg)
    assert float(near["kl_k3"]) == pytest.approx(float(d) ** 2 / 2, rel=1e-2)


# ---------------------------------------------------------------- gradients, jit, edges


def test_gradients_match_finite_differences_in_float64():
    rng = np.random.default_rng(12)
    B, T, V = 3, 5, 7
    m = ragged_mask(rng, B, T)
    with jax.enable_x64(True):
        f64 = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s) * scale)  # noqa: E731
        old, adv, ref = f64(B, T, scale=0.3) - 1.0, f64(B, T), f64(B, T, scale=0.3) - 1.0
        v_old, ret = f64(B, T), f64(B, T)
        adv_B = f64(B)
        targets = jnp.asarray(rng.integers(0, V, size=(B, T)))
        kw = dict(order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
        check_grads(lambda lp: J.ppo_policy_loss(lp, old, adv, m)[0],
                    (old + f64(B, T, scale=0.1),), **kw)
        check_grads(lambda v: J.ppo_value_loss(v, v_old, ret, m)[0],
                    (v_old + f64(B, T, scale=0.3),), **kw)
        check_grads(lambda lp: J.grpo_loss(lp, old, ref, adv_B, m, kl_coef=0.1)[0],
                    (old + f64(B, T, scale=0.1),), **kw)
        check_grads(lambda z: J.sft_loss(z, targets, m)[0], (f64(B, T, V),), **kw)
        assert J.sft_loss(f64(B, T, V), targets, m)[0].dtype == jnp.float64


def test_jitted_functions_do_not_recompile_on_new_data():
    """Same shapes, new values, new traced kl_coef: no new compile."""
    B, T, V = 4, 6, 11
    m = ragged_mask(np.random.default_rng(13), B, T)
    fns = (L.kl_shaped_rewards, L.gae, L.ppo_policy_loss, L.grpo_loss, L.sft_loss)
    sizes = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        a, b, c = rand(rng, B, T), rand(rng, B, T), rand(rng, B, T)
        scores, logits = rand(rng, B), rand(rng, B, T, V)
        targets = rng.integers(0, V, size=(B, T))
        J.kl_shaped_rewards(scores, a, b, m, np.float32(0.05 + seed))
        J.gae(a, b, m)
        J.ppo_policy_loss(a, b, c, m)
        J.grpo_loss(a, b, c, scores, m)
        J.sft_loss(logits, targets, m)
        sizes.append([_jitted(fn, ())._cache_size() for fn in fns])
    assert sizes[0] == sizes[1]


def test_empty_rows_and_garbage_padding_give_finite_losses_and_grads():
    rng = np.random.default_rng(14)
    B, T = 3, 5
    m = ragged_mask(rng, B, T)  # last row empty
    pad = m == 0
    logp = rand(rng, B, T, scale=0.2) - 1.0
    old = np.where(pad, -np.inf, logp + rand(rng, B, T, scale=0.2)).astype(np.float32)
    ref = np.where(pad, np.nan, logp).astype(np.float32)
    adv = np.where(pad, np.nan, rand(rng, B, T)).astype(np.float32)
    for agg in L.LOSS_AGGREGATIONS:
        grads = jax.jit(jax.grad(
            lambda lp: L.ppo_policy_loss(lp, old, adv, m, loss_agg=agg)[0]  # noqa: B023
            + L.grpo_loss(lp, old, ref, adv[:, 0], m, loss_agg=agg)[0]))(logp)  # noqa: B023
        assert np.all(np.isfinite(grads)) and not np.any(np.asarray(grads)[pad])
    loss, met = J.ppo_policy_loss(logp, old, adv, np.zeros_like(m))
    assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in met.values())
    # seq-mean-token-mean counts the empty row as 0 in the batch mean (ReFT's clamp(min=1)).
    per_row = np.array([1.0, 2.0, 0.0])
    ones = np.ones((B, T), np.float32)
    close(J.ppo_value_loss(ones * per_row[:, None] ** 0.5, ones * per_row[:, None] ** 0.5,
                           np.zeros((B, T), np.float32), m)[0],
          0.5 * np.mean(np.where(m.any(1), per_row, 0.0)))


# ---------------------------------------------------------------- second mutation review (helper a46)


def test_whitening_without_spread_gives_zeros_and_eps_sits_under_the_root():
    """`masked_whiten` adds eps to the variance: advantages without spread (all equal, or one valid token) whiten to
    0, not NaN (0 * rsqrt(0)), and at a variance of the order of eps the result is (x - mean) / sqrt(var + 1e-8) (a
    second mutation review dropped eps unnoticed)."""
    m = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    x = np.where(m > 0, 0.7, 9.0).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(J.masked_whiten(x, m)), 0.0)
    one = np.zeros_like(m)
    one[0, 1] = 1
    np.testing.assert_array_equal(np.asarray(J.masked_whiten(x, one)), 0.0)
    y = 1e-4 * rand(np.random.default_rng(30), 2, 4)
    vals = y[m > 0].astype(np.float64)
    close(J.masked_whiten(y, m), np.where(m > 0, (y - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8), 0.0),
          rtol=1e-3, atol=1e-4)


def test_grpo_advantage_eps_is_added_to_the_group_standard_deviation():
    """TRL's (r - mean) / (std + 1e-4): at a small group spread (std 0.005) eps is 2% of the scale, so eps under the
    square root (sqrt(var + eps)) or another eps shows; the other tests' groups had std ~0.5, where the two agree."""
    scores = np.array([0.0, 0.0, 0.0, 0.01, 0.0, 0.01, 0.01, 0.02], np.float32)
    want = []
    for g in range(2):
        r = scores[4 * g:4 * g + 4].astype(np.float64)
        want.extend((r - r.mean()) / (r.std(ddof=1) + 1e-4))
    close(J.grpo_advantages(scores, group_size=4), want, rtol=1e-4, atol=1e-4)


def test_grpo_clipfrac_and_ratio_mean_match_reference():
    """`grpo_loss`'s clipfrac counts the valid tokens whose clipped surrogate is the smaller one (ratio above
    1 + eps_high with A > 0, below 1 - eps with A < 0: TRL's clip region; none where A = 0) and ratio_mean is the
    masked mean ratio; the other tests only asserted clipfrac > 0.05 (second mutation review)."""
    rng = np.random.default_rng(31)
    B, T = 8, 9
    m = ragged_mask(rng, B, T)
    old = rand(rng, B, T, scale=0.3) - 1.0
    logp = old + rand(rng, B, T, scale=0.3)
    adv = np.array([1.0, -1.0, 0.5, -0.5, 0.0, 2.0, -2.0, 1.0], np.float32)
    rho = np.exp(logp.astype(np.float64) - old)
    for eps_high in (None, 0.28):
        _, met = J.grpo_loss(logp, old, old, adv, m, 0.2, 0.04, clip_eps_high=eps_high)
        high = 1.0 + (0.2 if eps_high is None else eps_high)
        clipped = ((adv[:, None] > 0) & (rho > high)) | ((adv[:, None] < 0) & (rho < 0.8))
        close(met["clipfrac"], np_masked_mean(clipped.astype(np.float64), m))
        assert 0.05 < float(met["clipfrac"]) < 0.5
        close(met["ratio_mean"], np_masked_mean(rho, m))
    assert ((rho > 1.2) & (m > 0))[adv < 0].any() and ((rho > 1.2) & (m > 0))[adv == 0].any()  # (counted by none)


# ---------------------------------------------------------------- third mutation review (helper x50b)


def test_explained_variance_of_returns_without_spread_is_one_not_nan():
    """`explained_variance` adds 1e-8 to var(R): returns without spread (every score 0 and no KL term: all returns
    0) and values equal to them or off by a constant give 1 - 0 / 1e-8 = 1, where 0 / 0 read NaN (third mutation
    review: the eps was unchecked)."""
    m = ragged_mask(np.random.default_rng(40), 4, 6)
    for level in (0.0, 1.0):
        ret = np.full((4, 6), level, np.float32)
        close(J.explained_variance(ret, ret, m), 1.0)
        close(J.explained_variance(ret - 0.5, ret, m), 1.0)


def test_loss_defaults_are_the_documented_ones():
    """Called without the optional arguments, each loss uses its documented defaults: PPO's ratio clip 0.2 and value
    clip 0.2 (ReFT), GRPO's eps 0.2 and beta 0.04 (DeepSeekMath), seq-mean-token-mean everywhere, GAE's gamma 1 and
    lambda 0.95 (ReFT). The other tests passed them explicitly or read only gradients (third mutation review)."""
    rng = np.random.default_rng(41)
    B, T = 6, 8
    m = ragged_mask(rng, B, T)
    old = rand(rng, B, T, scale=0.3) - 1.0
    logp = old + rand(rng, B, T, scale=0.4)  # ratios past 0.9 / 1.1 and past 0.8 / 1.2
    adv, ref, adv_B = rand(rng, B, T), logp + rand(rng, B, T, scale=0.5), rand(rng, B)
    v_old, ret = rand(rng, B, T), rand(rng, B, T)
    v = v_old + rand(rng, B, T, scale=0.5)
    rew, val = rand(rng, B, T), rand(rng, B, T)
    agg = "seq-mean-token-mean"
    close(J.ppo_policy_loss(logp, old, adv, m)[0], np_ppo_policy(logp, old, adv, m, 0.2, agg)[0])
    close(J.ppo_value_loss(v, v_old, ret, m)[0], np_value_loss(v, v_old, ret, m, 0.2, agg)[0])
    close(J.grpo_loss(logp, old, ref, adv_B, m)[0], np_grpo(logp, old, ref, adv_B, m, 0.2, 0.04, agg)[0])
    for got, want in zip(J.gae(rew, val, m), np_gae(rew, val, m, 1.0, 0.95)):
        close(got, want)
    # each figure moves with its setting (so a changed default shows)
    pol = functools.partial(np_ppo_policy, logp, old, adv, m)
    grpo = functools.partial(np_grpo, logp, old, ref, adv_B, m, 0.2)
    for a, b in ((pol(0.2, agg)[0], pol(0.2, "token-mean")[0]), (pol(0.2, agg)[0], pol(0.1, agg)[0]),
                 (np_value_loss(v, v_old, ret, m, 0.2, agg)[0], np_value_loss(v, v_old, ret, m, 0.3, agg)[0]),
                 (grpo(0.04, agg)[0], grpo(0.05, agg)[0]), (grpo(0.04, agg)[0], grpo(0.04, "token-mean")[0])):
        assert abs(a - b) > 1e-4, (a, b)  # (the comparisons hold to 1e-5)
