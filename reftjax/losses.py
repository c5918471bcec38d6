"""RL and SFT math of reftjax: pure JAX functions over arrays.

Every function here is jit-friendly (static shapes, no host sync, no Python loop
over tokens) and computes in at least float32 whatever the input dtype (bf16
logits are upcast inside the reductions; float64 stays float64 when x64 is on,
which the gradient checks use).

Conventions (shape letters: B batch rows, T completion tokens, V vocabulary,
G group size):

* Arrays are *completion-aligned*: position ``t`` holds the quantity for the
  t-th generated token (its log-probability, the value of the state that emitted
  it, its reward). Completions are right-padded; ``mask_BxT`` is 1 up to and
  including the EOS token (or up to the last token when the sample hit the
  length limit without EOS), 0 on padding::

      tokens  a  b  c  EOS pad pad        a  b  c  d  e  f   (no EOS)
      mask    1  1  1  1   0   0          1  1  1  1  1  1
      score             ^ here                           ^ here

* Masks may be bool or 0/1 numbers; any nonzero entry counts. Per-token inputs
  outside the mask may hold anything (even inf/NaN, e.g. ``-inf`` log-probs of
  padding): they are replaced with ``jnp.where`` before any arithmetic rather
  than multiplied by 0, so losses *and gradients* stay finite. Logits passed to
  ``token_logprobs``/``sft_loss``/``token_entropy`` must be finite everywhere
  (a model's output is; sanitising them would cost a V-sized pass).
* Reductions without an axis are over the whole array. Inside ``jax.jit`` with
  arrays sharded over devices (``NamedSharding`` on the batch axis) such a
  reduction is global: XLA inserts the cross-device all-reduce. So whitening
  "over the whole rollout batch across devices" (the ReFT authors'
  ``allgather_masked_whiten``) needs no ``axis_name``; only code inside
  ``shard_map`` would have to ``psum`` itself.

Sources: lqtrung1998/mwp_ReFT ``train_rl_reft.py`` (``rollout``,
``train_one_epoch``) and ``src/utils.py`` (``allgather_masked_whiten``,
``discount_cumsum``) for PPO; TRL ``trl.core`` (``masked_mean``, ``masked_var``,
``masked_whiten``, ``logprobs_from_logits``), and TRL ``GRPOTrainer``
(``_compute_advantages``/``_compute_loss``) with DeepSeekMath (arXiv 2402.03300)
for GRPO.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean")
"""``token-mean``: sum over all valid tokens / their count, per update (TRL "bnpo"; TRL "dapo" only when one
update takes the whole batch: dapo divides by the whole batch's tokens).
``seq-mean-token-mean``: per-row mean over its valid tokens, then mean over rows
(ReFT's PPO losses and DeepSeekMath's GRPO objective; TRL "grpo")."""


def _f32(x) -> Array:
    """Upcasts to at least float32 (bf16/f16/int/bool -> f32; f64 stays f64 under x64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _keep(mask) -> Array:
    return jnp.asarray(mask).astype(bool)


def _select(mask, *xs):
    """Each ``x`` upcast, with entries outside ``mask`` replaced by 0."""
    keep = _keep(mask)
    return tuple(jnp.where(keep, _f32(x), 0.0) for x in xs)


def masked_sum(x, mask, axis=None) -> Array:
    """Sum of ``x`` over entries where ``mask`` is nonzero (float32)."""
    return jnp.sum(jnp.where(_keep(mask), _f32(x), 0.0), axis=axis)


def masked_mean(x, mask, axis=None) -> Array:
    """Mean of ``x`` over entries where ``mask`` is nonzero.

    ``sum(x * m, axis) / sum(m, axis)`` as TRL's ``masked_mean``, except that a
    slice with no valid entry gives 0 instead of NaN.

    Args:
      x: any shape.
      mask: same shape as ``x``.
      axis: axis or axes to reduce; None reduces everything.

    Returns:
      float32 array with ``axis`` removed.
    """
    count = jnp.sum(_keep(mask), axis=axis).astype(jnp.float32)
    total = masked_sum(x, mask, axis=axis)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def masked_var(x, mask, axis=None, unbiased: bool = True) -> Array:
    """Masked variance, Bessel-corrected by default (TRL ``masked_var``).

    ``var = mean_m((x - mean_m(x))^2) * n / (n - 1)`` with ``n = sum(mask)``.
    TRL raises when ``n <= 1``; under jit we cannot, so the correction is
    skipped there (the biased variance of <= 1 element is 0).

    Args:
      x: any shape.
      mask: same shape as ``x``.
      axis: axis or axes to reduce; None reduces everything.
      unbiased: apply the ``n / (n - 1)`` correction.

    Returns:
      float32 array with ``axis`` removed.
    """
    mean = masked_mean(x, mask, axis=axis)
    if axis is not None:
        mean = jnp.expand_dims(mean, axis)
    var = masked_mean(jnp.square(_f32(x) - mean), mask, axis=axis)
    if unbiased:
        n = jnp.sum(_keep(mask), axis=axis).astype(jnp.float32)
        var = var * jnp.where(n > 1, n / jnp.maximum(n - 1.0, 1.0), 1.0)
    return var


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Whitens ``x`` with the mean and variance of its masked entries.

    ``w = (x - mean_m(x)) * rsqrt(var_m(x) + eps)``; when ``shift_mean`` is
    False the mean is added back (``w += mean_m(x)``). This is TRL's
    ``masked_whiten`` convention (``shift_mean=True`` removes the mean); the
    ReFT authors' ``allgather_masked_whiten(adv, mask)`` uses the opposite
    flag name with default False, i.e. also removes the mean, as
    ``masked_whiten(adv, mask)`` does here. Statistics are over the whole
    array: under ``jax.jit`` with ``x`` sharded over devices that is the
    global rollout batch (see the module docstring). Entries outside the mask
    are set to 0.

    Args:
      x: e.g. ``advantages_BxT``.
      mask: same shape as ``x``.
      shift_mean: remove the mean (True) or keep it (False).
      eps: added to the variance before the rsqrt, as in TRL and ReFT.

    Returns:
      float32 array shaped like ``x``.
    """
    mean = masked_mean(x, mask)
    whitened = (_f32(x) - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(_keep(mask), whitened, 0.0)


def last_valid_onehot(mask_BxT) -> Array:
    """Bool ``BxT``: True on the last valid position of each row.

    The EOS token, or the last token when the completion has no EOS. A row
    without any valid token is all False.
    """
    keep = _keep(mask_BxT)
    pos_T = jnp.arange(keep.shape[1])
    last_B = jnp.max(jnp.where(keep, pos_T[None, :], -1), axis=1)
    return pos_T[None, :] == last_B[:, None]


def kl_shaped_rewards(scores_B, logp_old_BxT, logp_ref_BxT, mask_BxT, kl_coef):
    """Per-token PPO rewards: grader score at the end minus a per-token KL.

    ``kl_t = logp_old_t - logp_ref_t`` (the k1 estimator, on every valid token
    including EOS) and ``r_t = -kl_coef * kl_t + [t == last_b] * score_b``.
    This is ``rollout`` in mwp_ReFT ``train_rl_reft.py``: ``kl = (old_logprob -
    ref_logprob) * mask``, ``rew = score_rew + kl_coef * -kl``, with the score
    at ``tidx - 1`` (the action emitting EOS) or at ``-2`` (the last generated
    token) when there is no EOS. A fully masked row gets no reward at all.

    Args:
      scores_B: grader scores (ReFT: 1 / 0.1 / 0).
      logp_old_BxT: log-probs of the sampled tokens under the sampling policy.
      logp_ref_BxT: the same under the frozen reference (SFT) model.
      mask_BxT: valid-token mask (1 up to and including EOS).
      kl_coef: beta (ReFT: 0.05 N-CoT, 0.01 P-CoT); float or scalar array.

    Returns:
      ``(rewards_BxT, kl_BxT)`` in float32, both 0 outside the mask.
    """
    keep = _keep(mask_BxT)
    kl_BxT = jnp.where(keep, _f32(logp_old_BxT) - _f32(logp_ref_BxT), 0.0)
    score_BxT = jnp.where(last_valid_onehot(mask_BxT), _f32(scores_B)[:, None], 0.0)
    return score_BxT - kl_coef * kl_BxT, kl_BxT


def gae(rewards_BxT, values_BxT, mask_BxT, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation as a reverse ``lax.scan`` over time.

    With rewards and values zeroed outside the mask and ``V_T = 0``:
    ``delta_t = r_t + gamma * V_{t+1} - V_t``,
    ``A_t = delta_t + gamma * lam * A_{t+1}`` (``A_T = 0``), ``R_t = A_t + V_t``.
    Because ``V`` is 0 past the last valid token, the last token bootstraps from
    a terminal value of 0 (also for truncated completions without EOS), exactly
    as mwp_ReFT ``rollout`` (``val * mask``, ``discount_cumsum(delta,
    gamma * lam)``, ``ret = adv + val``). Defaults are ReFT's gamma 1, lambda 0.95.

    Args:
      rewards_BxT: per-token rewards (see ``kl_shaped_rewards``).
      values_BxT: value-head outputs at the rollout.
      mask_BxT: valid-token mask.
      gamma: discount.
      lam: GAE lambda.

    Returns:
      ``(advantages_BxT, returns_BxT)`` in float32, 0 outside the mask.
    """
    keep = _keep(mask_BxT)
    r = jnp.where(keep, _f32(rewards_BxT), 0.0)
    v = jnp.where(keep, _f32(values_BxT), 0.0)
    v_next = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    delta_TxB = (r + gamma * v_next - v).T

    def step(adv_next_B, delta_B):
        adv_B = delta_B + gamma * lam * adv_next_B
        return adv_B, adv_B

    _, adv_TxB = jax.lax.scan(step, jnp.zeros_like(delta_TxB[0]), delta_TxB, reverse=True)
    adv = jnp.where(keep, adv_TxB.T, 0.0)
    return adv, jnp.where(keep, adv + v, 0.0)


def aggregate_loss(loss_BxT, mask_BxT, loss_agg: str = "seq-mean-token-mean") -> Array:
    """Reduces a per-token loss to a scalar (see ``LOSS_AGGREGATIONS``).

    ``seq-mean-token-mean`` is ``mean_b(sum_t m*l / max(sum_t m, 1))``: rows with
    no valid token count as 0 in the batch mean, as in ReFT (``resp_len_per_sample
    = clamp(sum(mask), min=1)``). ``token-mean`` is ``sum(m*l) / sum(m)``.

    Raises:
      ValueError: unknown ``loss_agg`` (a static Python string).
    """
    if loss_agg == "token-mean":
        return masked_mean(loss_BxT, mask_BxT)
    if loss_agg == "seq-mean-token-mean":
        return jnp.mean(masked_mean(loss_BxT, mask_BxT, axis=1))
    raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")


def _clip_ratio(ratio, clip_eps: float, clip_eps_high: float | None):
    """The ratio clipped to [1 - clip_eps, 1 + clip_eps_high] (`clip_eps` both ways when `clip_eps_high` is None)."""
    return jnp.clip(ratio, 1.0 - clip_eps, 1.0 + (clip_eps if clip_eps_high is None else clip_eps_high))


def ppo_policy_loss(
    logp_BxT, logp_old_BxT, adv_BxT, mask_BxT, clip_eps: float = 0.2,
    loss_agg: str = "seq-mean-token-mean", clip_eps_high: float | None = None,
):
    """PPO clipped surrogate loss (minimised).

    ``rho_t = exp(logp_t - logp_old_t)``,
    ``l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps_high))``,
    reduced with ``aggregate_loss`` (ReFT: seq-mean-token-mean, eps 0.2; see
    ``pg_loss`` in mwp_ReFT ``train_one_epoch``). ``eps_high`` is ``clip_eps_high``, DAPO's "clip-higher"
    (TRL's ``epsilon_high``), or ``clip_eps`` when None.

    Args:
      logp_BxT: log-probs of the sampled tokens under the current policy.
      logp_old_BxT: the same at rollout time (no gradient flows into them).
      adv_BxT: (whitened) advantages.
      mask_BxT: valid-token mask.
      clip_eps: ratio clip range (below 1, and above it unless ``clip_eps_high``).
      loss_agg: see ``LOSS_AGGREGATIONS`` (static).
      clip_eps_high: the range above 1, or None.

    Returns:
      ``(loss, metrics)``; metrics (masked means, no gradient): ``clipfrac``
      (tokens where the clipped branch is active, TRL's definition),
      ``approx_kl`` (k3 estimate of KL(old || new): ``rho - 1 - log rho``),
      ``ratio_mean``.
    """
    logp, logp_old, adv = _select(mask_BxT, logp_BxT, logp_old_BxT, adv_BxT)
    log_ratio = logp - jax.lax.stop_gradient(logp_old)
    ratio = jnp.exp(log_ratio)
    adv = jax.lax.stop_gradient(adv)
    pg1 = -adv * ratio
    pg2 = -adv * _clip_ratio(ratio, clip_eps, clip_eps_high)
    loss = aggregate_loss(jnp.maximum(pg1, pg2), mask_BxT, loss_agg)
    ratio, log_ratio = jax.lax.stop_gradient(ratio), jax.lax.stop_gradient(log_ratio)
    metrics = {
        "clipfrac": masked_mean(pg2 > pg1, mask_BxT),
        "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask_BxT),
        "ratio_mean": masked_mean(ratio, mask_BxT),
    }
    return loss, metrics


def ppo_value_loss(
    values_BxT, old_values_BxT, returns_BxT, mask_BxT, clip_range_value: float = 0.2,
    loss_agg: str = "seq-mean-token-mean",
):
    """Clipped value loss, including the 0.5 factor.

    ``v_clip = clip(v, v_old - c, v_old + c)``,
    ``loss = 0.5 * agg(max((v - R)^2, (v_clip - R)^2))``, as ``vf_loss`` in
    mwp_ReFT ``train_one_epoch``; the total is ``pg + vf_coef * loss`` (ReFT
    vf_coef 5, so ``pg + 5 * 0.5 * agg(...)``).

    Args:
      values_BxT: current value predictions.
      old_values_BxT: value predictions at rollout time.
      returns_BxT: GAE returns (targets; no gradient flows into them).
      mask_BxT: valid-token mask.
      clip_range_value: the clip half-width ``c`` (ReFT: 0.2).
      loss_agg: see ``LOSS_AGGREGATIONS`` (static).

    Returns:
      ``(loss, metrics)`` with ``vf_clipfrac``: share of valid tokens where the
      clipped error is the larger one.
    """
    v, v_old, ret = _select(mask_BxT, values_BxT, old_values_BxT, returns_BxT)
    v_old, ret = jax.lax.stop_gradient(v_old), jax.lax.stop_gradient(ret)
    v_clip = jnp.clip(v, v_old - clip_range_value, v_old + clip_range_value)
    err1, err2 = jnp.square(v - ret), jnp.square(v_clip - ret)
    loss = 0.5 * aggregate_loss(jnp.maximum(err1, err2), mask_BxT, loss_agg)
    return loss, {"vf_clipfrac": masked_mean(err2 > err1, mask_BxT)}


def explained_variance(values_BxT, returns_BxT, mask_BxT) -> Array:
    """``max(-1, 1 - var_m(R - V) / (var_m(R) + 1e-8))`` (ReFT ``vf_expl_var``).

    Uses the unbiased masked variance; 1 is a perfect critic, 0 no better than a
    constant, and the ReFT authors truncate at -1; 0 when fewer than 2 tokens are valid.
    """
    v = jax.lax.stop_gradient(_f32(values_BxT))
    ret = _f32(returns_BxT)
    ev = 1.0 - masked_var(ret - v, mask_BxT) / (masked_var(ret, mask_BxT) + 1e-8)
    # under 2 valid tokens there is no variance to explain: 0, not the 1 (a perfect critic) the formula gives
    return jnp.where(jnp.sum(_keep(mask_BxT)) < 2, 0.0, jnp.maximum(ev, -1.0))


def token_entropy(logits_BxTxV) -> Array:
    """Entropy of each next-token distribution, float32 ``BxT``.

    ``H = logsumexp(z) - sum_v softmax(z)_v * z_v``. No log-softmax or
    probability array is materialised: ``exp`` and the product fuse into the
    reductions. Measured on XLA:CPU with bf16 logits (B4 x T128 x V49152): the
    only temporary is one float32 copy of the logits (96 MiB, shared by the
    reductions), same as ``token_logprobs``.
    """
    z = _f32(logits_BxTxV)
    return _entropy(z, jax.nn.logsumexp(z, axis=-1))


def _entropy(z, lse):
    """``lse - sum(softmax(z) * z)`` with both terms taken relative to the row maximum: as written, the two terms
    are ~max(z) each and cancel, which at a low temperature (z = logits / T, max ~1e3) left errors of 0.36 nats and
    negative entropies in float32 (helper review); shifted, ~1e-7."""
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    zs = z - m
    return (lse - m[..., 0]) - jnp.sum(jnp.exp(zs - (lse[..., None] - m)) * zs, axis=-1)


def entropy_from_logits(logits_BxTxV, mask_BxT) -> Array:
    """Masked mean of ``token_entropy`` over valid tokens (scalar float32)."""
    return masked_mean(token_entropy(logits_BxTxV), mask_BxT)


def _groups(scores_B, group_size: int) -> Array:
    scores_B = _f32(scores_B)
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if scores_B.shape[0] % group_size:
        raise ValueError(
            f"batch {scores_B.shape[0]} is not a multiple of group_size {group_size}")
    return scores_B.reshape(-1, group_size)


SCALE_REWARDS = ("group", "batch", "none")
"""GRPO's advantage scaling, TRL's `scale_rewards` values: by the group's standard deviation (DeepSeekMath), by the
whole batch's (TRL "batch"), or none (Dr. GRPO)."""


def grpo_advantages(scores_B, group_size: int, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages (DeepSeekMath GRPO outcome supervision).

    Rows are grouped contiguously, ``group_size`` samples per prompt:
    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` with the unbiased (n - 1)
    standard deviation, as TRL's ``GRPOTrainer`` (``rewards.view(-1, G).std(1)``,
    eps 1e-4); ``scale="batch"`` divides by the whole batch's standard deviation instead (TRL's
    ``scale_rewards="batch"``), ``scale="none"`` gives Dr. GRPO's ``r_i - mean_g(r)``.

    Args:
      scores_B: one score per completion, ``B = n_prompts * group_size``.
      group_size: G (static).
      scale: one of ``SCALE_REWARDS`` (static).
      eps: added to the standard deviation.

    Returns:
      float32 ``adv_B``, one advantage per completion (broadcast over its tokens).
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {SCALE_REWARDS}, got {scale!r}")
    r_NxG = _groups(scores_B, group_size)
    adv_NxG = r_NxG - jnp.mean(r_NxG, axis=1, keepdims=True)
    if scale == "group":
        adv_NxG = adv_NxG / (jnp.std(r_NxG, axis=1, keepdims=True, ddof=1) + eps)
    elif scale == "batch":
        adv_NxG = adv_NxG / (jnp.std(r_NxG, ddof=1) + eps)
    return adv_NxG.reshape(-1)


def rloo_advantages(scores_B, group_size: int) -> Array:
    """REINFORCE leave-one-out advantages: ``A_i = r_i - mean_{j != i} r_j``.

    Equal to ``G / (G - 1) * (r_i - mean_g(r))``; rows grouped as in
    ``grpo_advantages``.
    """
    r_NxG = _groups(scores_B, group_size)
    baseline_NxG = (jnp.sum(r_NxG, axis=1, keepdims=True) - r_NxG) / (group_size - 1)
    return (r_NxG - baseline_NxG).reshape(-1)


def grpo_loss(
    logp_BxT, logp_old_BxT, logp_ref_BxT, adv_B, mask_BxT, clip_eps: float = 0.2,
    kl_coef: float = 0.04, loss_agg: str = "seq-mean-token-mean", clip_eps_high: float | None = None,
):
    """GRPO loss: clipped surrogate with a sequence advantage plus a k3 KL term.

    ``rho_t = exp(logp_t - logp_old_t)``,
    ``k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1`` (>= 0, unbiased for
    KL(pi || pi_ref)), and per token
    ``l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A) + kl_coef * k3_t`` (``eps_high``:
    ``clip_eps_high``, TRL's ``epsilon_high``, or ``clip_eps`` when None),
    reduced with ``aggregate_loss`` (DeepSeekMath eq. 3 is seq-mean-token-mean;
    TRL ``_compute_loss`` calls it "grpo", and token-mean "bnpo"). The k3 term is
    TRL's with ``use_bias_correction_kl=False`` (TRL 1.16's default True multiplies
    it by the ratio: equal on-policy, another gradient). This function's defaults
    follow DeepSeekMath (eps 0.2, beta 0.04); `PPOConfig`'s kl_coef is 0.05.

    Args:
      logp_BxT: log-probs of the sampled tokens under the current policy.
      logp_old_BxT: the same at sampling time (equal to ``logp`` on the first
        update; no gradient flows into them).
      logp_ref_BxT: the same under the frozen reference model.
      adv_B: one advantage per completion (``grpo_advantages``).
      mask_BxT: valid-token mask.
      clip_eps: ratio clip range (below 1, and above it unless ``clip_eps_high``).
      kl_coef: beta.
      loss_agg: see ``LOSS_AGGREGATIONS`` (static).
      clip_eps_high: the range above 1 (DAPO's clip-higher), or None.

    Returns:
      ``(loss, metrics)`` with ``pg_loss`` (the clipped surrogate without the KL term, aggregated as the loss)
      and masked means ``kl_k3``, ``clipfrac`` and ``ratio_mean``.
    """
    adv_BxT = jnp.broadcast_to(_f32(adv_B)[:, None], jnp.shape(mask_BxT))
    logp, logp_old, logp_ref, adv = _select(
        mask_BxT, logp_BxT, logp_old_BxT, logp_ref_BxT, adv_BxT)
    ratio = jnp.exp(logp - jax.lax.stop_gradient(logp_old))
    adv = jax.lax.stop_gradient(adv)
    surr1 = ratio * adv
    surr2 = _clip_ratio(ratio, clip_eps, clip_eps_high) * adv
    ref_minus_logp = jax.lax.stop_gradient(logp_ref) - logp
    k3 = jnp.expm1(ref_minus_logp) - ref_minus_logp  # (exp(d) - d - 1 cancelled to 0 in float32 below |d| ~ 1e-4)
    loss = aggregate_loss(-jnp.minimum(surr1, surr2) + kl_coef * k3, mask_BxT, loss_agg)
    metrics = {
        # the clipped surrogate alone, as PPO's pg_loss (the loss adds kl_coef x the aggregated k3)
        "pg_loss": jax.lax.stop_gradient(aggregate_loss(-jnp.minimum(surr1, surr2), mask_BxT, loss_agg)),
        # not "kl": the experience's per-sequence KL(policy || reference) goes by that name in the same metrics row
        "kl_k3": masked_mean(jax.lax.stop_gradient(k3), mask_BxT),
        "clipfrac": masked_mean(surr2 < surr1, mask_BxT),
        "ratio_mean": masked_mean(jax.lax.stop_gradient(ratio), mask_BxT),
    }
    return loss, metrics


def token_logprobs(logits_BxTxV, targets_BxT) -> Array:
    """``log softmax(z)[target]`` per position, float32 ``BxT``.

    Computed as ``z[target] - logsumexp(z)`` (stable, and without materialising
    the full ``BxTxV`` log-softmax as TRL's ``logprobs_from_logits`` does; for
    bf16 logits XLA:CPU keeps one float32 copy of them as its only temporary).
    ``targets_BxT[:, t]`` is the token that ``logits_BxTxV[:, t]`` predicts:
    the caller shifts (logits of positions ``:-1`` against tokens ``1:``).
    """
    z = _f32(logits_BxTxV)
    picked = jnp.take_along_axis(z, targets_BxT[..., None].astype(jnp.int32), axis=-1)
    return picked[..., 0] - jax.nn.logsumexp(z, axis=-1)


def sft_loss(logits_BxTxV, targets_BxT, loss_mask_BxT):
    """Masked next-token cross-entropy, averaged over all answer tokens.

    ``loss = sum(m * -log p(target)) / sum(m)``: the token mean over the batch
    that Hugging Face's ``labels=-100`` loss computes. ``sft_step`` takes it over
    the whole global batch whatever ``accum_steps`` is (transformers' own
    gradient-accumulation rule since 4.46); the ReFT authors' DeepSpeed run
    averages its 16 micro-batches' own token means (8 GPUs x 3 rows x 2
    accumulation steps), which weighs a token of a short micro-batch more.

    Args:
      logits_BxTxV: next-token logits (any float dtype).
      targets_BxT: int token ids, already shifted (see ``token_logprobs``).
      loss_mask_BxT: 1 on answer tokens (including EOS), 0 on prompt/padding.

    Returns:
      ``(loss, metrics)``: ``token_accuracy`` (argmax == target over answer
      tokens) and ``n_tokens`` (float32 count of answer tokens).
    """
    nll = -token_logprobs(logits_BxTxV, targets_BxT)
    correct = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
    metrics = {
        "token_accuracy": masked_mean(correct, loss_mask_BxT),
        "n_tokens": jnp.sum(_keep(loss_mask_BxT)).astype(jnp.float32),
    }
    return masked_mean(nll, loss_mask_BxT), metrics


# ----------------------------------------------------------------------------- fused head + SFT loss


def head_chunks(batch: int, length: int, chunk_rows: int) -> int:
    """How many sequence chunks `fused_sft_loss` uses: about ``chunk_rows`` rows (batch x positions)
    per chunk, a divisor of ``length`` so every chunk has the same static shape (1 = one chunk)."""
    if chunk_rows <= 0:
        return 1
    n = max(1, min(length, (batch * length) // chunk_rows))
    while length % n:
        n -= 1
    return n


def _logits_chunk(h_BxTxD, w, vocab_major: bool, cap: float | None = None):
    """One chunk's logits ``h @ head`` in (at least) float32, soft-capped to ``cap * tanh(logits / cap)`` with a
    `cap` (Gemma 2); head [V, D] if `vocab_major`, else [D, V]."""
    acc = jnp.promote_types(h_BxTxD.dtype, jnp.float32)  # accumulated in it: bf16 output rounded logits by ~0.06
    z = jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", h_BxTxD, w, preferred_element_type=acc)
    return z if cap is None else cap * jnp.tanh(z / cap)


def _uncapped(dz, z, cap: float | None):
    """The gradient of the logits before the soft-cap from the capped logits `z` and their gradient `dz`."""
    return dz if cap is None else dz * (1 - jnp.square(z / cap))


def _head_grads(dz_BxTxV, h_BxTxD, w, vocab_major: bool):
    """(dh, dw_DxV) of `_logits_chunk` for the logits' gradient `dz` (in h's dtype).

    The head's gradient comes out as ``[D, V]`` whatever the head's layout (``h^T dz``: the chunk's rows are
    the GEMM's inner dimension in the layout `dz` is written in) and is accumulated in float32+; `_head_dw`
    puts the sum in the head's layout once. Forming ``[V, D]`` per chunk (``dz^T h``) made XLA:CPU transpose
    every chunk's ``[rows, V]`` gradient first: 100 MB per 512-row chunk (BUILD_NOTES, session 16).
    """
    acc = jnp.promote_types(h_BxTxD.dtype, jnp.float32)
    dh = jnp.einsum("btv,vd->btd" if vocab_major else "btv,dv->btd", dz_BxTxV, w)
    return dh, jnp.einsum("btd,btv->dv", h_BxTxD, dz_BxTxV, preferred_element_type=acc)


def _dw_zeros(w, vocab_major: bool):
    """The float32+ accumulator of `_head_grads`' ``[D, V]`` head gradients."""
    return jnp.zeros(w.shape[::-1] if vocab_major else w.shape, jnp.promote_types(w.dtype, jnp.float32))


def _head_dw(dw_DxV, vocab_major: bool):
    """A summed ``[D, V]`` head gradient in the head's own layout (one transpose for a ``[V, D]`` head)."""
    return dw_DxV.T if vocab_major else dw_DxV


def _head_chunk(h_BxTxD, w, targets_BxT, mask_BxT, vocab_major: bool, with_grad: bool, cap: float | None):
    """Logits of one chunk, its summed NLL and correct count; with the NLL-sum's gradients if asked."""
    acc = jnp.promote_types(h_BxTxD.dtype, jnp.float32)
    z = _logits_chunk(h_BxTxD, w, vocab_major, cap)
    zmax = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - zmax)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(z, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    keep = _keep(mask_BxT)
    nll = jnp.sum(jnp.where(keep, zmax[..., 0] + jnp.log(denom[..., 0]) - picked, 0.0))
    correct = jnp.sum(keep & (picked >= zmax[..., 0])).astype(acc)
    if not with_grad:
        return nll, correct
    # d nll / d z = softmax(z) - onehot(target) on kept rows; the one-hot is an iota compare in the same pass
    keepf = keep.astype(acc)[..., None]
    onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, 2) == targets_BxT[..., None].astype(jnp.int32)
    dz = _uncapped(e * (keepf / denom) - onehot * keepf, z, cap).astype(h_BxTxD.dtype)
    dh, dw = _head_grads(dz, h_BxTxD, w, vocab_major)
    return nll, correct, dh, dw


def _split(x, n):
    """[B, T, ...] -> [n, B, T / n, ...] (chunks of the sequence axis; the batch axis, and its sharding, stay)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape((b, n, t // n) + x.shape[2:]), 1, 0)


def _merge(x):
    n, b, tc = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape((b, n * tc) + x.shape[3:])


def _scan_chunks(h_BxTxD, w, targets_BxT, mask_BxT, n_chunks: int, vocab_major: bool, with_grad: bool,
                 cap: float | None):
    """`_head_chunk` over the sequence chunks: summed NLL and correct count (+ dh [B, T, D] and summed dw)."""
    def body(carry, xs):
        out = _head_chunk(xs[0], w, xs[1], xs[2], vocab_major, with_grad, cap)
        summed = out[:2] + out[3:]  # nll, correct (, dw); dh is stacked per chunk
        return tuple(c + o for c, o in zip(carry, summed)), (out[2] if with_grad else None)

    acc = jnp.promote_types(h_BxTxD.dtype, jnp.float32)
    init = (jnp.zeros((), acc), jnp.zeros((), acc)) + ((_dw_zeros(w, vocab_major),) if with_grad else ())
    xs = (_split(h_BxTxD, n_chunks), _split(targets_BxT, n_chunks), _split(mask_BxT, n_chunks))
    sums, dh = jax.lax.scan(body, init, xs)
    return sums if not with_grad else (sums[0], sums[1], _merge(dh), _head_dw(sums[2], vocab_major))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_head_nll(h_BxTxD, w, targets_BxT, mask_BxT, n_chunks: int, vocab_major: bool, cap: float | None):
    """(summed NLL, correct count) over kept positions; see `fused_sft_loss`."""
    return _scan_chunks(h_BxTxD, w, targets_BxT, mask_BxT, n_chunks, vocab_major, False, cap)


def _fused_head_nll_fwd(h_BxTxD, w, targets_BxT, mask_BxT, n_chunks, vocab_major, cap):
    nll, correct, dh, dw = _scan_chunks(h_BxTxD, w, targets_BxT, mask_BxT, n_chunks, vocab_major, True, cap)
    # a zero-size array carries the head's dtype: dw stays in the accumulation dtype until scaled
    return (nll, correct), (dh, dw, jnp.zeros((0,), w.dtype))


def _fused_head_nll_bwd(n_chunks, vocab_major, cap, res, cotangents):
    dh, dw, w_like = res
    g = cotangents[0]  # the correct count is not differentiable
    return (g * dh).astype(dh.dtype), (g * dw).astype(w_like.dtype), None, None


_fused_head_nll.defvjp(_fused_head_nll_fwd, _fused_head_nll_bwd)


def fused_sft_loss(hidden_BxTxD, w_head, targets_BxT, loss_mask_BxT, *, vocab_major: bool = True,
                   chunk_rows: int = 512, logit_softcap: float | None = None):
    """`sft_loss` of ``hidden @ head``, without the [B, T, V] logits.

    The head projection and the cross-entropy run over sequence chunks of about
    ``chunk_rows`` rows, and the gradients of hidden and head (``softmax - onehot``
    times the head, and its transpose times hidden) are formed chunk by chunk in
    the forward pass, so neither the logits nor their gradient ever exist for the
    whole batch, and each chunk's exp/sum/subtract passes run on data that was
    just written (the same trick as Liger's fused linear cross-entropy). Measured
    on SmolLM2-135M, 8 x 256, 2 CPU cores: head + loss forward and backward
    3.02 -> 2.41 s at 512 rows; in the whole `sft_step` level within noise, so
    its sure gain is memory (2 x 400 MB of logits and their gradient there;
    BUILD_NOTES, session 8).

    Args:
      hidden_BxTxD: final hidden states (after the last norm).
      w_head: the output projection, ``[V, D]`` (tied embedding: ``vocab_major``) or ``[D, V]``.
      targets_BxT: token predicted at each position (callers shift, and pad the last slot with mask 0).
      loss_mask_BxT: 1 where the prediction counts.
      chunk_rows: rows (batch x positions) per chunk; <= 0 means one chunk.
      logit_softcap: the model's final logit soft-cap (Gemma 2's `final_logit_softcap`), or None.

    Returns:
      ``(loss, metrics)`` as `sft_loss`: token mean of the NLL, ``token_accuracy``
      and ``n_tokens``. Accuracy counts a target tied with the maximum logit as
      correct (`sft_loss` takes the first arg-max), a difference only at exact ties.
    """
    b, t = targets_BxT.shape
    n_chunks = head_chunks(b, t, chunk_rows)
    nll, correct = _fused_head_nll(hidden_BxTxD, w_head, targets_BxT, loss_mask_BxT, n_chunks, vocab_major,
                                   logit_softcap)
    n_tokens = jnp.sum(_keep(loss_mask_BxT)).astype(nll.dtype)
    denom = jnp.maximum(n_tokens, 1.0)  # no answer token: loss and accuracy 0, as `masked_mean` gives
    return nll / denom, {"token_accuracy": correct / denom, "n_tokens": n_tokens}


def _scaled(x, scale: float):
    return x if scale == 1.0 else x * scale


def _scan_logp(h_BxTxD, w, targets_BxT, n_chunks: int, vocab_major: bool, scale: float, cap: float | None):
    """Per-position (logp of the target, entropy, logsumexp) of ``scale * logits`` over sequence chunks, each [B, T]."""
    def body(_, xs):
        z = _scaled(_logits_chunk(xs[0], w, vocab_major, cap), scale)
        lse = jax.nn.logsumexp(z, axis=-1)
        picked = jnp.take_along_axis(z, xs[1][..., None].astype(jnp.int32), axis=-1)[..., 0]
        ent = _entropy(z, lse)
        return None, (picked - lse, ent, lse)

    _, out = jax.lax.scan(body, None, (_split(h_BxTxD, n_chunks), _split(targets_BxT, n_chunks)))
    return tuple(_merge(x) for x in out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused_head_logp(h_BxTxD, w, targets_BxT, n_chunks: int, vocab_major: bool, scale: float, cap: float | None):
    """(logp_BxT, entropy_BxT); see `fused_token_logprobs`."""
    return _scan_logp(h_BxTxD, w, targets_BxT, n_chunks, vocab_major, scale, cap)[:2]


def _fused_head_logp_fwd(h_BxTxD, w, targets_BxT, n_chunks, vocab_major, scale, cap):
    logp, ent, lse = _scan_logp(h_BxTxD, w, targets_BxT, n_chunks, vocab_major, scale, cap)
    return (logp, ent), (h_BxTxD, w, targets_BxT, lse, ent)


def _fused_head_logp_bwd(n_chunks, vocab_major, scale, cap, res, cotangents):
    h, w, targets, lse, ent = res
    g_logp, g_ent = cotangents

    def body(dw, xs):
        h_c, t_c, lse_c, ent_c, gl_c, ge_c = xs
        capped = _logits_chunk(h_c, w, vocab_major, cap)
        z = _scaled(capped, scale)
        p = jnp.exp(z - lse_c[..., None])
        onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, 2) == t_c[..., None].astype(jnp.int32)
        # d logp / dz = onehot - p;  d entropy / dz = -p * (z - lse + H); z = scale * logits
        dz = gl_c[..., None] * (onehot - p) - ge_c[..., None] * p * (z - (lse_c - ent_c)[..., None])
        dh, dw_c = _head_grads(_uncapped(_scaled(dz, scale), capped, cap).astype(h_c.dtype), h_c, w, vocab_major)
        return dw + dw_c, dh

    acc = jnp.promote_types(h.dtype, jnp.float32)
    xs = tuple(_split(x, n_chunks) for x in (h, targets, lse, ent, g_logp.astype(acc), g_ent.astype(acc)))
    dw, dh = jax.lax.scan(body, _dw_zeros(w, vocab_major), xs)
    return _merge(dh), _head_dw(dw, vocab_major).astype(w.dtype), None


_fused_head_logp.defvjp(_fused_head_logp_fwd, _fused_head_logp_bwd)


def fused_token_logprobs(hidden_BxTxD, w_head, targets_BxT, *, vocab_major: bool = True, chunk_rows: int = 128,
                         logit_scale: float = 1.0, logit_softcap: float | None = None):
    """(`token_logprobs`, `token_entropy`) of ``logit_scale * (hidden @ head)``, without the [B, T, V] logits.

    The RL losses' counterpart of `fused_sft_loss`: the head runs over sequence chunks of
    about ``chunk_rows`` rows and only per-position values (log-prob of the target,
    entropy, logsumexp) are kept. Because the losses' per-token cotangents are known only
    in the backward, the backward recomputes each chunk's logits (one extra head GEMM)
    instead of storing them: peak memory holds one chunk's ``[rows, V]`` float32 logits
    rather than the whole batch's logits, their softmax and their gradient.

    `logit_scale` (1 / temperature) multiplies the float32 logits: scaling a bf16 `hidden` instead rounds
    it, and the log-probs were then not those of the distribution the rollout sampled (by up to 0.1 at T 0.6).
    `logit_softcap`: the model's final logit soft-cap (Gemma 2), applied before the scale, as `lm_logits` does.

    Returns float32 ``(logp_BxT, entropy_BxT)``; both differentiable with respect to hidden
    and head (the entropy gradient is ``-p (log p + H)`` per logit).
    """
    b, t = targets_BxT.shape
    return _fused_head_logp(hidden_BxTxD, w_head, targets_BxT, head_chunks(b, t, chunk_rows), vocab_major,
                            float(logit_scale), logit_softcap)
