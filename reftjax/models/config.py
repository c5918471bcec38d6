"""ModelConfig: the static description of a Llama-family decoder.

One frozen (hashable) dataclass covers Llama 2/3 (incl. Llama-3 RoPE scaling),
Mistral (sliding window), Qwen2/2.5 (qkv bias), Qwen3 (per-head q/k RMSNorm) and
SmolLM2 (tied embeddings).
Being hashable it can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# each supported Hugging Face model_type and its transformers class, written as config.json's `architectures` on
# export (serving stacks such as vLLM pick the class from it; transformers' own table imports torch)
CAUSAL_LM_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_MODEL_TYPES = tuple(CAUSAL_LM_CLASSES)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "default", "linear" or "llama3"."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope scaling type {self.kind!r} (default, linear, llama3)")


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
      sliding_window: attend only to the last `sliding_window` keys (Mistral), or None.
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
    sliding_window: int | None = None
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
        per_layer = attn + 3 * d * f + 2 * d + (2 * hd if self.qk_norm else 0)
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
    params = getattr(hf, "rope_parameters", None) or {}
    legacy = getattr(hf, "rope_scaling", None) or {}
    merged = {**legacy, **params}
    theta = float(merged.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "default":
        return theta, RopeScaling()
    if kind not in ("linear", "llama3"):  # (the message names the file, as every other refusal; review, session 30)
        raise ValueError(f"{where}: rope_parameters.rope_type={kind!r} is not supported (default, linear, llama3)")
    original = merged.get("original_max_position_embeddings", 8192)
    if kind == "llama3" and getattr(hf, "original_max_position_embeddings", None) is not None:
        # a top-level value wins over rope_parameters' when transformers builds the model (Phi-3-style configs;
        # `standardize_rope_params`): reftjax read rope_parameters' and computed other logits (review, session 30)
        original = hf.original_max_position_embeddings
    return theta, RopeScaling(
        kind=kind,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original),
    )


def _sliding_window(hf, model_type: str, where: str) -> int | None:
    """The window every layer uses, or None. transformers' Llama has none (a stray `sliding_window` key is
    ignored there too); Mistral windows every layer; Qwen2/3 only layers >= max_window_layers, and only with
    use_sliding_window: a mix of windowed and full layers is refused."""
    window = getattr(hf, "sliding_window", None)
    if model_type == "llama" or not window:
        return None
    if model_type in ("qwen2", "qwen3"):
        n = hf.num_hidden_layers
        kinds = getattr(hf, "layer_types", None) or [
            "sliding_attention" if getattr(hf, "use_sliding_window", False) and i >= getattr(hf, "max_window_layers", n)
            else "full_attention" for i in range(n)]
        if all(k == "full_attention" for k in kinds):
            return None
        if any(k != "sliding_attention" for k in kinds):
            raise ValueError(f"{where}: a sliding window on some layers only (layer_types={list(kinds)}) "
                             "is not supported")
    return int(window)


def from_hf_config(hf, *, param_dtype: str = "float32", dtype: str = "float32", remat: str = "none",
                   where: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a transformers PretrainedConfig (Llama/Mistral/Qwen2/Qwen3)."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: unsupported architecture model_type={model_type!r} "
                         f"(architectures={getattr(hf, 'architectures', None)}); supported: {SUPPORTED_MODEL_TYPES}")
    # what this decoder cannot represent is refused, never loaded approximately
    act = getattr(hf, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (the MLP is SwiGLU with SiLU)")
    if getattr(hf, "quantization_config", None):
        raise ValueError(f"{where}: quantized checkpoints (quantization_config) are not supported: load a float one")
    if model_type == "llama" and getattr(hf, "mlp_bias", False):  # (Mistral's and Qwen2's MLPs have no bias in
        raise ValueError(f"{where}: mlp_bias=True is not supported")  # transformers, whatever the key says)
    if model_type in ("llama", "qwen3") and getattr(hf, "attention_bias", False):
        raise ValueError(f"{where}: attention_bias=True (q/k/v and o_proj biases) is not supported for {model_type}")
    theta, scaling = _rope_from_hf(hf, where)
    eos = hf.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    window = _sliding_window(hf, model_type, where)
    heads = hf.num_attention_heads
    return ModelConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        rms_norm_eps=float(hf.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.max_position_embeddings),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        sliding_window=window,
        model_type=model_type,
        param_dtype=param_dtype,
        dtype=dtype,
        remat=remat,
        bos_token_id=hf.bos_token_id,
        eos_token_ids=eos_ids,
        pad_token_id=getattr(hf, "pad_token_id", None),
    )
