"""reftjax.models: logits parity with transformers (torch) and prefill/decode consistency.

The reference for every architecture is transformers' own PyTorch model in
float32 with eager attention: tiny random Llama (plain and Llama-3 RoPE
scaling), Mistral (sliding window shorter than the sequence), Qwen2 (qkv
bias; and with the window on its upper layer only), Qwen3 (per-head q/k norms,
head size other than hidden / heads), Gemma (GeGLU, 1 + w norms, scaled
embeddings) and Gemma 3 (also sandwich norms, windowed local layers with their
own RoPE base among scaled global ones, query_pre_attn_scalar), built from
transformers config classes and saved with `save_pretrained`, and
the real SmolLM2-135M-Instruct read from its GGUF by transformers' own GGUF
loader. Batches are left-padded with rows of different lengths.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reftjax.hf import load_model
from reftjax.models import decode_step, forward, packed_prefill, prefill, unstack_layers
from reftjax.models import llama
from reftjax.models import ModelConfig, RopeScaling

torch = pytest.importorskip("torch")

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
LENGTHS = (13, 7, 10)  # real tokens per row; the batch is left-padded to the longest


def _hf_config(kind: str):
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig, Olmo2Config,
                              Phi3Config, Qwen2Config, Qwen3Config, SmolLM3Config)

    if kind == "llama":
        return LlamaConfig(**TINY)
    if kind == "llama3_rope":  # original context 8 < 13 tokens: low, medium and high frequencies all occur
        return LlamaConfig(**TINY, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    if kind == "mistral":
        return MistralConfig(**TINY, sliding_window=4)
    if kind == "mistral_yarn":  # RoPE scaling on windowed layers without a base of their own (Phi-3.5-mini: a window
        # and LongRoPE on every layer): they keep the model's scaling (a mutant dropping it there passed; session 49)
        return MistralConfig(**TINY, sliding_window=4, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8})
    if kind == "qwen2":
        return Qwen2Config(**TINY, tie_word_embeddings=True)
    if kind == "qwen2_mixed":  # Qwen2's window on the layers >= max_window_layers: here the second of two
        return Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    if kind == "gemma":
        return GemmaConfig(**TINY, head_dim=16)
    if kind == "gemma2":  # windowed and global layers alternating; caps low enough to bite on a random model
        return Gemma2Config(**{**TINY, "num_hidden_layers": 4}, head_dim=16, query_pre_attn_scalar=24,
                            sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
                            attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    if kind == "gemma3":  # local (windowed, base 1e4) and global (base 1e6, linear x2) layers alternating
        return Gemma3TextConfig(**{**TINY, "num_hidden_layers": 4}, head_dim=16, query_pre_attn_scalar=24,
                                sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
                                rope_parameters={
                                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    if kind == "gemma3_yarn":  # YaRN on the global layers; transformers ignores the top-level original context length
        # and reads `truncate` from the top level of rope_parameters (so not this one) for per-layer-type RoPE
        return Gemma3TextConfig(**{**TINY, "num_hidden_layers": 4}, head_dim=16, query_pre_attn_scalar=24,
                                sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
                                original_max_position_embeddings=64, rope_parameters={
                                    "full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6,
                                                       "original_max_position_embeddings": 1024, "truncate": False},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    if kind == "qwen3":  # Qwen3-0.6B's shape in small: 4 heads of 16 over a width of 32 (q is 64 wide)
        return Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=False)
    if kind == "qwen3_yarn":  # Qwen3's long-context YaRN: the ramp spans frequencies 2-6 of 8; cos/sin x1.139
        return Qwen3Config(**TINY, head_dim=16, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 2048})
    if kind == "llama_yarn_mscale":  # DeepSeek-style: no factor (context ratio 64 / 16), two mscales, no truncation
        return LlamaConfig(**TINY, rope_parameters={
            "rope_type": "yarn", "rope_theta": 500.0, "factor": None, "original_max_position_embeddings": 16,
            "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 8.0, "beta_slow": 2.0, "truncate": False})
    if kind == "olmo2":  # sublayer outputs normed, inputs not; q/k norms over all heads at once
        return Olmo2Config(**TINY, eos_token_id=2, pad_token_id=0)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "smollm3":  # a NoPE layer (no position encoding at all) every second layer (SmolLM3-3B: every 4th)
        return SmolLM3Config(**TINY, **ids, no_rope_layer_interval=2)
    if kind == "smollm3_window":  # RoPE and NoPE layers, windowed and full ones, in every combination
        return SmolLM3Config(**{**TINY, "num_hidden_layers": 4}, **ids, no_rope_layers=[1, 1, 0, 0],
                             use_sliding_window=True, sliding_window=4,
                             layer_types=["sliding_attention", "full_attention"] * 2)
    phi = dict(TINY, hidden_size=64, **ids)  # heads of 16
    if kind == "phi3":  # fused q/k/v and gate/up projections, a window on every layer
        return Phi3Config(**phi, sliding_window=4)
    if kind in ("phi4_longrope_short", "phi4_longrope_long"):  # Phi-4-mini's partial rotary (12 of 16 dims) and
        # LongRoPE: 13 tokens within an original context of 16 (short factors) or past one of 8 (long factors)
        return Phi3Config(**phi, partial_rotary_factor=0.75, tie_word_embeddings=True,
                          original_max_position_embeddings=16 if kind.endswith("short") else 8,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                           "short_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0],
                                           "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]})
    raise ValueError(kind)


def _torch_tiny(kind: str, directory):
    """A random torch model of `kind` with non-trivial norms and biases, saved to `directory`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(kind), attn_implementation="eager").eval()
    with torch.no_grad():  # default init has unit norms and zero biases, which would hide mapping bugs
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(directory)
    return model


def left_padded(rows: list[list[int]], pad_id: int):
    """(tokens_BxT, mask_BxT) as int32 NumPy arrays, rows right-aligned."""
    t = max(len(r) for r in rows)
    tokens = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        tokens[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return tokens, mask


def torch_logits(model, tokens, mask) -> np.ndarray:
    """Reference logits with explicit positions (transformers does not derive them from the mask)."""
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    position_ids=torch.as_tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def assert_logits_match(ours, ref, mask, rel_tol: float) -> float:
    """Compare on real (non-padding) positions; returns max |diff| / max |ref|."""
    real = mask.astype(bool)
    ours, ref = np.asarray(ours, np.float64)[real], np.asarray(ref, np.float64)[real]
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    assert rel < rel_tol, f"max |diff| / scale = {rel:.2e}"
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    return rel


# what each kind's config must turn into, and settings that must each change its logits (the features under test)
_EXPECTED = {
    "llama": dict(model_type="llama"),
    "llama3_rope": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=4),
    "mistral_yarn": dict(model_type="mistral", sliding_window=4),
    "qwen2": dict(model_type="qwen2", qkv_bias=True),
    "qwen2_mixed": dict(model_type="qwen2", qkv_bias=True, sliding_window=4, sliding_layers=(False, True)),
    "qwen3": dict(model_type="qwen3", qk_norm=True, head_dim=16),
    "qwen3_yarn": dict(model_type="qwen3", qk_norm=True, head_dim=16),
    "gemma3_yarn": dict(model_type="gemma3_text", head_dim=16, hidden_act="gelu_tanh", norm_offset=1.0,
                        embed_scale=True, qk_norm=True, sandwich_norms=True, sliding_window=4,
                        sliding_layers=(True, False, True, False), rope_theta=1e6, local_rope_theta=1e4,
                        query_pre_attn_scalar=24.0),
    "llama_yarn_mscale": dict(model_type="llama", rope_theta=500.0),
    "gemma": dict(model_type="gemma", head_dim=16, hidden_act="gelu_tanh", norm_offset=1.0, embed_scale=True),
    "gemma2": dict(model_type="gemma2", head_dim=16, hidden_act="gelu_tanh", norm_offset=1.0, embed_scale=True,
                   sandwich_norms=True, sliding_window=4, sliding_layers=(True, False, True, False),
                   query_pre_attn_scalar=24.0, attn_logit_softcap=2.0, final_logit_softcap=3.0),
    "olmo2": dict(model_type="olmo2", qk_norm=True, qk_norm_per_head=False, sandwich_norms=True, pre_norms=False,
                  norm_scale_float32=True),
    "smollm3": dict(model_type="smollm3", rope_theta=2e6, rope_layers=(True, False)),
    "smollm3_window": dict(model_type="smollm3", rope_theta=2e6, rope_layers=(True, True, False, False),
                           sliding_window=4, sliding_layers=(True, False, True, False)),
    "phi3": dict(model_type="phi3", sliding_window=4),
    "phi4_longrope_short": dict(model_type="phi3", rotary_dim=12),
    "phi4_longrope_long": dict(model_type="phi3", rotary_dim=12),
    "gemma3": dict(model_type="gemma3_text", head_dim=16, hidden_act="gelu_tanh", norm_offset=1.0, embed_scale=True,
                   qk_norm=True, sandwich_norms=True, sliding_window=4, sliding_layers=(True, False, True, False),
                   rope_theta=1e6, local_rope_theta=1e4, rope_scaling=RopeScaling("linear", 2.0),
                   query_pre_attn_scalar=24.0),
}
_LONG_AS_SHORT = RopeScaling("longrope", 4.0, original_max_position_embeddings=8, attention_factor=2 ** 0.5,
                             short_factor=(1.0, 1.5, 2.0, 3.0, 5.0, 8.0), long_factor=(1.0, 1.5, 2.0, 3.0, 5.0, 8.0))
_FEATURES = {
    "llama3_rope": [dict(rope_scaling=RopeScaling())],
    "qwen3_yarn": [dict(rope_scaling=RopeScaling()), dict(rope_scaling=RopeScaling("yarn", 4.0, 1.0, 4.0, 2048))],
    "llama_yarn_mscale": [dict(rope_scaling=RopeScaling())],
    "gemma3_yarn": [dict(rope_scaling=RopeScaling())],
    "mistral": [dict(sliding_window=None)],
    "mistral_yarn": [dict(rope_scaling=RopeScaling())],
    "qwen2_mixed": [dict(sliding_layers=()), dict(sliding_window=None, sliding_layers=())],
    "gemma": [dict(norm_offset=0.0), dict(embed_scale=False), dict(hidden_act="silu")],
    "gemma2": [dict(attn_logit_softcap=None), dict(final_logit_softcap=None), dict(sliding_layers=())],
    "smollm3": [dict(rope_layers=())],
    "phi3": [dict(sliding_window=None)],
    "phi4_longrope_short": [dict(rotary_dim=0, rope_scaling=RopeScaling()), dict(rope_scaling=RopeScaling())],
    "phi4_longrope_long": [dict(rope_scaling=RopeScaling()), dict(rope_scaling=_LONG_AS_SHORT)],
    "smollm3_window": [dict(rope_layers=()), dict(sliding_layers=())],
    "gemma3": [dict(sliding_layers=()), dict(local_rope_theta=None), dict(rope_scaling=RopeScaling()),
               dict(query_pre_attn_scalar=None)],
}


@pytest.mark.parametrize("kind", list(_EXPECTED))
def test_tiny_logits_match_transformers(kind, tmp_path):
    ref_model = _torch_tiny(kind, tmp_path)
    loaded = load_model(tmp_path, with_tokenizer=False)
    cfg = loaded.config
    defaults = ModelConfig(**{k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                             "num_layers", "num_heads", "num_kv_heads")})
    for field in ("model_type", "qkv_bias", "qk_norm", "head_dim", "sliding_window", "sliding_layers", "hidden_act",
                  "norm_offset", "embed_scale", "sandwich_norms", "local_rope_theta", "query_pre_attn_scalar",
                  "attn_logit_softcap", "final_logit_softcap", "qk_norm_per_head", "pre_norms",
                  "norm_scale_float32", "rope_layers", "rotary_dim"):
        assert getattr(cfg, field) == _EXPECTED[kind].get(field, getattr(defaults, field)), field
    assert cfg.rope_scaling.kind == {"llama3_rope": "llama3", "gemma3": "linear"}.get(
        kind, "yarn" if "yarn" in kind else "longrope" if "longrope" in kind else "default")
    assert cfg.num_params == sum(p.numel() for p in ref_model.parameters())
    rng = np.random.default_rng(1)
    tokens, mask = left_padded([list(rng.integers(0, TINY["vocab_size"], n)) for n in LENGTHS], pad_id=0)
    ours, _ = jax.jit(forward, static_argnums=1)(loaded.params, cfg, tokens, mask)
    rel = assert_logits_match(ours, torch_logits(ref_model, tokens, mask), mask, rel_tol=1e-5)
    print(f"{kind}: max|diff|/scale={rel:.1e}")
    for change in _FEATURES.get(kind, ()):  # the feature under test must change the result
        other, _ = jax.jit(forward, static_argnums=1)(loaded.params, cfg.replace(**change), tokens, mask)
        changed = np.abs(np.asarray(other) - np.asarray(ours))[mask.astype(bool)].max()
        assert changed > 1e-2 * np.abs(np.asarray(ours)).max(), change


def test_a_top_level_original_max_position_embeddings_wins_as_in_transformers(tmp_path):
    """transformers builds a llama3-RoPE model with a top-level `original_max_position_embeddings` (Phi-3-style
    configs) over rope_parameters' own; reftjax read rope_parameters' and its logits were 0.92 off (review, session
    30). RoPE types it cannot compute are refused naming the file (the message named none)."""
    import json

    from transformers import AutoModelForCausalLM

    _torch_tiny("llama3_rope", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"]["original_max_position_embeddings"] = 32
    cfg["original_max_position_embeddings"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    loaded = load_model(tmp_path, with_tokenizer=False)
    assert loaded.config.rope_scaling.original_max_position_embeddings == 8
    rng = np.random.default_rng(1)
    tokens, mask = left_padded([list(rng.integers(0, TINY["vocab_size"], n)) for n in LENGTHS], pad_id=0)
    ours, _ = jax.jit(forward, static_argnums=1)(loaded.params, loaded.config, tokens, mask)
    assert_logits_match(ours, torch_logits(ref_model, tokens, mask), mask, rel_tol=1e-5)
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: rope_parameters\.rope_type='dynamic' is not supported"):
        load_model(tmp_path, with_tokenizer=False)


def test_rope_tables_read_from_real_sized_configs_are_transformers_own():
    """The inverse frequencies and cos/sin factor a config reads into are what transformers' own RoPE functions
    compute from it, at real models' 128-dim heads: Qwen3's YaRN (4 x 32k, default betas 32 and 1: 16 or 2 gave the
    same table at the parity test's 16-dim heads), Llama 3.1's llama3, and LongRoPE with an explicit `factor`, which
    sets the attention factor (the context ratio was used). Mutation review of models/config.py."""
    from transformers import LlamaConfig, Phi3Config, Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from reftjax.models import from_hf_config

    shape = dict(vocab_size=97, hidden_size=1024, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=8, max_position_embeddings=131072)
    factors = {"short_factor": list(np.linspace(1.0, 2.0, 64)), "long_factor": list(np.linspace(1.0, 40.0, 64))}
    configs = [Qwen3Config(**shape, head_dim=128, rope_parameters={
                   "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}),
               LlamaConfig(**shape, rope_parameters={
                   "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
               Phi3Config(**shape, original_max_position_embeddings=4096, rope_parameters={
                   "rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0, **factors})]
    for hf in configs:
        cfg = from_hf_config(hf)
        kind = hf.rope_parameters["rope_type"]
        for long in (False, True) if kind == "longrope" else (False,):
            inv, factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu", seq_len=4097 if long else None)
            np.testing.assert_allclose(llama.rope_inv_freq(cfg, long=long), inv.numpy(), rtol=1e-5, err_msg=kind)
            assert cfg.rope_scaling.attention_factor == pytest.approx(factor), kind


@pytest.mark.heavy
@pytest.mark.gguf
def test_smollm_logits_match_transformers_gguf(smollm_model, smollm_torch):
    texts = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
             "The capital of France is",
             "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"]
    tok = smollm_model.tokenizer
    tokens, mask = left_padded([tok(t)["input_ids"] for t in texts], pad_id=tok.pad_token_id)
    assert len({int(m.sum()) for m in mask}) == 3
    ours, _ = jax.jit(forward, static_argnums=1)(smollm_model.params, smollm_model.config, tokens, mask)
    ref = torch_logits(smollm_torch, tokens, mask)
    rel = assert_logits_match(ours, ref, mask, rel_tol=1e-3)
    print(f"SmolLM2 GGUF: max|diff|/scale={rel:.1e} (scale {np.abs(ref[mask.astype(bool)]).max():.1f})")


# ----------------------------------------------------------------------------- prefill / decode


def _decode_test_config(variant: str, window: int | None) -> ModelConfig:
    qwen2, qwen3 = variant.startswith("qwen2"), variant.startswith("qwen3")
    if variant.startswith("gemma3"):  # a windowed local layer (own RoPE base) then a global one, all Gemma 3 parts
        return ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, sliding_window=3, sliding_layers=(True, False),
                           local_rope_theta=1e4, rope_theta=1e6, qk_norm=True, hidden_act="gelu_tanh",
                           norm_offset=1.0, embed_scale=True, query_pre_attn_scalar=24.0, sandwich_norms=True,
                           model_type="gemma3_text", tie_word_embeddings=True)
    if variant.startswith("olmo2"):  # OLMo 2: no input norms, output norms, q/k norms over all heads at once
        return ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, qk_norm=True, qk_norm_per_head=False, sandwich_norms=True, pre_norms=False,
                           norm_scale_float32=True, model_type="olmo2")
    if variant.startswith("smollm3"):  # SmolLM3's NoPE layers among RoPE ones, windowed and full ones mixed
        return ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                           num_kv_heads=2, rope_layers=(True, False, False), sliding_window=3,
                           sliding_layers=(True, True, False), model_type="smollm3", tie_word_embeddings=True)
    if variant.startswith("gemma2"):  # Gemma 2: no q/k norms or local base, soft-capped scores and logits
        return ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, sliding_window=3, sliding_layers=(True, False),
                           hidden_act="gelu_tanh", norm_offset=1.0, embed_scale=True, query_pre_attn_scalar=24.0,
                           sandwich_norms=True, attn_logit_softcap=2.0, final_logit_softcap=3.0,
                           model_type="gemma2", tie_word_embeddings=True)
    if variant.startswith("phi3"):  # Phi-4-mini's partial rotary (12 of 16 dims) with LongRoPE: its short factors
        # within an original context of 2048, or (pinned, as the training loop pins them) its long ones from position 0
        # of a generation that passes an original context of 8 midway
        pinned = variant.endswith("pinned")
        longrope = RopeScaling("longrope", 4.0, original_max_position_embeddings=8 if pinned else 2048,
                               attention_factor=1.2, short_factor=(1.0, 1.5, 2.0, 3.0, 5.0, 8.0),
                               long_factor=(1.0, 3.0, 9.0, 27.0, 81.0, 243.0), factors="long" if pinned else "auto")
        return ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, rotary_dim=12, rope_scaling=longrope, model_type="phi3",
                           tie_word_embeddings=True)
    yarn = RopeScaling("yarn", 4.0, original_max_position_embeddings=2048, attention_factor=1.3)  # ramp over 2-6
    return ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16 if qwen3 else 0, sliding_window=window,
                       model_type=variant.split("_")[0], qkv_bias=qwen2, qk_norm=qwen3, tie_word_embeddings=not qwen2,
                       rope_scaling=yarn if variant.endswith("yarn") else RopeScaling(),
                       # an epsilon of its own: every other variant has the default, which a decode path reading a
                       # constant instead of the config's matched (mutation review, session 45)
                       rms_norm_eps=0.01 if variant.endswith("eps") else ModelConfig.rms_norm_eps)


@functools.partial(jax.jit, static_argnums=(1, 4))
def _prefill_then_decode(params, cfg: ModelConfig, prompt_BxP, mask_BxP, cache_len: int, forced_BxN):
    """Prefill, then teacher-force `forced_BxN` one token per step (a scan, as a sampler would)."""
    last_logits, _, caches = prefill(params, cfg, prompt_BxP, mask_BxP, cache_len)
    b, p = prompt_BxP.shape
    valid = jnp.pad(mask_BxP, ((0, 0), (0, cache_len - p)))
    layers = unstack_layers(params, cfg)

    def step(carry, i):
        caches, valid, pos = carry
        slot = p + i
        valid = valid.at[:, slot].set(1)
        logits, _, caches = decode_step(params, layers, cfg, forced_BxN[:, i], pos, caches, slot, valid)
        return (caches, valid, pos + 1), logits

    start = jnp.sum(mask_BxP, axis=-1).astype(jnp.int32)  # next position = number of real prompt tokens
    _, logits_NxBxV = jax.lax.scan(step, (caches, valid, start), jnp.arange(forced_BxN.shape[1]))
    return last_logits, jnp.swapaxes(logits_NxBxV, 0, 1)


@pytest.mark.parametrize("variant", ["llama", "mistral_window3", "qwen2_bias_untied", "qwen3_qknorm_hd16",
                                     "gemma2_softcaps", "gemma3_mixed_layers", "olmo2_post_norms",
                                     "smollm3_nope_layers", "qwen3_yarn", "phi3_partial_longrope",
                                     "phi3_longrope_pinned", "llama_eps"])
def test_prefill_and_decode_match_full_forward(variant, random_params):
    """The decode path (fused per-layer weights, [B,K,hd,S] key cache) equals the scanned full forward."""
    window = 3 if variant == "mistral_window3" else None
    cfg = _decode_test_config(variant, window)
    params = random_params(cfg, seed=3, std=0.3)  # large weights: sharp, sensitive logits
    rng = np.random.default_rng(0)
    prompt, pmask = left_padded([list(rng.integers(1, 61, n)) for n in (6, 3, 5)], pad_id=0)
    forced = rng.integers(1, 61, (3, 4)).astype(np.int32)
    last, decoded = _prefill_then_decode(params, cfg, prompt, pmask, 12, forced)

    full_tokens = np.concatenate([prompt, forced], axis=1)
    full_mask = np.concatenate([pmask, np.ones_like(forced)], axis=1)
    full, _ = jax.jit(forward, static_argnums=1)(params, cfg, full_tokens, full_mask)
    p = prompt.shape[1]
    scale = float(jnp.abs(full).max())
    assert scale > 1.0
    np.testing.assert_allclose(last, full[:, p - 1], atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(decoded, full[:, p:], atol=1e-5 * scale, rtol=0)


def test_longrope_switches_per_call_keeping_the_cached_keys(tmp_path):
    """LongRoPE takes its long factors in a forward whose longest position passes the original context (8 here).
    A decode step past it switches while the keys cached before keep their short-factor rotation: the logits equal
    transformers' model stepped with its cache (and vLLM's scheme), not a forward over the whole sequence, which
    transformers' Phi-3 `generate` recomputes once at the crossing (its cache dropped there)."""
    import warnings

    ref_model = _torch_tiny("phi4_longrope_long", tmp_path)
    loaded = load_model(tmp_path, with_tokenizer=False)
    rng = np.random.default_rng(2)
    seq = rng.integers(1, TINY["vocab_size"], (1, 11)).astype(np.int32)  # a 6-token prompt, 5 steps: positions 6-10
    last, decoded = _prefill_then_decode(loaded.params, loaded.config, seq[:, :6], np.ones((1, 6), np.int32), 12,
                                         seq[:, 6:])
    ours = np.concatenate([np.asarray(last)[:, None], np.asarray(decoded)[:, :-1]], axis=1)[0]  # predictions of 6..10
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ref_model(input_ids=torch.as_tensor(seq[:, :6], dtype=torch.long), use_cache=True)
        stepped, cache = [out.logits[0, -1]], out.past_key_values
        for i in range(6, 10):
            out = ref_model(input_ids=torch.as_tensor(seq[:, i:i + 1], dtype=torch.long), past_key_values=cache,
                            position_ids=torch.tensor([[i]]), use_cache=True)
            stepped.append(out.logits[0, -1])
            cache = out.past_key_values
        short = ref_model(input_ids=torch.as_tensor(seq[:, :8], dtype=torch.long)).logits[0, 5:8].numpy()
        long = ref_model(input_ids=torch.as_tensor(seq[:, :10], dtype=torch.long)).logits[0, 8:10].numpy()
    stepped = torch.stack(stepped).numpy()
    scale = np.abs(stepped).max()
    np.testing.assert_allclose(ours, stepped, atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(ours[:3], short, atol=1e-5 * scale, rtol=0)  # positions up to 7: the short factors
    assert np.abs(ours[3:] - long).max() > 1e-2 * scale  # past it: not the whole sequence's long-factor forward


def test_pinned_longrope_factors_make_a_rows_logits_independent_of_its_batch(random_params):
    """With `factors="auto"` (transformers' rule) a short row's logits change when a row past the original context
    shares its batch (helper review, session 41: by up to 6.1 at a logit scale of 4.4); pinned, they do not, and a
    generation passing the original context midway equals the forward over the whole sequence (the pinned variant
    of `test_prefill_and_decode_match_full_forward`, which fails with "auto")."""
    cfg = _decode_test_config("phi3_longrope_pinned", None)
    params = random_params(cfg, seed=3, std=0.3)
    rng = np.random.default_rng(0)
    short, long = list(rng.integers(1, 61, 5)), list(rng.integers(1, 61, 12))  # positions up to 4, up to 11 (> 8)
    fwd = jax.jit(forward, static_argnums=1)
    for factors, coupled in (("auto", True), ("long", False), ("short", False)):
        c = cfg.replace(rope_scaling=dataclasses.replace(cfg.rope_scaling, factors=factors))
        alone, _ = fwd(params, c, *left_padded([short], 0))
        both, _ = fwd(params, c, *left_padded([short, long], 0))
        diff = float(np.abs(np.asarray(alone)[0] - np.asarray(both)[0, -5:]).max())
        assert (diff > 1e-2 * float(np.abs(alone).max())) if coupled else diff < 1e-5, (factors, diff)


@pytest.mark.parametrize("variant", ["llama", "mistral_window3", "qwen2_bias_untied", "qwen3_qknorm_hd16",
                                     "gemma2_softcaps", "gemma3_mixed_layers", "olmo2_post_norms",
                                     "smollm3_nope_layers", "qwen3_yarn", "phi3_partial_longrope",
                                     "phi3_longrope_pinned", "llama_eps"])
def test_packed_prefill_equals_prefill(variant, random_params):
    """The padding-free prefill (GEMMs over the real tokens only, `chunk` at a time) gives the padded prefill's
    last logits and hidden states, and the same keys/values in every real slot (15 real tokens in chunks of 7: the
    third holds a single one, which a real-token count one short skipped; mutation review, session 45)."""
    window = 3 if variant == "mistral_window3" else None
    cfg = _decode_test_config(variant, window)
    params = random_params(cfg, seed=4, std=0.3)
    rng = np.random.default_rng(1)
    prompt, pmask = left_padded([list(rng.integers(1, 61, n)) for n in (6, 3, 5, 1)], pad_id=0)
    prompt, pmask = np.pad(prompt, ((0, 0), (2, 0))), np.pad(pmask, ((0, 0), (2, 0)))  # an all-padding column
    ref_logits, ref_hidden, ref_caches = jax.jit(prefill, static_argnums=(1, 4))(params, cfg, prompt, pmask, 11)
    packed = jax.jit(lambda p, t, m: packed_prefill(p, unstack_layers(p, cfg), cfg, t, m, 11, chunk=7))
    logits, hidden, caches = packed(params, prompt, pmask)
    scale = float(jnp.abs(ref_logits).max())
    assert scale > 1.0
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(hidden, ref_hidden[:, -1], atol=1e-5, rtol=1e-5)
    real = np.pad(pmask, ((0, 0), (0, 11 - pmask.shape[1]))).astype(bool)  # [B, S]
    for ours, ref in zip(caches, ref_caches):
        assert ours.k.shape == ref.k.shape and ours.v.shape == ref.v.shape
        np.testing.assert_allclose(np.asarray(ours.k) * real[:, None, None, :],
                                   np.asarray(ref.k) * real[:, None, None, :],
                                   atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(ours.v) * real[:, None, :, None],
                                   np.asarray(ref.v) * real[:, None, :, None],
                                   atol=1e-5, rtol=1e-5)


def test_chunked_rows_do_work_for_the_real_rows_only():
    """`_rows` runs ceil(n / chunk) chunks (a traced n: one program for every n); later rows stay 0."""
    run = jax.jit(lambda x, n: llama._rows(lambda a, b: a + b, n, (x, x), 3, 4, jnp.float32))
    x = jnp.ones((12, 3), jnp.float32)
    for n, done in ((0, 0), (1, 4), (4, 4), (5, 8), (12, 12)):
        out = np.asarray(run(x, n))
        np.testing.assert_array_equal(out[:done], 2.0)
        np.testing.assert_array_equal(out[done:], 0.0)
    assert run._cache_size() == 1


def _assert_cotangents_close(ours, ref, tol):
    """Same dtypes, and equal within `tol` times the reference's largest magnitude (per cotangent)."""
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * scale, rtol=0)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gated_mlp_custom_vjp_matches_autodiff(dtype, act):
    """The hand-written SwiGLU / GeGLU backward equals autodiff of the plain formula (all four cotangents)."""
    from reftjax.models.llama import activation, gated_mlp

    mlp = functools.partial(gated_mlp, act=act)
    rng = np.random.default_rng(0)
    dt = jnp.dtype(dtype)
    x, wg, wu, wd = (jnp.asarray(rng.normal(0, s, shape), dt) for s, shape in
                     [(1.0, (12, 8)), (0.5, (8, 20)), (0.5, (8, 20)), (0.5, (20, 8))])
    r = jnp.asarray(rng.normal(size=(12, 8)), dt)

    def plain(x, wg, wu, wd):
        return (activation(act)(x @ wg) * (x @ wu)) @ wd

    ours = jax.grad(lambda *a: jnp.sum(mlp(*a).astype(jnp.float32) * r), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
    ref = jax.grad(lambda *a: jnp.sum(plain(*a).astype(jnp.float32) * r), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
    tol = 1e-5 if dtype == "float32" else 3e-2
    _assert_cotangents_close(ours, ref, tol)
    np.testing.assert_array_equal(np.asarray(mlp(x, wg, wu, wd), np.float32),
                                  np.asarray(plain(x, wg, wu, wd), np.float32))


def _attention_inputs(dt, b=3, kv=2, g=3, t=9, d=8):
    """Head-major q/k/v and a causal mask with left padding: row 1 has 4 pad slots, whose queries see no key."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(b, kv, g, t, d)), dt)
    k, v = (jnp.asarray(rng.normal(size=(b, kv, t, d)), dt) for _ in range(2))
    valid = np.ones((b, t), bool)
    valid[1, :4] = False
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & valid[:, None, :])
    return q, k, v, mask, jnp.asarray(rng.normal(size=(b, kv, g, t, d)), dt)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cap", [None, 1.5])
def test_attention_core_custom_vjp_matches_autodiff(dtype, cap):
    """The flash-style attention backward equals autodiff of plain masked softmax attention (q, k and v
    cotangents), fully masked padding queries included, with and without Gemma 2's soft-capped scores; the forward
    is the plain formula's."""
    from reftjax.models.llama import attention_core

    q, k, v, mask, r = _attention_inputs(jnp.dtype(dtype))

    def plain(q, k, v):
        s = jnp.einsum("bkgtd,bksd->bkgts", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
        s = s if cap is None else cap * jnp.tanh(s / cap)
        s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)

    def loss(f):
        return lambda *a: jnp.sum(f(*a).astype(jnp.float32) * r.astype(jnp.float32))

    ours = jax.grad(loss(lambda q, k, v: attention_core(q, k, v, mask, cap)), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    tol = 2e-6 if dtype == "float32" else 3e-2
    _assert_cotangents_close(ours, ref, tol)
    np.testing.assert_allclose(np.asarray(attention_core(q, k, v, mask, cap), np.float32),
                               np.asarray(plain(q, k, v), np.float32), atol=tol, rtol=0)


@pytest.mark.parametrize("cap", [None, 1.5])
def test_attention_core_gradient_is_numerically_right(cap):
    """Finite differences in float64 (independent of any autodiff) agree with the hand-written backward, soft-capped
    scores included."""
    from jax.test_util import check_grads

    from reftjax.models.llama import attention_core

    with jax.enable_x64(True):
        q, k, v, mask, _ = _attention_inputs(jnp.float64, b=2, t=5, d=4)
        check_grads(lambda q, k, v: attention_core(q, k, v, mask, cap), (q, k, v), order=1, modes=["rev"],
                    atol=1e-6, rtol=1e-6)


def test_bf16_attention_sums_its_scores_in_float32():
    """With bf16 operands the score dots (training forward, its backward's dp, the decode step's) return float32
    sums: scores near 80 were rounded to bf16 first (spacing 0.5), which moves a sharp softmax by up to ~28%.
    Reference: NumPy float64 on the same bf16-rounded inputs; the outputs keep only bf16's own rounding."""
    from reftjax.models.llama import attention_core, decode_attention

    q, k, v, mask, r = _attention_inputs(jnp.bfloat16, d=16)
    q = (q.astype(jnp.float32) * 20).astype(jnp.bfloat16)  # scores of |s| up to ~80
    r = (r.astype(jnp.float32) * 30).astype(jnp.bfloat16)  # output cotangents
    f64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)  # noqa: E731
    s = np.einsum("bkgtd,bksd->bkgts", f64(q), f64(k)) / 4.0
    s = np.where(np.asarray(mask)[:, None, None], s, -np.inf)
    s = np.where(np.isinf(s).all(-1, keepdims=True), 0.0, s)  # rows with no visible key: uniform (as ours)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert np.abs(np.einsum("bkgts,bkgts->bkgt", p, p)).max() > 0.9  # some rows are that sharp
    want = np.einsum("bkgts,bksd->bkgtd", p, f64(v))
    got = np.asarray(attention_core(q, k, v, mask).astype(jnp.float32))
    np.testing.assert_allclose(got, want, atol=0.03, rtol=0)  # 0.07 off with bf16 scores
    # the backward's dp = d_out . v: against autodiff of the float64 formula (through the same rounded inputs)
    def ref_loss(q_, k_, v_):
        sc = jnp.einsum("bkgtd,bksd->bkgts", q_, k_) / 4.0
        sc = jnp.where(mask[:, None, None], sc, jnp.finfo(jnp.float64).min)
        return jnp.sum(jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(sc, -1), v_) * r.astype(jnp.float64))
    with jax.enable_x64(True):
        want_g = jax.grad(ref_loss, argnums=(0, 1, 2))(*(jnp.asarray(f64(x)) for x in (q, k, v)))
    got_g = jax.grad(lambda *a: jnp.sum(attention_core(*a, mask).astype(jnp.float32) * r.astype(jnp.float32)),
                     argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got_g, want_g):
        scale = np.abs(np.asarray(w)).max()
        np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), np.asarray(w), atol=0.01 * scale,
                                   rtol=0)  # 0.024 * scale with a bf16 dp
    # the decode step's attention: the last query of each row against the whole cache ([B, K, D, S] keys)
    got_d = decode_attention(q[:, :, :, -1], k.transpose(0, 1, 3, 2), v, mask[:, -1])
    np.testing.assert_allclose(np.asarray(got_d.astype(jnp.float32)), want[:, :, :, -1], atol=0.015,
                               rtol=0)  # 0.033 with bf16 scores


@pytest.mark.parametrize("window", [None, 3])
def test_prefix_group_masks_are_the_blocks_of_the_dense_packed_mask(window):
    """prefix_group_masks for rows [prefix | c_1 .. c_g]: the prefix block and each continuation's (prefix keys,
    own keys) block equal a NumPy dense mask of the packed row (a query sees earlier slots of its own segment and
    of the prefix, valid keys only, window counted in positions); the blocks they leave out (another continuation's
    keys) are all masked in the dense one."""
    from reftjax.models.llama import prefix_group_masks

    b, p, g, n = 2, 5, 3, 4
    t = p + g * n
    valid = np.ones((b, t), bool)
    valid[0, :2] = False  # left-padded prefix
    valid[1, p + n + 2:p + 2 * n] = False  # continuation 2 stopped early
    prefix_pos = np.maximum(np.cumsum(valid[:, :p], 1) - 1, 0)
    pos = np.concatenate([prefix_pos, np.tile(prefix_pos[:, -1:] + 1 + np.arange(n)[None], (1, g))], axis=1)
    seg = np.concatenate([np.zeros(p, int), np.repeat(np.arange(1, g + 1), n)])
    dense = np.zeros((b, t, t), bool)
    for i in range(b):
        for q in range(t):
            for k in range(t):
                ok = k <= q and (seg[k] == seg[q] or seg[k] == 0) and valid[i, k]
                dense[i, q, k] = ok and (not window or pos[i, q] - pos[i, k] < window)
    m_pp, m_c = jax.device_get(prefix_group_masks(jnp.asarray(valid), jnp.asarray(pos), p, g, window))
    assert m_pp.shape == (b, p, p) and m_c.shape == (b * g, n, p + n)
    np.testing.assert_array_equal(m_pp, dense[:, :p, :p])
    for j in range(g):
        rows = slice(p + j * n, p + (j + 1) * n)
        np.testing.assert_array_equal(m_c.reshape(b, g, n, p + n)[:, j], np.concatenate(
            [dense[:, rows, :p], dense[:, rows, rows]], axis=2))
        others = np.ones(t, bool)
        others[:p] = False
        others[rows] = False
        assert not dense[:, rows][:, :, others].any()
    assert not dense[:, :p, p:].any()
    with pytest.raises(ValueError, match="not a prefix of 5 plus 3"):
        prefix_group_masks(jnp.asarray(valid[:, :-1]), jnp.asarray(pos[:, :-1]), p, g, window)


def test_float16_is_refused_and_bf16_logits_come_back_in_float32():
    """float16 ran without loss scaling (helper review: q/k gradients 50% off at 32 x 256 tokens); bf16 logits were
    rounded to bf16 before the float32 log-softmax (up to 0.06 at SmolLM2's head, more than the per-token KL)."""
    from reftjax.models import init_params, lm_logits

    with pytest.raises(ValueError, match="dtype='float16' is not supported"):
        ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                    dtype="float16")
    cfg = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=48, num_layers=1, num_heads=4,
                      num_kv_heads=2, dtype="bfloat16", tie_word_embeddings=True)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))  # (jit: eagerly, ~130 small programs)
    h = (4.0 * jax.random.normal(jax.random.key(1), (2, 3, 256))).astype(jnp.bfloat16)
    got = jax.jit(lm_logits, static_argnums=1)(params, cfg, h)
    w = params["embed_tokens"]["embedding"].astype(jnp.bfloat16).astype(jnp.float32)
    want = jnp.einsum("btd,vd->btv", h.astype(jnp.float32), w, precision="highest")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)  # bf16 output: off by ~4e-3 here
    ones = jnp.ones((2, 3), jnp.int32)
    logits = jax.jit(forward, static_argnums=1)(params, cfg, ones, ones)[0]
    assert logits.dtype == jnp.float32


def test_value_head_starts_as_the_authors_torch_linear_does():
    """The ReFT authors' trl value head keeps torch's nn.Linear default (no v_head_init_strategy): weight and bias
    uniform in +-1/sqrt(hidden). reftjax drew N(0, 0.02) and a zero bias (review, session 28): at 7B's width 4096
    a 2.2x wider start of the critic, whose loss (vf_coef 5) reaches the shared backbone."""
    from types import SimpleNamespace

    from reftjax.models import init_value_head

    width = 4096
    heads = [init_value_head(SimpleNamespace(hidden_size=width), jax.random.key(s))["summary"] for s in range(64)]
    ours = {k: np.concatenate([np.asarray(h[k]).ravel() for h in heads]) for k in ("kernel", "bias")}
    torch.manual_seed(0)
    linears = [torch.nn.Linear(width, 1) for _ in range(64)]
    theirs = {"kernel": np.concatenate([m.weight.detach().numpy().ravel() for m in linears]),
              "bias": np.concatenate([m.bias.detach().numpy().ravel() for m in linears])}
    for k in ("kernel", "bias"):
        assert np.abs(ours[k]).max() <= width ** -0.5 and np.abs(theirs[k]).max() <= width ** -0.5
        assert abs(ours[k].std() / theirs[k].std() - 1) < (0.02 if k == "kernel" else 0.35), k
    assert abs(ours["kernel"].std() * (3 * width) ** 0.5 - 1) < 0.01  # uniform: std = bound / sqrt(3)


def test_mixed_layers_save_their_masks_and_rope_tables_once_for_the_backward():
    """A model mixing windowed and full layers (Gemma 3) picks each layer's mask and RoPE base inside the scan; the
    backward's saved values must hold the loop-invariant masks and cos/sin tables once, as a uniform model's do,
    not a picked copy per layer (which cost ~L x B x T^2 bytes: 930.9 vs 788.9 MiB at 8 layers, 4 x 2048)."""
    base = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=2, num_kv_heads=1,
                       head_dim=32, sliding_window=64, local_rope_theta=1e4, rope_theta=1e6, hidden_act="gelu_tanh",
                       norm_offset=1.0, embed_scale=True, sandwich_norms=True, qk_norm=True, model_type="gemma3_text")
    b, t = 2, 512
    tokens = np.ones((b, t), np.int32)

    def temp_bytes(cfg):
        params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
        loss = lambda p: forward(p, cfg, tokens, tokens, return_logits=False)[1].astype(jnp.float32).sum()  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    uniform, mixed = temp_bytes(base), temp_bytes(base.replace(sliding_layers=(True, True, True, False) * 2))
    assert mixed - uniform < 2 * b * t * t, (mixed, uniform)  # a constant, not one [B, T, T] mask per layer


@pytest.mark.parametrize("family,kw", [("llama", {}), ("olmo2", {"scale_float32": True}), ("gemma", {"offset": 1.0})])
def test_rms_norm_in_bf16_is_transformers_bit_for_bit(family, kw):
    """The three RMSNorm orders in bf16, against transformers' own modules: Llama scales after casting back, OLMo 2
    scales in float32 then casts, Gemma scales by 1 + w in float32. In float32, where every parity test ran, OLMo 2's
    order equals Llama's: a mutant giving OLMo 2 Llama's passed the suite, while in bf16 a quarter of its outputs
    move by one ulp (mutation review, session 44). Each order differs from the others here, so each is pinned."""
    import importlib

    from reftjax.models.llama import rms_norm

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    norm = getattr(module, {"llama": "LlamaRMSNorm", "olmo2": "Olmo2RMSNorm", "gemma": "GemmaRMSNorm"}[family])
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (64, 256)).astype(np.float32)
    w = rng.normal(1, 0.5, 256).astype(np.float32)
    m = norm(256, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(w).to(torch.bfloat16))
        want = m(torch.tensor(x).to(torch.bfloat16)).float().numpy()
    bf = lambda a: jnp.asarray(a).astype(jnp.bfloat16)  # noqa: E731
    got = np.asarray(rms_norm(bf(x), bf(w), 1e-6, jnp.bfloat16, **kw)).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    others = [o for o in ({}, {"scale_float32": True}, {"offset": 1.0}) if o != kw]
    assert all(np.mean(np.asarray(rms_norm(bf(x), bf(w), 1e-6, jnp.bfloat16, **o)).astype(np.float32) != want) > 0.1
               for o in others)


def test_rope_in_bf16_rounds_cos_and_sin_as_transformers():
    """In bf16, RoPE multiplies by cos and sin rounded to bf16, as transformers' rotary embedding hands them to
    `apply_rotary_pos_emb`. Rotating with float32 tables and casting the result is closer to exact, yet moves ~40%
    of the outputs by an ulp against transformers, and every parity test runs in float32, where the two orders are
    equal: such a mutant passed the suite (mutation review, session 45)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from reftjax.models.llama import apply_rope, rope_inv_freq

    cfg = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2)
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2))
    np.testing.assert_allclose(rotary.inv_freq.numpy(), rope_inv_freq(cfg), rtol=1e-6)  # (the same RoPE)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (2, 64, 4, 64)).astype(np.float32)  # [B, T, heads, head_dim]
    positions = np.tile(np.arange(64) * 37, (2, 1))
    xt = torch.tensor(x).to(torch.bfloat16).transpose(1, 2)  # transformers' [B, heads, T, head_dim]
    cos, sin = rotary(xt, torch.tensor(positions))
    want = apply_rotary_pos_emb(xt, xt, cos, sin)[0].transpose(1, 2).float().numpy()
    got = apply_rope(jnp.asarray(x).astype(jnp.bfloat16), jnp.asarray(positions), rope_inv_freq(cfg))
    assert got.dtype == jnp.bfloat16
    assert np.mean(np.asarray(got.astype(jnp.float32)) == want) > 0.99  # 0.999: a few large angles' float32 cos/sin


def test_bf16_attention_rounds_its_probabilities_as_transformers():
    """The float32 softmax is cast to bf16 before the product with the values (transformers' eager attention:
    `softmax(..., dtype=float32).to(query.dtype)`), in the training forward and in the decode step. Kept in float32,
    a third of the outputs move by an ulp, which the float32 parity tests and the loose bf16 score test above cannot
    see (mutation review, session 45). Reference: NumPy float64 probabilities rounded to bf16."""
    import ml_dtypes

    from reftjax.models.llama import attention_core, decode_attention

    q, k, v, mask, _ = _attention_inputs(jnp.bfloat16, d=16)
    f64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)  # noqa: E731
    s = np.einsum("bkgtd,bksd->bkgts", f64(q), f64(k)) / 4.0
    s = np.where(np.asarray(mask)[:, None, None], s, -np.inf)
    s = np.where(np.isinf(s).all(-1, keepdims=True), 0.0, s)  # rows with no visible key: uniform (as ours)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    want = np.einsum("bkgts,bksd->bkgtd", p, f64(v)).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    got = np.asarray(attention_core(q, k, v, mask).astype(jnp.float32))
    assert np.mean(got == want) > 0.97  # (1.0 here; ~0.65 with float32 probabilities)
    got_d = np.asarray(decode_attention(q[:, :, :, -1], k.transpose(0, 1, 3, 2), v, mask[:, -1]).astype(jnp.float32))
    assert np.mean(got_d == want[:, :, :, -1]) > 0.97


def test_remat_policies_trade_saved_values_for_recomputation_in_order():
    """`remat="full"` saves only each layer's input for the backward, "dots" also the weight products, "none"
    everything: the compiled gradient's temporaries shrink in that order. The three give the same values, so no
    parity test could tell the policies apart: mutants swapping "full" and "dots", or running "dots" without remat,
    passed the suite (mutation review, session 49)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_layers=4, num_heads=2, num_kv_heads=1,
                      head_dim=32)
    tokens = np.ones((2, 128), np.int32)

    def temp_bytes(remat):
        c = cfg.replace(remat=remat)
        params = jax.eval_shape(lambda: llama.init_params(c, jax.random.key(0)))
        loss = lambda p: forward(p, c, tokens, tokens, return_logits=False)[1].astype(jnp.float32).sum()  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    none, dots, full = (temp_bytes(r) for r in ("none", "dots", "full"))
    assert full < 0.8 * dots and dots < 0.9 * none, (full, dots, none)  # (3.1, 5.2, 7.1 MB)


@pytest.mark.parametrize("kind", ["llama", "gemma", "olmo2"])
def test_fresh_norms_are_the_identity_scale(kind):
    """`init_params` starts every RMSNorm at the identity scale: ones, or zeros where the model scales by 1 + w
    (Gemma's offset), whose ones doubled every norm's output: a mutant initialising them to ones passed the suite
    (mutation review, session 49). Checked on what a norm computes: x / rms(x), in the norm's own order."""
    cfg = {"llama": _decode_test_config("llama", None), "gemma": _decode_test_config("gemma2_softcaps", None),
           "olmo2": _decode_test_config("olmo2_post_norms", None)}[kind]
    params = llama.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    norms = [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if "norm" in jax.tree_util.keystr(path)]
    assert len(norms) >= 3
    for name, scale in norms:
        x = rng.normal(0, 2, (5, scale.shape[-1])).astype(np.float32)
        want = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)
        for s in np.asarray(scale).reshape(-1, scale.shape[-1]):  # (stacked over the layers, or the final norm)
            got = llama.rms_norm(jnp.asarray(x), jnp.asarray(s), cfg.rms_norm_eps, jnp.float32, cfg.norm_offset,
                                 cfg.norm_scale_float32)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_gemma_embedding_scale_in_bf16_rounds_the_factor_as_transformers():
    """Gemma scales its input embeddings by sqrt(D) rounded to the activations' dtype first (transformers:
    `torch.tensor(hidden_size ** 0.5, dtype=hidden_states.dtype)`): at D = 1152 (Gemma 3 1B) bf16's 34.0 for 33.94.
    Multiplying by the float32 factor and casting moves about a third of the bf16 embeddings by an ulp, which the
    float32 parity tests cannot see: such a mutant passed the suite (mutation review, session 49)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=1152, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                      embed_scale=True, norm_offset=1.0, dtype="bfloat16", model_type="gemma")
    x = np.random.default_rng(0).normal(0, 0.05, (16, 1152)).astype(np.float32)
    xt = torch.tensor(x).to(torch.bfloat16)
    want = (xt * torch.tensor(1152 ** 0.5, dtype=xt.dtype)).float().numpy()
    got = llama._scale_embeddings(cfg, jnp.asarray(x).astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)
    f32 = (xt.float() * 1152 ** 0.5).to(torch.bfloat16).float().numpy()
    assert np.mean(f32 != want) > 0.1  # (the float32 factor's order differs: the check above can fail)


def test_an_untied_bf16_head_multiplies_with_its_kernel_rounded_to_bf16():
    """With float32 parameters and bf16 compute, an untied `lm_head` is cast to bf16 as every other kernel is (the
    product still accumulates in float32): a head kept in float32 promoted the model's largest GEMM to float32, which
    the test above (tied embeddings) and the float32 parity tests could not see (mutation review, session 49)."""
    from reftjax.models import init_params, lm_logits

    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=48, num_layers=1, num_heads=4,
                      num_kv_heads=2, dtype="bfloat16", tie_word_embeddings=False)
    params = init_params(cfg, jax.random.key(0))
    assert params["lm_head"]["kernel"].dtype == jnp.float32
    h = (4.0 * jax.random.normal(jax.random.key(1), (2, 3, 256))).astype(jnp.bfloat16)
    got = lm_logits(params, cfg, h)
    w = np.asarray(params["lm_head"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    want = np.einsum("btd,dv->btv", np.asarray(h.astype(jnp.float32), np.float64), w)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)  # (float32 kernel: off by ~4e-3)


def test_padding_slots_get_position_0():
    """`positions_from_mask` (exported) counts real tokens only and gives left padding position 0, as documented;
    the model masks padding everywhere, so a -1 there changed no logits and passed the suite (session 49)."""
    from reftjax.models import positions_from_mask

    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], np.int32)
    np.testing.assert_array_equal(positions_from_mask(jnp.asarray(mask)),
                                  [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
