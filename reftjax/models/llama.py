"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/3, SmolLM2, Gemma 1-3, OLMo 2) in Flax linen.

Parameters mirror Hugging Face names, kernels stored [in, out]:

    embed_tokens/embedding        [V, D]
    layers/...                    stacked over a leading layer axis [L, ...]
      input_layernorm/scale       [L, D] (absent in OLMo 2)
      self_attn/{q,k,v}_proj      [L, D, H*hd] (+ bias [L, H*hd] for Qwen2)
      self_attn/{q,k}_norm/scale  [L, hd] (Qwen3, Gemma 3: per-head RMSNorm of q and k before RoPE;
                                  OLMo 2: [L, H*hd] and [L, K*hd], over all heads at once)
      self_attn/o_proj            [L, H*hd, D]
      post_attention_layernorm    [L, D] (the MLP's input norm; Gemma 2/3: the attention output's norm)
      pre_feedforward_layernorm,  [L, D] (Gemma 2/3 only: the MLP's input and output norms; OLMo 2: the
                                  output norm alone)
        post_feedforward_layernorm
      mlp/{gate,up}_proj          [L, D, F];  mlp/down_proj [L, F, D]
    norm/scale                    [D]
    lm_head/kernel                [D, V] (absent with tied embeddings)

Two execution paths, kept equal by tests (tests/models_test.py):

* `Transformer.__call__` (training, scoring, prefill): `nn.scan` over the
  stacked layers (one compiled block, optional remat), returning the final
  hidden states and every layer's keys/values.
* `decode_step` (sampling): the same layer as plain functions over fused
  per-layer weights (`unstack_layers`), unrolled over per-layer KV-cache
  buffers, so each step writes one slot in place with `dynamic_update_slice`
  instead of slicing a stacked [L, ...] cache (which XLA would copy every step).

Left padding: rows are right-aligned in a buffer of T slots; `attn_mask_BxT`
marks real tokens and `positions_BxT` counts real tokens only. Causality is by
slot index, which is the same ordering as by position for real tokens:

    slot:      0    1    2    3    4
    row 0:   pad  pad   t0   t1   t2     positions  0 0 0 1 2
    row 1:    t0   t1   t2   t3   t4     positions  0 1 2 3 4
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reftjax.models.config import ModelConfig, RopeScaling
from reftjax.sharding import constrain_batch, constrain_lookup

# Logical axis names of parameters; `reftjax.sharding` maps them to mesh axes.
VOCAB, EMBED, MLP, Q_HEADS, KV_HEADS, NORM, LAYERS = (
    "vocab", "embed", "mlp", "q_heads", "kv_heads", "norm", "layers")


class KVCache(NamedTuple):
    """One layer's keys and values.

    `Transformer` returns fresh ones as [B, T, kv_heads, head_dim]; the decode
    caches (`prefill` / `decode_step`) hold keys as [B, kv_heads, head_dim, S] and
    values as [B, kv_heads, S, head_dim], the layouts the attention dots consume
    directly, so no step copies or transposes a cache.
    """

    k: jax.Array
    v: jax.Array


def _layer_rope_scaling(cfg: ModelConfig, sliding: bool) -> RopeScaling:
    """A layer's RoPE scaling: none on a windowed layer with its own base (Gemma 3's local layers), else the model's."""
    return RopeScaling() if sliding and cfg.local_rope_theta is not None else cfg.rope_scaling


def rope_inv_freq(cfg: ModelConfig, sliding: bool = False, long: bool = False) -> np.ndarray:
    """Inverse RoPE frequencies [rope_dim // 2] with linear / Llama-3 / YaRN / LongRoPE scaling (as transformers).

    `sliding`: of a windowed layer, which has its own unscaled base where the model sets `local_rope_theta`
    (Gemma 3's local layers). `long`: LongRoPE's long factors (else its short ones; `_traced_inv_freq` picks)."""
    hd = cfg.rope_dim  # (the rotated dims: all of head_dim but in Phi-4-mini's partial rotary)
    local = sliding and cfg.local_rope_theta is not None
    base = cfg.local_rope_theta if local else cfg.rope_theta
    inv = 1.0 / (base ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    sc = _layer_rope_scaling(cfg, sliding)
    if sc.kind == "yarn":  # extrapolated (unscaled) fast frequencies, interpolated (/ factor) slow ones, a ramp between
        def dim(rotations):  # the dimension whose frequency turns `rotations` times over the original context
            return hd * math.log(sc.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = dim(sc.beta_fast), dim(sc.beta_slow)
        if sc.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, hd - 1)
        ramp = np.clip((np.arange(hd // 2, dtype=np.float64) - low) / ((high - low) or 0.001), 0.0, 1.0)
        inv = inv / sc.factor * ramp + inv * (1.0 - ramp)
    elif sc.kind == "linear":
        inv = inv / sc.factor
    elif sc.kind == "longrope":
        inv = inv / np.asarray(sc.long_factor if long else sc.short_factor, np.float64)
    elif sc.kind == "llama3":
        old = sc.original_max_position_embeddings
        low_wavelen, high_wavelen = old / sc.low_freq_factor, old / sc.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
        smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
        smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def _traced_inv_freq(cfg: ModelConfig, sliding: bool, positions_BxT: jax.Array):
    """`rope_inv_freq`, except that LongRoPE with `factors="auto"` takes its long factors in a forward whose longest
    position passes the original context (transformers' `longrope_frequency_update`, per call: a decode step past it
    switches while the cache keeps the keys rotated before)."""
    sc = _layer_rope_scaling(cfg, sliding)
    if sc.kind != "longrope" or sc.factors != "auto":
        return rope_inv_freq(cfg, sliding, long=sc.factors == "long")
    longer = jnp.max(positions_BxT) + 1 > sc.original_max_position_embeddings
    return jnp.where(longer, rope_inv_freq(cfg, sliding, long=True), rope_inv_freq(cfg, sliding))


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq: np.ndarray,
               attention_factor: float = 1.0) -> jax.Array:
    """Rotary embedding, "rotate half" layout (the Hugging Face convention); cos and sin times `attention_factor`
    (YaRN's) in float32 before the cast, as transformers. Fewer frequencies than half the head (partial rotary)
    rotate the leading dims only; the rest pass through."""
    rotated = 2 * inv_freq.shape[-1]
    if rotated < x_BxTxNxH.shape[-1]:
        part = apply_rope(x_BxTxNxH[..., :rotated], positions_BxT, inv_freq, attention_factor)
        return jnp.concatenate([part, x_BxTxNxH[..., rotated:]], axis=-1)
    freqs = positions_BxT.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    cos, sin = cos.astype(x_BxTxNxH.dtype), sin.astype(x_BxTxNxH.dtype)
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BxTxNxH * cos + rotated * sin


def _static(flag) -> bool:
    return isinstance(flag, (bool, np.bool_))


def _rope_qk(cfg: ModelConfig, q, k, positions_BxT, sliding=False, rope=True):
    """RoPE on one layer's q and k; q also takes the model's own score scale where it has one (Gemma 2/3's
    query_pre_attn_scalar^-1/2 in place of head_dim^-1/2, which the attention applies).

    `sliding` (a windowed layer: its own RoPE base where the model has one) and `rope` (False: a NoPE layer, no
    rotation) are Python bools, or traced ones for models whose layers differ (`mixed_layers`): then every candidate
    is computed and the layer's picked, so that the cos/sin tables are loop-invariant and saved once for the backward
    (a table picked per layer was saved per layer: ~2 MiB a layer at 4 x 1024, helper review, session 39)."""
    qpas = cfg.query_pre_attn_scalar

    def scaled(q, k):  # (each candidate scaled before the pick: the order the models before NoPE layers compiled)
        return (q * jnp.asarray((cfg.head_dim / qpas) ** 0.5, q.dtype) if qpas not in (None, cfg.head_dim) else q), k

    def rotate(local: bool):
        inv_freq, factor = _traced_inv_freq(cfg, local, positions_BxT), _layer_rope_scaling(cfg, local).attention_factor
        return scaled(apply_rope(q, positions_BxT, inv_freq, factor), apply_rope(k, positions_BxT, inv_freq, factor))

    if _static(rope) and not rope:
        return scaled(q, k)
    if _static(sliding) or cfg.local_rope_theta is None:
        rotated = rotate(_static(sliding) and bool(sliding))
    else:
        rotated = tuple(jnp.where(sliding, a, b) for a, b in zip(rotate(True), rotate(False)))
    return rotated if _static(rope) else tuple(jnp.where(rope, a, b) for a, b in zip(rotated, scaled(q, k)))


def _scale_embeddings(cfg: ModelConfig, x):
    """Gemma's input embeddings times sqrt(D), the factor rounded to the activations' dtype (as transformers)."""
    return x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype) if cfg.embed_scale else x


def attention_mask(q_slots_T: jax.Array, k_slots_S: jax.Array, key_valid_BxS: jax.Array,
                   sliding_window: int | None) -> jax.Array:
    """Boolean [B, T, S]: causal by slot, padding keys masked, optional sliding window."""
    allowed_TxS = k_slots_S[None, :] <= q_slots_T[:, None]
    if sliding_window:
        allowed_TxS &= (q_slots_T[:, None] - k_slots_S[None, :]) < sliding_window
    return allowed_TxS[None, :, :] & key_valid_BxS.astype(bool)[:, None, :]


def prefix_group_masks(key_valid_BxT: jax.Array, positions_BxT: jax.Array, prefix_len: int, group: int,
                       sliding_window: int | None) -> tuple[jax.Array, jax.Array]:
    """Masks of rows packing one prefix and `group` continuations: ``[prefix | c_1 | ... | c_g]``.

    The prefix (P slots) attends causally to itself; each continuation (N slots) to the
    prefix and causally to itself, never to another continuation. Returns the prefix
    block [B, P, P] and the continuation blocks [B * g, N, P + N] (keys: the prefix, then
    the continuation's own slots), which `_attend_prefix_groups` consumes: attention costs
    P^2 + g N (P + N) scores instead of the dense (P + g N)^2. The sliding window counts
    positions (slots are not contiguous across continuations).
    """
    b, t = key_valid_BxT.shape
    p, g = prefix_len, group
    n = (t - p) // g
    if p < 1 or g < 1 or p + g * n != t:
        raise ValueError(f"{t} slots are not a prefix of {p} plus {g} equal continuations")
    valid, pos = key_valid_BxT.astype(bool), positions_BxT
    m_pp = (jnp.arange(p)[None, :] <= jnp.arange(p)[:, None])[None] & valid[:, None, :p]
    group_view = lambda x: jnp.concatenate(  # noqa: E731  [B, T] -> [B, g, P + N]: the prefix, then c_j
        [jnp.broadcast_to(x[:, None, :p], (b, g, p)), x[:, p:].reshape(b, g, n)], axis=2)
    causal_c = jnp.concatenate([jnp.ones((n, p), bool), jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]], axis=1)
    m_c = causal_c[None, None] & group_view(valid)[:, :, None, :]
    if sliding_window:
        m_pp &= (pos[:, :p, None] - pos[:, None, :p]) < sliding_window
        m_c &= (pos[:, p:].reshape(b, g, n)[..., None] - group_view(pos)[:, :, None, :]) < sliding_window
    return m_pp, m_c.reshape(b * g, n, p + n)


def positions_from_mask(attn_mask_BxT: jax.Array) -> jax.Array:
    """Positions of real tokens in a left-padded batch (padding gets position 0)."""
    return jnp.maximum(jnp.cumsum(attn_mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def _dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str, bias: bool = False):
    return nn.Dense(
        features, use_bias=bias, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def rms_norm(x, scale, eps: float, dtype, offset: float = 0.0, scale_float32: bool = False):
    """RMSNorm computed in float32, scaled after casting back to `dtype` (transformers' Llama order); with an `offset`
    (Gemma's 1 + w) or `scale_float32` (OLMo 2), scaled by `offset + scale` in float32 and then cast."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    # explicit broadcast: the project runs with jax_numpy_rank_promotion='raise'
    shape = (1,) * (x.ndim - 1) + (-1,)
    if offset or scale_float32:
        return (y * (offset + scale.astype(jnp.float32)).reshape(shape)).astype(dtype)
    return scale.astype(dtype).reshape(shape) * y.astype(dtype)


class RMSNorm(nn.Module):
    """`rms_norm` with its learned scale (initialised to the identity: ones, or zeros with an offset)."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    offset: float = 0.0
    scale_float32: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, (NORM,)), (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale, self.eps, self.dtype, self.offset, self.scale_float32)


def _norm(cfg: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, cfg.norm_offset, cfg.norm_scale_float32,
                   name=name)


def softcap(x, cap: float | None):
    """cap * tanh(x / cap) (Gemma 2's soft-capping of attention scores and logits); x itself for None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def _scores(q_BxKxGxTxD, k_BxKxSxD, mask_BxTxS, cap: float | None = None):
    """Scaled (and soft-capped) attention scores in (at least) float32, masked entries at the float32 minimum.

    The dot returns float32 (`preferred_element_type`), as fused attention kernels accumulate: a bf16 product
    was rounded to bf16 before the cast, up to 0.25 on scores near 100 (the spacing of bf16 there is 0.5)."""
    d = q_BxKxGxTxD.shape[-1]
    acc = jnp.promote_types(q_BxKxGxTxD.dtype, jnp.float32)  # float64 stays float64 (gradient checks)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q_BxKxGxTxD, k_BxKxSxD, preferred_element_type=acc) * (d ** -0.5)
    return jnp.where(mask_BxTxS[:, None, None, :, :], softcap(scores, cap), jnp.finfo(jnp.float32).min)


def attention_core(q_BxKxGxTxD, k_BxKxSxD, v_BxKxSxD, mask_BxTxS, cap: float | None = None):
    """softmax(softcap(q k^T / sqrt(d), cap)) v over head-major operands; softmax in float32.

    The backward is written out (flash-attention style): the forward keeps the
    row max and 1/row-sum, not the [B, K, G, T, S] probabilities, and the
    backward recomputes them from q and k. Autodiff kept the probabilities of
    every layer as scan residuals (30 x 19 MB at 8 x 256 on SmolLM2) and ran
    the softmax backward as separate passes over them; this costs one extra
    score dot instead. Whole SFT step on SmolLM2, 8 x 256, 2 CPU cores:
    16.1-16.2 -> 13.4-13.7 s (BUILD_NOTES, session 8).
    """
    return _attention_core(q_BxKxGxTxD, k_BxKxSxD, v_BxKxSxD, mask_BxTxS, cap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q, k, v, mask, cap):
    return _attention_fwd(q, k, v, mask, cap)[0]  # one forward, with or without grad


@functools.partial(jax.tree_util.register_dataclass, data_fields=["full", "sliding", "flag"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _PickedMask:
    """A layer's mask in a model that mixes windowed and full layers: both masks and the layer's flag, resolved
    inside `attention_core`. Passed whole, the loop-invariant masks stay one copy among the scan's saved values; a
    per-layer `jnp.where` was saved for the backward once per layer ([B, T, S] bytes a layer: 930.9 vs 788.9 MiB of
    temporaries for 8 layers at 4 x 2048 without remat; helper review, session 39)."""

    full: jax.Array
    sliding: jax.Array
    flag: jax.Array

    @property
    def shape(self):
        return self.full.shape


def _resolve(mask):
    return jnp.where(mask.flag, mask.sliding, mask.full) if isinstance(mask, _PickedMask) else mask


def _attention_fwd(q, k, v, mask, cap):
    s = _scores(q, k, _resolve(mask), cap)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    inv_l = 1.0 / jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->bkgtd", (e * inv_l).astype(v.dtype), v)
    return out, (q, k, v, mask, out, m, inv_l)


def _attention_bwd(cap, res, d_out):
    q, k, v, mask, out, m, inv_l = res
    mask = _resolve(mask)
    s = _scores(q, k, mask, cap)
    p = jnp.exp(s - m) * inv_l  # the forward's probabilities, bit for bit
    dv = jnp.einsum("bkgts,bkgtd->bksd", p.astype(v.dtype), d_out)
    dp = jnp.einsum("bkgtd,bksd->bkgts", d_out, v, preferred_element_type=p.dtype)
    delta = jnp.sum(d_out.astype(p.dtype) * out.astype(p.dtype), axis=-1, keepdims=True)
    # masked scores are constants: no gradient, also in rows with no visible key (uniform p there)
    ds = jnp.where(mask[:, None, None, :, :], p * (dp - delta), 0.0)
    if cap is not None:  # d cap tanh(x / cap) / dx = 1 - tanh^2 (masked slots hold the float32 minimum: skipped)
        ds = jnp.where(mask[:, None, None, :, :], ds * (1 - jnp.square(s / cap)), 0.0)
    ds = (ds * (q.shape[-1] ** -0.5)).astype(q.dtype)
    dq = jnp.einsum("bkgts,bksd->bkgtd", ds, k)
    dk = jnp.einsum("bkgts,bkgtd->bksd", ds, q)
    return dq, dk, dv, None


_attention_core.defvjp(_attention_fwd, _attention_bwd)


def _attend(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, cap: float | None = None):
    """Grouped-query attention over token-major q/k/v; returns [B, T, H * D].

    Heads are moved in front of the sequence axes before the two batched dots
    ([B, K, G, T, D] x [B, K, S, D]): XLA:CPU then runs both dots on contiguous
    per-head operands. Measured against the same dots on the token-major layout
    (SmolLM2-135M trunk, 2 cores): forward 8 x 256 2.83 -> 2.62 s, 32 x 256 13.5 -> 12.2 s,
    forward + backward 8 x 256 10.8 -> 10.4 s.
    """
    b, t, h, d = q_BxTxHxD.shape
    kv = k_BxSxKxD.shape[2]
    q = q_BxTxHxD.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    k, v = k_BxSxKxD.transpose(0, 2, 1, 3), v_BxSxKxD.transpose(0, 2, 1, 3)
    out = attention_core(q, k, v, mask_BxTxS, cap)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)


def _attend_prefix_groups(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_pp, mask_c, cap: float | None = None):
    """`_attend` over rows packing a prefix and g continuations (masks from `prefix_group_masks`).

    Two attention calls instead of one over all slots: the prefix over itself, and each
    continuation (as its own row) over the prefix's keys/values (broadcast g times) and its
    own; the gradient of the broadcast sums over the group.
    """
    b, _, h, d = q_BxTxHxD.shape
    kv, p, n = k_BxTxKxD.shape[2], mask_pp.shape[1], mask_c.shape[1]
    g = mask_c.shape[0] // b
    out_p = _attend(q_BxTxHxD[:, :p], k_BxTxKxD[:, :p], v_BxTxKxD[:, :p], mask_pp, cap)

    def keys(x):  # [B, T, K, D] -> [B * g, P + N, K, D]
        shared = jnp.broadcast_to(x[:, None, :p], (b, g, p, kv, d))
        return jnp.concatenate([shared, x[:, p:].reshape(b, g, n, kv, d)], axis=2).reshape(b * g, p + n, kv, d)

    out_c = _attend(q_BxTxHxD[:, p:].reshape(b * g, n, h, d), keys(k_BxTxKxD), keys(v_BxTxKxD), mask_c, cap)
    return jnp.concatenate([out_p, out_c.reshape(b, g * n, h * d)], axis=1)


class _LayerMasks(NamedTuple):
    """The masks of the full-attention and of the windowed layers, for models that mix them (`mixed_layers`);
    each is a [B, T, S] mask or `prefix_group_masks`' pair."""

    full: object
    sliding: object


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, flags=None):
        """`flags` (mixed models only): this layer's traced (windowed, rotates) pair; the first picks its mask from
        `_LayerMasks` and its RoPE base, the second RoPE or none."""
        cfg = self.cfg
        b, t, _ = x_BxTxD.shape
        h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _dense(cfg, h * hd, (EMBED, Q_HEADS), "q_proj", cfg.qkv_bias)(x_BxTxD)
        k = _dense(cfg, kvh * hd, (EMBED, KV_HEADS), "k_proj", cfg.qkv_bias)(x_BxTxD)
        v = _dense(cfg, kvh * hd, (EMBED, KV_HEADS), "v_proj", cfg.qkv_bias)(x_BxTxD).reshape(b, t, kvh, hd)
        if cfg.qk_norm and not cfg.qk_norm_per_head:  # OLMo 2: one norm over all heads, before the split
            q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
        q, k = q.reshape(b, t, h, hd), k.reshape(b, t, kvh, hd)
        if cfg.qk_norm and cfg.qk_norm_per_head:
            q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
        sliding = flags[0] if cfg.mixed_windows else cfg.layer_window(0) is not None
        q, k = _rope_qk(cfg, q, k, positions_BxT, sliding, flags[1] if cfg.mixed_rope else cfg.layer_rope(0))
        if cfg.mixed_windows:
            mask_BxTxS = jax.tree.map(lambda full, win: _PickedMask(full, win, sliding), *mask_BxTxS)
        if isinstance(mask_BxTxS, tuple):  # (prefix block, continuation blocks): packed rows, `prefix_group_masks`
            out = _attend_prefix_groups(q, k, v, *mask_BxTxS, cfg.attn_logit_softcap)
        else:
            out = _attend(q, k, v, mask_BxTxS, cfg.attn_logit_softcap)
        return _dense(cfg, cfg.hidden_size, (Q_HEADS, EMBED), "o_proj")(out), KVCache(k, v)


class _Kernel(nn.Module):
    """A bare `[in, out]` kernel under `<name>/kernel` (the same tree `nn.Dense` would make)."""

    shape: tuple[int, int]
    axes: tuple[str, str]
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes)
        return self.param("kernel", init, self.shape, self.param_dtype)


_GELU_C = math.sqrt(2.0 / math.pi)


def activation(name: str):
    """The gate's activation: SiLU (SwiGLU) or the tanh-approximated GELU (GeGLU: torch's gelu_pytorch_tanh)."""
    return jax.nn.silu if name == "silu" else functools.partial(jax.nn.gelu, approximate=True)


def _activation_and_derivative(name: str, g):
    if name == "silu":
        sig = jax.nn.sigmoid(g)
        return g * sig, sig * (1 + g * (1 - sig))
    t = jnp.tanh(_GELU_C * (g + 0.044715 * g * g * g))
    return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * g * g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gated_mlp(x_NxD, w_gate_DxF, w_up_DxF, w_down_FxD, act: str):
    """down(act(x @ gate) * (x @ up)) with a hand-written backward; `act` "silu" (SwiGLU) or "gelu_tanh" (GeGLU).

    Autodiff's backward of this block made XLA:CPU emit the SwiGLU derivative as
    elementwise fusions writing a transposed [F, N] layout (strided stores: ~3.5 s
    of a 19.8 s trunk backward on SmolLM2, 8 x 256). The explicit VJP below keeps
    every activation [N, F] and forms weight gradients as `x^T dY` dots: trunk
    forward + backward 19.8 s -> 13.7 s, gradients equal within 1.4e-6 relative.
    """
    return (activation(act)(x_NxD @ w_gate_DxF) * (x_NxD @ w_up_DxF)) @ w_down_FxD


def _gated_fwd(x, wg, wu, wd, act):
    g, u = x @ wg, x @ wu
    return (activation(act)(g) * u) @ wd, (x, g, u, wg, wu, wd)


def _gated_bwd(act, res, dy):
    x, g, u, wg, wu, wd = res
    a, d_act = _activation_and_derivative(act, g)
    da = dy @ wd.T
    du = da * a
    dg = da * u * d_act
    dx = dg @ wg.T + du @ wu.T
    dwd = jnp.einsum("nf,nd->fd", a * u, dy)
    return dx, jnp.einsum("nd,nf->df", x, dg), jnp.einsum("nd,nf->df", x, du), dwd


gated_mlp.defvjp(_gated_fwd, _gated_bwd)


def swiglu_mlp(x_NxD, w_gate_DxF, w_up_DxF, w_down_FxD):
    """`gated_mlp` with SiLU."""
    return gated_mlp(x_NxD, w_gate_DxF, w_up_DxF, w_down_FxD, "silu")


class GatedMLP(nn.Module):
    """SwiGLU / GeGLU MLP; params `gate_proj/kernel`, `up_proj/kernel` [D, F], `down_proj/kernel` [F, D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        d, f = cfg.hidden_size, cfg.intermediate_size
        kernel = lambda shape, axes, name: _Kernel(shape, axes, cfg.jnp_param_dtype, name=name)().astype(  # noqa: E731
            cfg.jnp_dtype)
        wg = kernel((d, f), (EMBED, MLP), "gate_proj")
        wu = kernel((d, f), (EMBED, MLP), "up_proj")
        wd = kernel((f, d), (MLP, EMBED), "down_proj")
        lead = x.shape[:-1]
        return gated_mlp(x.astype(cfg.jnp_dtype).reshape(-1, d), wg, wu, wd, cfg.hidden_act).reshape(lead + (d,))


class DecoderLayer(nn.Module):
    """Pre-norm block (Gemma 2/3: sublayer outputs normed too; OLMo 2: outputs only). Returns (hidden, this layer's
    fresh keys/values). `decode_step` is its one-token twin."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions_BxT, mask_BxTxS, flags=None):
        cfg = self.cfg
        x = constrain_batch(x)  # rows over the mesh's batch axes (else XLA follows the weights' fsdp split of D)
        attn_out, kv = Attention(cfg, name="self_attn")(
            _norm(cfg, "input_layernorm")(x) if cfg.pre_norms else x, positions_BxT, mask_BxTxS, flags)
        if not cfg.sandwich_norms:
            h = x + attn_out
            return h + GatedMLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(h)), kv
        h = x + _norm(cfg, "post_attention_layernorm")(attn_out)
        mlp_out = GatedMLP(cfg, name="mlp")(_norm(cfg, "pre_feedforward_layernorm")(h) if cfg.pre_norms else h)
        return h + _norm(cfg, "post_feedforward_layernorm")(mlp_out), kv


def _remat_policy(name: str):
    return {"full": jax.checkpoint_policies.nothing_saveable,
            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


class Transformer(nn.Module):
    """The whole decoder over a full (left-padded) sequence.

    Returns (logits_BxTxV or None, hidden_BxTxD after the final norm, kv) where kv
    is a `KVCache` of stacked [L, B, T, kv_heads, head_dim] keys/values (used by
    prefill; dead code elsewhere, which XLA removes).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, attn_mask_BxT, return_logits: bool = True,
                 shared_prefix: tuple[int, int] | None = None):
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED)),
                         name="embed_tokens")
        x = _scale_embeddings(cfg, constrain_lookup(embed(tokens_BxT)))
        slots = jnp.arange(tokens_BxT.shape[1])

        def masks(window):
            if shared_prefix is None:
                return attention_mask(slots, slots, attn_mask_BxT, window)
            return prefix_group_masks(attn_mask_BxT, positions_BxT, *shared_prefix, window)

        block = DecoderLayer
        if cfg.remat != "none":
            block = nn.remat(block, policy=_remat_policy(cfg.remat), prevent_cse=False)
        scanned = (nn.broadcast, nn.broadcast)
        inputs = (positions_BxT, masks(cfg.layer_window(0)))
        if cfg.mixed_layers:  # each layer picks its mask, its RoPE base and RoPE or none by scanned flags
            scanned += (0,)
            layer_masks = _LayerMasks(masks(None), masks(cfg.sliding_window)) if cfg.mixed_windows else inputs[1]
            flags = [(cfg.layer_window(i) is not None, cfg.layer_rope(i)) for i in range(cfg.num_layers)]
            inputs = (positions_BxT, layer_masks, tuple(jnp.asarray(f) for f in zip(*flags)))
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=scanned,
                         length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: LAYERS})
        x, kv = layers(cfg, name="layers")(x, *inputs)
        hidden = _norm(cfg, "norm")(x)
        if not return_logits and not self.is_initializing():
            return None, hidden, kv
        if not self.is_initializing():  # the head's product accumulated and returned in (at least) float32
            return lm_logits(self.variables["params"], cfg, hidden), hidden, kv
        if cfg.tie_word_embeddings:
            logits = embed.attend(hidden)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.jnp_dtype,
                              param_dtype=cfg.jnp_param_dtype, name="lm_head",
                              kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                       (EMBED, VOCAB)))(hidden)
        return logits, hidden, kv


def init_params(cfg: ModelConfig, rng: jax.Array, boxed: bool = False):
    """Random parameters (N(0, 0.02) kernels, unit norms). `boxed` keeps logical-axis metadata."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Transformer(cfg).init(rng, tokens, tokens, jnp.ones((1, 1), jnp.int32))
    return variables["params"] if boxed else nn.meta.unbox(variables["params"])


def param_logical_axes(cfg: ModelConfig):
    """Pytree of logical PartitionSpecs (one per parameter), without allocating anything."""
    abstract = jax.eval_shape(functools.partial(init_params, cfg, boxed=True), jax.random.key(0))
    return nn.get_partition_spec(abstract)


def forward(params, cfg: ModelConfig, tokens_BxT, attn_mask_BxT, positions_BxT=None, return_logits=True,
            shared_prefix: tuple[int, int] | None = None):
    """(logits_BxTxV | None, hidden_BxTxD) of a left-padded batch.

    `shared_prefix=(P, g)` (with explicit positions) switches to packed rows
    ``[prefix (P slots) | c_1 | ... | c_g]``: see `prefix_group_masks`.
    """
    if positions_BxT is None:
        if shared_prefix is not None:
            raise ValueError("packed rows (shared_prefix) need explicit positions_BxT")
        positions_BxT = positions_from_mask(attn_mask_BxT)
    logits, hidden, _ = Transformer(cfg).apply({"params": params}, tokens_BxT, positions_BxT, attn_mask_BxT,
                                               return_logits=return_logits, shared_prefix=shared_prefix)
    return logits, hidden


def lm_head_weight(params, cfg: ModelConfig) -> tuple[jax.Array, bool]:
    """(output projection in the compute dtype, vocab_major): the tied embedding [V, D], else lm_head [D, V]."""
    if cfg.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].astype(cfg.jnp_dtype), True
    return params["lm_head"]["kernel"].astype(cfg.jnp_dtype), False


def lm_logits(params, cfg: ModelConfig, hidden_BxTxD):
    """Project final hidden states to vocabulary logits (tied or separate head), in (at least) float32.

    The product runs in the compute dtype but accumulates into and returns float32 (`preferred_element_type`):
    bf16 logits were rounded by up to 0.06 before the float32 log-softmax, log-probs of sampled tokens by up to
    0.04, which is larger than the per-token KL to the reference that the RL reward subtracts (helper review,
    session 21). Free on the matrix units (they accumulate in f32); no change in float32. Soft-capped in float32
    where the model caps its logits (Gemma 2's `final_logit_softcap`)."""
    w, vocab_major = lm_head_weight(params, cfg)
    logits = jnp.einsum("...d,vd->...v" if vocab_major else "...d,dv->...v", hidden_BxTxD.astype(cfg.jnp_dtype), w,
                        preferred_element_type=jnp.promote_types(cfg.jnp_dtype, jnp.float32))
    return softcap(logits, cfg.final_logit_softcap)


# ----------------------------------------------------------------------------- decoding


def unstack_layers(params, cfg: ModelConfig | None = None) -> list:
    """Per-layer decode parameters from the stacked [L, ...] layout (one copy, outside the decode loop).

    The decode layout fuses the projections that read the same input, so each
    step runs 4 GEMMs per layer instead of 7 (small-M GEMMs are dispatch-bound):

        qkv      [D, (H + 2 K) hd]  = q_proj | k_proj | v_proj   (+ qkv_bias)
        o        [H hd, D]
        gate_up  [D, 2 F]           = gate_proj | up_proj
        down     [F, D]
        ln1, ln2 [D]                  RMSNorm scales of the attention's and the MLP's inputs (not OLMo 2's)
        q_norm, k_norm [hd]           per-head q / k RMSNorm scales (qk_norm only; OLMo 2: [H hd], [K hd])
        attn_out_norm, mlp_out_norm [D]  RMSNorm scales of the sublayers' outputs (sandwich_norms only)

    `cfg` gives the compute dtype the kernels are cast to (default: kept as stored).
    """
    lp = params["layers"]
    dtype = cfg.jnp_dtype if cfg is not None else None
    cast = (lambda a: a.astype(dtype)) if dtype is not None else (lambda a: a)  # noqa: E731
    attn, mlp = lp["self_attn"], lp["mlp"]
    sandwich = "post_feedforward_layernorm" in lp
    pre_mlp = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
    stacked = {
        "qkv": cast(jnp.concatenate([attn[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj")], axis=-1)),
        "o": cast(attn["o_proj"]["kernel"]),
        "gate_up": cast(jnp.concatenate([mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"]], axis=-1)),
        "down": cast(mlp["down_proj"]["kernel"]),
    }
    if "input_layernorm" in lp:  # (OLMo 2 norms the sublayers' outputs only)
        stacked["ln1"] = lp["input_layernorm"]["scale"]
    if pre_mlp in lp:
        stacked["ln2"] = lp[pre_mlp]["scale"]
    if "q_norm" in attn:
        stacked["q_norm"], stacked["k_norm"] = attn["q_norm"]["scale"], attn["k_norm"]["scale"]
    if sandwich:
        stacked["attn_out_norm"] = lp["post_attention_layernorm"]["scale"]
        stacked["mlp_out_norm"] = lp["post_feedforward_layernorm"]["scale"]
    if "bias" in attn["q_proj"]:
        stacked["qkv_bias"] = cast(jnp.concatenate([attn[n]["bias"] for n in ("q_proj", "k_proj", "v_proj")], -1))
    n = stacked["qkv"].shape[0]
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]


def prefill(params, cfg: ModelConfig, tokens_BxP, attn_mask_BxP, cache_len: int):
    """Run the prompt; return (logits at the last slot [B, V], hidden_BxPxD, per-layer caches of length S).

    Prompts are left-padded so the last slot holds every row's last prompt token.
    Decode caches: keys [B, K, hd, S] and values [B, K, S, hd], the layouts the two
    attention dots of a decode step consume as plain [hd x S] / [S x hd] matrices.
    """
    positions = positions_from_mask(attn_mask_BxP)
    _, hidden, kv = Transformer(cfg).apply({"params": params}, tokens_BxP, positions, attn_mask_BxP,
                                           return_logits=False)
    b, p = tokens_BxP.shape
    pad_s = cache_len - p
    # [B,P,K,D] -> keys [B,K,D,S], values [B,K,S,D]
    keys = lambda x: jnp.pad(x.transpose(0, 2, 3, 1), ((0, 0), (0, 0), (0, 0), (0, pad_s)))  # noqa: E731
    values = lambda x: jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad_s), (0, 0)))  # noqa: E731
    caches = [KVCache(keys(kv.k[i]), values(kv.v[i])) for i in range(cfg.num_layers)]
    return lm_logits(params, cfg, hidden[:, -1, :]), hidden, caches


def _fused_qkv(p, cfg: ModelConfig, x_NxD):
    """[N, (H + 2K) hd] = norm(x) @ (q | k | v) (+ bias), from `unstack_layers`' fused weights."""
    qkv = (_rms(x_NxD, p["ln1"], cfg) if "ln1" in p else x_NxD) @ p["qkv"]
    return qkv + p["qkv_bias"][None, :] if "qkv_bias" in p else qkv


def _split_qkv(p, cfg: ModelConfig, qkv_Nx3, lead: tuple[int, ...]):
    """Fused [..., (H + 2K) hd] -> q [*lead, H, hd], k [*lead, K, hd], v [*lead, K, hd], q and k normed (per head,
    or over all heads for OLMo 2) where the model has q/k norms (before RoPE, as `Attention`)."""
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k = qkv_Nx3[..., : h * hd], qkv_Nx3[..., h * hd: (h + kvh) * hd]
    if "q_norm" in p and not cfg.qk_norm_per_head:  # OLMo 2: over all heads at once
        q, k = _rms(q, p["q_norm"], cfg), _rms(k, p["k_norm"], cfg)
    q, k = q.reshape(*lead, h, hd), k.reshape(*lead, kvh, hd)
    v = qkv_Nx3[..., (h + kvh) * hd:].reshape(*lead, kvh, hd)
    if "q_norm" in p and cfg.qk_norm_per_head:
        q, k = _rms(q, p["q_norm"], cfg), _rms(k, p["k_norm"], cfg)
    return q, k, v


def _fused_out_mlp(p, cfg: ModelConfig, x_NxD, attn_NxHD):
    """The rest of the layer after attention: residual + o-projection, then residual + gated MLP (fused gate|up);
    each sublayer's output normed first where the model does (sandwich_norms)."""
    out = attn_NxHD @ p["o"]
    x = x_NxD + (_rms(out, p["attn_out_norm"], cfg) if "attn_out_norm" in p else out)
    gate_up = (_rms(x, p["ln2"], cfg) if "ln2" in p else x) @ p["gate_up"]
    f = cfg.intermediate_size
    out = (activation(cfg.hidden_act)(gate_up[:, :f]) * gate_up[:, f:]) @ p["down"]
    return x + (_rms(out, p["mlp_out_norm"], cfg) if "mlp_out_norm" in p else out)


def _rows(fn, n_rows, inputs: tuple, width: int, chunk: int, dtype):
    """`fn` over the first `n_rows` (traced) rows of `inputs`, `chunk` rows at a time; later rows are 0.

    Static shapes, dynamic work: a while loop runs ceil(n_rows / chunk) chunks, so the
    FLOPs follow the number of real rows, not the buffer size (a multiple of `chunk`).
    """
    out = jnp.zeros((inputs[0].shape[0], width), dtype)

    def body(i, out):
        parts = [jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=0) for a in inputs]
        return jax.lax.dynamic_update_slice_in_dim(out, fn(*parts).astype(dtype), i * chunk, axis=0)

    return jax.lax.fori_loop(0, (n_rows + chunk - 1) // chunk, body, out)


def packed_prefill(params, layer_params: list, cfg: ModelConfig, tokens_BxP, attn_mask_BxP, cache_len: int,
                   chunk: int = 256):
    """`prefill` that spends the per-token FLOPs on real prompt tokens only (no padding).

    Left-padded prompts of different lengths leave much of `[B, P]` as padding (the
    benchmark's 32 GSM8K prompts: 2,866 real tokens of 5,120). The weight GEMMs, which
    are per token, run on the real tokens gathered into a compact `[tokens, D]` buffer,
    `chunk` rows at a time in a loop whose trip count follows their number; attention,
    which needs rows, runs on the padded `[B, P]` layout (a gather there and back per
    layer: cheap next to the GEMMs). Returns (last-slot logits [B, V], last-slot hidden
    state after the final norm [B, D], per-layer caches of length `cache_len`) like
    `prefill`; padding slots of the caches hold finite filler (zeros or a padding token's
    projections; masked by every reader).
    `layer_params` are `unstack_layers(params, cfg)`, as `decode_step` takes them.
    """
    b, p = tokens_BxP.shape
    h, kvh, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    dtype = cfg.jnp_dtype
    valid = attn_mask_BxP.astype(bool)
    chunk = min(chunk, b * p)
    rows = -(-(b * p) // chunk) * chunk
    # compact row j <- padded slot order[j]: real tokens first (stable), then padding
    order = jnp.argsort((~valid).reshape(-1).astype(jnp.int32), stable=True).astype(jnp.int32)
    inverse = jnp.zeros((b * p,), jnp.int32).at[order].set(jnp.arange(b * p, dtype=jnp.int32))
    order = jnp.pad(order, (0, rows - b * p))
    n_real = jnp.sum(valid.astype(jnp.int32))
    positions = positions_from_mask(attn_mask_BxP)
    x = jnp.take(params["embed_tokens"]["embedding"], jnp.take(tokens_BxP.reshape(-1), order), axis=0).astype(dtype)
    x = _scale_embeddings(cfg, x)
    slots = jnp.arange(p)
    windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
    masks = {w: attention_mask(slots, slots, valid, w) for w in dict.fromkeys(windows)}
    pad_s = cache_len - p
    caches = []
    for i, (lp, window) in enumerate(zip(layer_params, windows)):
        project = functools.partial(_fused_qkv, lp, cfg)
        qkv = jnp.take(_rows(project, n_real, (x,), (h + 2 * kvh) * hd, chunk, dtype), inverse, axis=0)
        q, k, v = _split_qkv(lp, cfg, qkv, (b, p))
        q, k = _rope_qk(cfg, q, k, positions, window is not None, cfg.layer_rope(i))
        attn = jnp.take(_attend(q, k, v, masks[window], cfg.attn_logit_softcap).reshape(b * p, h * hd), order, axis=0)
        x = _rows(functools.partial(_fused_out_mlp, lp, cfg), n_real, (x, attn), d, chunk, dtype)
        caches.append(KVCache(jnp.pad(k.transpose(0, 2, 3, 1), ((0, 0), (0, 0), (0, 0), (0, pad_s))),
                              jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad_s), (0, 0)))))
    hidden = _rms(jnp.take(x, inverse[p - 1::p], axis=0), params["norm"]["scale"], cfg)
    return lm_logits(params, cfg, hidden), hidden, caches


def _rms(x, scale, cfg: ModelConfig):
    return rms_norm(x, scale, cfg.rms_norm_eps, cfg.jnp_dtype, cfg.norm_offset, cfg.norm_scale_float32)


def _decode_layer(p, cfg: ModelConfig, x_BxD, positions_B, mask_BxS, cache: KVCache, cache_index,
                  sliding: bool = False, rope: bool = True):
    """One decoder layer for one new token per row against the [B,K,hd,S] / [B,K,S,hd] caches (`sliding`: a
    windowed layer, for its RoPE base; `rope`: False for a NoPE layer)."""
    x_BxD = constrain_batch(x_BxD)
    b = x_BxD.shape[0]
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = h // kvh
    q, k, v = _split_qkv(p, cfg, _fused_qkv(p, cfg, x_BxD), (b, 1))
    v = v.reshape(b, kvh, 1, hd)
    q, k = _rope_qk(cfg, q, k, positions_B[:, None], sliding, rope)
    q, k = q.reshape(b, kvh, g, hd), k.reshape(b, kvh, hd, 1)
    cache = KVCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, 0, 0, cache_index)),
                    jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, 0, cache_index, 0)))
    attn = decode_attention(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), mask_BxS,
                            cfg.attn_logit_softcap).reshape(b, h * hd)
    return _fused_out_mlp(p, cfg, x_BxD, attn), cache


def decode_attention(q_BxKxGxD, k_BxKxDxS, v_BxKxSxD, mask_BxS, cap: float | None = None):
    """One query per row against the cache: softmax(softcap(q k / sqrt(d), cap)) v, scores summed and softmaxed in
    float32 (as `_scores`: a bf16 product rounded scores near 100 by up to 0.25 before the float32 softmax)."""
    scores = jnp.einsum("bkgd,bkds->bkgs", q_BxKxGxD, k_BxKxDxS,
                        preferred_element_type=jnp.float32) * (q_BxKxGxD.shape[-1] ** -0.5)
    scores = jnp.where(mask_BxS[:, None, None, :], softcap(scores, cap), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BxKxGxD.dtype)
    return jnp.einsum("bkgs,bksd->bkgd", probs, v_BxKxSxD)


def decode_step(params, layer_params: list, cfg: ModelConfig, tokens_B, positions_B, caches: list,
                cache_index, key_valid_BxS):
    """One token for every row: returns (logits_BxV, hidden_BxD, updated caches).

    `layer_params` comes from `unstack_layers`; `cache_index` (a traced int) is the
    slot written this step; `key_valid_BxS` marks slots that hold real tokens
    (already including `cache_index`). Layers are unrolled so each step updates
    every cache buffer in place.
    """
    x = constrain_lookup(jnp.take(params["embed_tokens"]["embedding"], tokens_B, axis=0).astype(cfg.jnp_dtype))
    x = _scale_embeddings(cfg, x)
    s = key_valid_BxS.shape[1]
    windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
    masks = {w: attention_mask(jnp.reshape(cache_index, (1,)), jnp.arange(s), key_valid_BxS, w)[:, 0]
             for w in dict.fromkeys(windows)}
    new_caches = []
    for i, (p_i, cache, window) in enumerate(zip(layer_params, caches, windows)):
        x, cache = _decode_layer(p_i, cfg, x, positions_B, masks[window], cache, cache_index, window is not None,
                                 cfg.layer_rope(i))
        new_caches.append(cache)
    hidden = _rms(x, params["norm"]["scale"], cfg)
    return lm_logits(params, cfg, hidden), hidden, new_caches


class ValueHead(nn.Module):
    """ReFT's critic head: Dropout(0.1) + Linear(hidden, 1) on the policy's last hidden state.

    Matches trl's `AutoModelForCausalLMWithValueHead` used by the ReFT authors
    (`summary_dropout_prob` 0.1), its initialisation included: they pass no
    `v_head_init_strategy`, so the head keeps torch's `nn.Linear` default, weight
    and bias uniform in +-1/sqrt(hidden) (a std of 0.58 on unit hidden states at
    any width; N(0, 0.02) gave 0.47 at 576 and 1.26 at 4096). Computed in float32.
    """

    dropout: float = 0.1

    @nn.compact
    def __call__(self, hidden_BxTxD, deterministic: bool = True):
        h = nn.Dropout(self.dropout)(hidden_BxTxD.astype(jnp.float32), deterministic=deterministic)
        bound = hidden_BxTxD.shape[-1] ** -0.5

        def uniform(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        out = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32, name="summary",
                       kernel_init=nn.with_logical_partitioning(uniform, (EMBED, None)),
                       bias_init=nn.with_logical_partitioning(uniform, (None,)))(h)
        return out[..., 0]


def init_value_head(cfg: ModelConfig, rng: jax.Array, dropout: float = 0.1):
    return nn.meta.unbox(ValueHead(dropout).init(rng, jnp.zeros((1, 1, cfg.hidden_size)))["params"])
