"""Llama-family decoder models, their configs and value head."""
from reftjax.models.config import ModelConfig, RopeScaling, from_hf_config
from reftjax.models.llama import (KVCache, Transformer, ValueHead, decode_step, forward, init_params,
                                  init_value_head, lm_head_weight, lm_logits, param_logical_axes,
                                  packed_prefill, positions_from_mask, prefill, unstack_layers)

__all__ = ["ModelConfig", "RopeScaling", "from_hf_config", "KVCache", "Transformer", "ValueHead", "decode_step",
           "forward", "init_params", "init_value_head", "lm_head_weight", "lm_logits", "param_logical_axes",
           "packed_prefill", "positions_from_mask", "prefill", "unstack_layers"]
