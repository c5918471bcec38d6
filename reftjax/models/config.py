"""ModelConfig: the static description of a Llama-family decoder.

One frozen (hashable) dataclass covers Llama 2/3 (incl. Llama-3 RoPE scaling),
Mistral (sliding window), Qwen2/2.5 (qkv bias, windows on the upper layers), Qwen3
(per-head q/k RMSNorm), SmolLM2 (tied embeddings), Gemma (GeGLU, norms scaled by 1 + w,
scaled embeddings), Gemma 2 (also: norms around both sublayers, windowed layers among global
ones, tanh soft-capping of attention scores and final logits), Gemma 3 (Gemma 2's parts without
the soft-capping, with q/k norms and the windowed layers' own RoPE base) and OLMo 2 (sublayer
outputs normed, inputs not; q/k norms over all heads at once).
Being hashable it can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

# each supported Hugging Face model_type and its transformers class, written as config.json's `architectures` on
# export (serving stacks such as vLLM pick the class from it; transformers' own table imports torch)
CAUSAL_LM_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                     "gemma3_text": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                     "smollm3": "SmolLM3ForCausalLM", "phi3": "Phi3ForCausalLM"}
SUPPORTED_MODEL_TYPES = tuple(CAUSAL_LM_CLASSES)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ROPE_KINDS = ("default", "linear", "llama3", "yarn", "longrope")
ACTIVATIONS = ("silu", "gelu_tanh")  # the gate's activation: SwiGLU (Llama, Qwen, Mistral) or GeGLU (Gemma)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "default", "linear", "llama3", "yarn" (YaRN: Qwen3's and SmolLM3's
    long-context setting; `attention_factor` multiplies cos and sin, `beta_fast` / `beta_slow` bound the ramp between
    extrapolated and interpolated frequencies, `truncate` rounds its ends outwards, as transformers) or "longrope"
    (Phi-3's: each frequency divided by its `short_factor` or its `long_factor`; `attention_factor` as YaRN's).

    `factors` picks LongRoPE's set: "auto" as transformers (the long factors in a forward whose longest position,
    over the whole batch, passes `original_max_position_embeddings`), or "short" / "long" for every forward. "auto"
    makes a row's logits depend on the other rows of its batch, and a generation that passes the original context
    midway samples from other log-probs than a forward over the finished sequence computes; the training loop pins
    one set for the whole run (`train.pin_longrope`)."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    factors: str = "auto"

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"unsupported rope scaling type {self.kind!r} ({', '.join(ROPE_KINDS)})")
        if self.factors not in ("auto", "short", "long") or (self.factors != "auto" and self.kind != "longrope"):
            raise ValueError(f"factors={self.factors!r}: LongRoPE's choice, 'auto', 'short' or 'long' (else 'auto')")
        for name in ("short_factor", "long_factor"):
            object.__setattr__(self, name, tuple(float(f) for f in getattr(self, name)))
        if (self.kind == "longrope") != bool(self.short_factor and self.long_factor):
            raise ValueError("short_factor and long_factor are longrope's (both needed there, not taken elsewhere)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a decoder-only transformer.

    Attributes:
      vocab_size: number of token embeddings.
      hidden_size: model width D.
      intermediate_size: SwiGLU inner width F.
      num_layers: decoder blocks L.
      num_heads: query heads H.
      num_kv_heads: key/value heads (GQA when < num_heads).
      head_dim: per-head width (hidden_size // num_heads unless set).
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base frequency.
      rope_scaling: RoPE frequency scaling (Llama 3 long-context, linear).
      max_position_embeddings: longest position the model was trained for.
      tie_word_embeddings: logits use the input embedding matrix (SmolLM2).
      qkv_bias: q/k/v projections carry a bias (Qwen2).
      qk_norm: queries and keys pass through an RMSNorm over each head (scales [head_dim]) before RoPE (Qwen3).
      qk_norm_per_head: False: the q/k norms run over all heads at once (scales [H * hd] and [K * hd], OLMo 2).
      sliding_window: attend only to the last `sliding_window` keys (Mistral), or None.
      sliding_layers: which layers the window applies to, one flag per layer (Gemma 2/3's local layers, Qwen2's
        upper layers); empty: every layer (when `sliding_window` is set).
      local_rope_theta: RoPE base of the windowed layers (Gemma 3's 10,000, unscaled), or None: `rope_theta`.
      rope_layers: which layers rotate q and k, one flag per layer (SmolLM3's NoPE layers, every fourth, have no
        position encoding at all); empty: every layer.
      rotary_dim: the leading dims of each head that RoPE rotates, the rest passing through (Phi-4-mini's
        partial_rotary_factor 0.75); 0: all of head_dim (`rope_dim`).
      hidden_act: the gate's activation, "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma's gelu_pytorch_tanh).
      norm_offset: every RMSNorm scales by `norm_offset + scale` in float32 (Gemma: 1.0, the weights stored as
        Hugging Face stores them); 0.0 is Llama's norm.
      embed_scale: input embeddings are multiplied by sqrt(hidden_size) (Gemma).
      query_pre_attn_scalar: attention scores are scaled by its -1/2 power instead of head_dim's (Gemma 2/3).
      sandwich_norms: each sublayer's output is normed too before its residual add (Gemma 2/3's
        post_attention_layernorm and post_feedforward_layernorm; its pre_feedforward_layernorm is the MLP's
        input norm).
      pre_norms: False: the sublayers' inputs are not normed (OLMo 2: no input_layernorm, no
        pre_feedforward_layernorm; needs sandwich_norms).
      norm_scale_float32: every RMSNorm multiplies its scale in float32, then casts (OLMo 2's order; Gemma's
        with its offset); False: cast, then multiply (Llama's).
      attn_logit_softcap: attention scores become c * tanh(scores / c) before the mask (Gemma 2's 50), or None.
      final_logit_softcap: the logits become c * tanh(logits / c) (Gemma 2's 30), or None.
      model_type: Hugging Face model_type written on export.
      param_dtype: storage dtype of the weights ("float32" or "bfloat16").
      dtype: compute dtype of activations and matmuls.
      remat: gradient checkpointing of each block: "none", "full" (recompute
        everything) or "dots" (save matmul outputs without batch dims).
      bos_token_id, eos_token_ids, pad_token_id: special ids from the checkpoint.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    qk_norm_per_head: bool = True
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    local_rope_theta: float | None = None
    rope_layers: tuple[bool, ...] = ()
    rotary_dim: int = 0
    hidden_act: str = "silu"
    norm_offset: float = 0.0
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None
    sandwich_norms: bool = False
    pre_norms: bool = True
    norm_scale_float32: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    model_type: str = "llama"
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) == "float16":  # no loss scaling here: its 5-bit exponent flushes small gradients
                raise ValueError(f"{name}='float16' is not supported (nothing scales the loss, so small gradients "
                                 "underflow: q/k gradients 50% off at 32 x 256 tokens); use 'bfloat16' or 'float32'")
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {sorted(_DTYPES)}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat={self.remat!r}; expected none, full or dots")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}; expected one of {ACTIVATIONS}")
        object.__setattr__(self, "sliding_layers", tuple(bool(f) for f in self.sliding_layers))
        if self.sliding_layers:
            if len(self.sliding_layers) != self.num_layers:
                raise ValueError(f"sliding_layers has {len(self.sliding_layers)} flags for {self.num_layers} layers")
            if not self.sliding_window:
                raise ValueError("sliding_layers needs a sliding_window")
        object.__setattr__(self, "rope_layers", tuple(bool(f) for f in self.rope_layers))
        if self.rope_layers and len(self.rope_layers) != self.num_layers:
            raise ValueError(f"rope_layers has {len(self.rope_layers)} flags for {self.num_layers} layers")
        for name in ("attn_logit_softcap", "final_logit_softcap"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected a positive number or None")
        if not self.pre_norms and not self.sandwich_norms:
            raise ValueError("pre_norms=False (OLMo 2) needs sandwich_norms: a block must norm its inputs or outputs")
        if self.local_rope_theta is not None and not self.sliding_window:
            raise ValueError("local_rope_theta is the RoPE base of windowed layers: it needs a sliding_window")
        if self.rotary_dim and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim={self.rotary_dim}; expected an even number of dims up to head_dim "
                             f"{self.head_dim} (0: all)")
        n, m = len(self.rope_scaling.short_factor), len(self.rope_scaling.long_factor)
        if (self.rope_scaling.kind == "longrope" and n != self.rope_dim // 2) or n != m:
            raise ValueError(f"longrope's short_factor and long_factor need {self.rope_dim // 2} values each (one per "
                             f"rotated pair), got {n} and {m}")

    @property
    def rope_dim(self) -> int:
        """The leading dims of each head RoPE rotates (`rotary_dim`, else all of head_dim)."""
        return self.rotary_dim or self.head_dim

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer `i`, or None (full attention)."""
        if not self.sliding_window or (self.sliding_layers and not self.sliding_layers[i]):
            return None
        return self.sliding_window

    def layer_rope(self, i: int) -> bool:
        """Whether layer `i` rotates q and k (False: a NoPE layer)."""
        return not self.rope_layers or self.rope_layers[i]

    @property
    def mixed_windows(self) -> bool:
        """Windowed and full-attention layers mixed (Gemma 2/3, Qwen2's upper layers): masks and RoPE bases differ."""
        return len(set(self.sliding_layers)) > 1

    @property
    def mixed_rope(self) -> bool:
        """Layers with RoPE and NoPE layers mixed (SmolLM3)."""
        return len(set(self.rope_layers)) > 1

    @property
    def mixed_layers(self) -> bool:
        """Layers differ in what they compute besides their weights: window and RoPE base (`mixed_windows`), or RoPE
        against none (SmolLM3's NoPE layers)."""
        return self.mixed_windows or self.mixed_rope

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        norms = (2 if self.pre_norms else 0) + (2 if self.sandwich_norms else 0)
        qk = (2 * hd if self.qk_norm_per_head else (self.num_heads + self.num_kv_heads) * hd) if self.qk_norm else 0
        per_layer = attn + 3 * d * f + norms * d + qk
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    def flops_per_token(self, context: int = 0, head: bool = True) -> float:
        """Forward FLOPs per token: 2 x (block matmul params [+ lm head]) + attention over `context` keys.

        `head=False` for positions whose logits are never computed (a prompt's tokens but its last)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        block = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + 3 * d * f
        attn = 4 * self.num_layers * self.num_heads * hd * context
        return 2.0 * (self.num_layers * block + (d * self.vocab_size if head else 0)) + attn

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def _rope_from_hf(hf, where: str) -> tuple[float, RopeScaling]:
    """(theta, scaling) of the global (full-attention) layers."""
    top = getattr(hf, "rope_parameters", None) or {}
    nested = "full_attention" in top  # one entry per layer type (Gemma 3): the global layers' here
    params = (top["full_attention"] or {}) if nested else top
    legacy = getattr(hf, "rope_scaling", None) or {}
    merged = {**legacy, **params}
    theta = float(merged.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "default":
        return theta, RopeScaling()
    if kind not in ROPE_KINDS:  # (the message names the file, as every other refusal; review, session 30)
        raise ValueError(f"{where}: rope_parameters.rope_type={kind!r} is not supported ({', '.join(ROPE_KINDS)})")
    # transformers' `standardize_rope_params`: in a flat dict a top-level value wins over rope_parameters' (Phi-3-style
    # configs: reftjax read rope_parameters' and computed other logits; review, session 30); in a per-layer-type one
    # (Gemma 3) the top-level value is ignored; else max_position_embeddings
    original = int((None if nested else getattr(hf, "original_max_position_embeddings", None))
                   or merged.get("original_max_position_embeddings") or hf.max_position_embeddings)
    factor = merged.get("factor")
    if kind == "longrope":  # as transformers' `_compute_longrope_parameters`
        factor = float(hf.max_position_embeddings / original if factor is None else factor)
        attention = merged.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        short, long = merged.get("short_factor"), merged.get("long_factor")
        if not all(isinstance(f, (list, tuple)) and f for f in (short, long)):
            raise ValueError(f"{where}: longrope needs short_factor and long_factor lists, got {short!r} and {long!r}")
        return theta, RopeScaling(kind=kind, factor=factor, original_max_position_embeddings=original,
                                  attention_factor=float(attention), short_factor=tuple(short), long_factor=tuple(long))
    if kind != "yarn":
        if kind == "linear":  # (the context length is unused: kept as digests recorded it; helper review, session 40)
            original = int(merged.get("original_max_position_embeddings", 8192))
        return theta, RopeScaling(kind=kind, factor=float(1.0 if factor is None else factor),
                                  low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
                                  high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
                                  original_max_position_embeddings=original)
    # YaRN as transformers' `_compute_yarn_parameters`: no factor -> the ratio of the two context lengths; no
    # attention_factor -> the paper's mscale 0.1 ln(factor) + 1 (or DeepSeek's ratio of two mscales)
    factor = float(hf.max_position_embeddings / original if factor is None else factor)
    attention = merged.get("attention_factor")
    if attention is None:
        mscale = lambda m=1.0: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731
        both = merged.get("mscale") and merged.get("mscale_all_dim")
        attention = mscale(merged["mscale"]) / mscale(merged["mscale_all_dim"]) if both else mscale()
    return theta, RopeScaling(kind=kind, factor=factor, original_max_position_embeddings=original,
                              attention_factor=float(attention), beta_fast=float(merged.get("beta_fast") or 32),
                              beta_slow=float(merged.get("beta_slow") or 1),
                              # (read where transformers reads it: the top level of rope_parameters, so a Gemma 3's
                              # per-layer-type value is ignored; helper review, session 40)
                              truncate=bool({**legacy, **top}.get("truncate", True)))


def _local_rope_theta(hf, where: str) -> float | None:
    """The RoPE base of the windowed layers where it has its own (Gemma 3's rope_parameters.sliding_attention, an
    unscaled 10,000), else None."""
    local = (getattr(hf, "rope_parameters", None) or {}).get("sliding_attention")
    if not local:
        return None
    kind = local.get("rope_type", local.get("type", "default")) or "default"
    if kind != "default":
        raise ValueError(f"{where}: rope_parameters.sliding_attention.rope_type={kind!r} is not supported (default)")
    return float(local.get("rope_theta", 10000.0))


def _sliding_window(hf, model_type: str, where: str) -> tuple[int | None, tuple[bool, ...]]:
    """(window, per-layer flags): (None, ()) without a window, (window, ()) when every layer has it, else the flags.
    transformers' Llama and Gemma have none (a stray `sliding_window` key is ignored there too); Mistral and Phi-3
    window every layer; Qwen2/3 only layers >= max_window_layers, and only with use_sliding_window; Gemma 2/3 and
    SmolLM3 their layer_types' sliding_attention layers (Gemma 2: one of two, Gemma 3: five of six; SmolLM3 windows
    its NoPE layers where use_sliding_window, and its mask follows layer_types whatever that flag says)."""
    window = getattr(hf, "sliding_window", None)
    if (model_type in ("gemma2", "gemma3_text", "smollm3") and not window
            and "sliding_attention" in (getattr(hf, "layer_types", None) or ())):
        # (transformers itself cannot run it: a TypeError in its mask; helper review, session 39; SmolLM3 too)
        raise ValueError(f"{where}: sliding_window={window!r} but layer_types has sliding_attention layers: a "
                         f"{model_type} needs the window of its local layers")
    if model_type in ("llama", "gemma", "olmo2") or not window:
        return None, ()
    n = hf.num_hidden_layers
    if model_type in ("mistral", "phi3"):
        return int(window), ()
    kinds = list(getattr(hf, "layer_types", None) or [
        "sliding_attention" if getattr(hf, "use_sliding_window", False) and i >= getattr(hf, "max_window_layers", n)
        else "full_attention" for i in range(n)])
    unknown = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if unknown or len(kinds) != n:
        raise ValueError(f"{where}: layer_types={kinds} is not supported (one of sliding_attention or "
                         f"full_attention per layer, {n} layers)")
    if all(k == "full_attention" for k in kinds):
        return None, ()
    if all(k == "sliding_attention" for k in kinds):
        return int(window), ()
    return int(window), tuple(k == "sliding_attention" for k in kinds)


def _rope_layers(hf, model_type: str, where: str) -> tuple[bool, ...]:
    """SmolLM3's per-layer RoPE flags (`no_rope_layers`: 1 rotates, 0 is a NoPE layer; transformers reads the first
    num_hidden_layers of them, or puts a NoPE layer every `no_rope_layer_interval`), () where every layer rotates;
    other models have none (transformers ignores the keys there too)."""
    if model_type != "smollm3":
        return ()
    n = hf.num_hidden_layers
    flags = getattr(hf, "no_rope_layers", None)
    if flags is None:
        interval = int(getattr(hf, "no_rope_layer_interval", 4))
        flags = [int((i + 1) % interval != 0) for i in range(n)]
    if (not isinstance(flags, (list, tuple)) or len(flags) < n
            or any(isinstance(f, bool) or f not in (0, 1) for f in flags)):
        raise ValueError(f"{where}: no_rope_layers={flags!r} is not supported (a 1 or 0 per layer, {n} layers)")
    flags = tuple(bool(f) for f in flags[:n])
    return () if all(flags) else flags


_GEMMA = ("gemma", "gemma2", "gemma3_text")


def _activation(hf, model_type: str, where: str) -> str:
    """The gate's activation as `ModelConfig.hidden_act` names it; refused when the MLP is neither SwiGLU nor
    (Gemma's) tanh-approximated GeGLU."""
    act = (getattr(hf, "hidden_activation", None) if model_type in ("gemma2", "gemma3_text") else None) or getattr(
        hf, "hidden_act", "silu")
    if model_type in _GEMMA:
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"{where}: hidden_activation={act!r} is not supported for {model_type} (the MLP is "
                             "GeGLU with gelu_pytorch_tanh)")
        return "gelu_tanh"
    if act not in ("silu", "swish"):
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (the MLP is SwiGLU with SiLU)")
    return "silu"


def _check_gemma(hf, model_type: str, where: str) -> None:
    """Refuse what the Gemma decoders here do not compute: bidirectional attention (EmbeddingGemma's), biases, and
    soft-capping keys in a Gemma 1 config (transformers' Gemma has no soft-capping: it ignores them; helper review)."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if model_type == "gemma" and getattr(hf, key, None) is not None:
            raise ValueError(f"{where}: {key}={getattr(hf, key)} in a gemma config: transformers' Gemma does not "
                             "soft-cap (Gemma 2's model_type is gemma2)")
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError(f"{where}: use_bidirectional_attention=True (an encoder) is not supported")
    if getattr(hf, "attention_bias", False):
        raise ValueError(f"{where}: attention_bias=True (q/k/v and o_proj biases) is not supported for {model_type}")


def _rotary_dim(hf, model_type: str, head_dim: int, where: str) -> int:
    """`ModelConfig.rotary_dim` (0: all of head_dim): Phi-3's `partial_rotary_factor` (Phi-4-mini's 0.75, which
    transformers moves into rope_parameters); the other models here rotate the whole head whatever it says
    (transformers' Llama-style default RoPE ignores it)."""
    if model_type != "phi3":
        return 0
    factor = (getattr(hf, "rope_parameters", None) or {}).get("partial_rotary_factor")
    factor = float(getattr(hf, "partial_rotary_factor", 1.0) if factor is None else factor)
    dim = int(head_dim * factor)
    if not (0 < factor <= 1 and dim % 2 == 0 and dim > 0):
        raise ValueError(f"{where}: partial_rotary_factor={factor} is not supported (it must rotate an even number "
                         f"of the {head_dim} head dims, at least 2)")
    return 0 if dim == head_dim else dim


def from_hf_config(hf, *, param_dtype: str = "float32", dtype: str = "float32", remat: str = "none",
                   where: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a transformers PretrainedConfig (Llama/Mistral/Qwen2/Qwen3/Gemma 1-3/OLMo 2/SmolLM3/
    Phi-3)."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = {"gemma3": " (the multimodal Gemma 3: pass its text_config, model_type gemma3_text, as load_model does)"}
        raise ValueError(f"{where}: unsupported architecture model_type={model_type!r} "
                         f"(architectures={getattr(hf, 'architectures', None)}); supported: {SUPPORTED_MODEL_TYPES}"
                         + hint.get(model_type, ""))
    # what this decoder cannot represent is refused, never loaded approximately
    act = _activation(hf, model_type, where)
    if model_type in _GEMMA:
        _check_gemma(hf, model_type, where)
    if getattr(hf, "quantization_config", None):
        raise ValueError(f"{where}: quantized checkpoints (quantization_config) are not supported: load a float one")
    if model_type in ("llama", "smollm3") and getattr(hf, "mlp_bias", False):
        # (Mistral's and Qwen2's MLPs have no bias in transformers, whatever the key says)
        raise ValueError(f"{where}: mlp_bias=True is not supported")
    if model_type in ("llama", "qwen3", "olmo2", "smollm3") and getattr(hf, "attention_bias", False):
        raise ValueError(f"{where}: attention_bias=True (q/k/v and o_proj biases) is not supported for {model_type}")
    theta, scaling = _rope_from_hf(hf, where)
    eos = hf.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    window, sliding_layers = _sliding_window(hf, model_type, where)
    local_theta = _local_rope_theta(hf, where) if window else None
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    sandwich = model_type in ("gemma2", "gemma3_text")
    qpas = getattr(hf, "query_pre_attn_scalar", None) if sandwich else None
    # transformers' Gemma 3 reads attn_logit_softcapping but never applies it (its attention passes no softcap;
    # Gemma 2's does): a config stating one ran capped here, 3.8e-2 of scale off (helper review, session 42)
    caps = {key: getattr(hf, key, None) if sandwich and (model_type == "gemma2" or key.startswith("final")) else None
            for key in ("attn_logit_softcapping", "final_logit_softcapping")}
    return ModelConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.max_position_embeddings),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type in ("qwen3", "gemma3_text", "olmo2"),
        qk_norm_per_head=model_type != "olmo2",
        sliding_window=window,
        sliding_layers=sliding_layers,
        local_rope_theta=local_theta,
        rope_layers=_rope_layers(hf, model_type, where),
        rotary_dim=_rotary_dim(hf, model_type, head_dim, where),
        hidden_act=act,
        norm_offset=1.0 if model_type in _GEMMA else 0.0,
        embed_scale=model_type in _GEMMA,
        query_pre_attn_scalar=float(qpas) if qpas is not None else None,
        sandwich_norms=sandwich or model_type == "olmo2",
        pre_norms=model_type != "olmo2",
        norm_scale_float32=model_type == "olmo2",
        attn_logit_softcap=float(caps["attn_logit_softcapping"]) if caps["attn_logit_softcapping"] else None,
        final_logit_softcap=float(caps["final_logit_softcapping"]) if caps["final_logit_softcapping"] else None,
        model_type=model_type,
        param_dtype=param_dtype,
        dtype=dtype,
        remat=remat,
        bos_token_id=hf.bos_token_id,
        eos_token_ids=eos_ids,
        pad_token_id=getattr(hf, "pad_token_id", None),
    )
